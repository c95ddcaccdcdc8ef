// The tiled attention kernel (model.attention_kernel = "tiled"): equal to the exact kernel
// (causal_attention) within float rounding, its gradients by finite differences, the same bits
// on 1 and 2 threads, and its Regen.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "gradcheck.hpp"
#include "moe/ops/ops.hpp"

using namespace moe;
using test::Probe;
using test::random_vector;

namespace {

struct Run {
  std::vector<float> y, grad;
};

// y and dqkv of Σ y·seed for the exact (tiled = false) or tiled kernel on qkv [B, T, (H + 2·H_kv)·D].
Run attend(bool tiled, const std::vector<float>& x, const std::vector<float>& seed, int64_t B, int64_t T, int64_t H,
           int64_t H_kv, int64_t D, float p) {
  Graph g;
  Tensor qkv = g.new_tensor({B, T, (H + 2 * H_kv) * D}, true);
  std::copy(x.begin(), x.end(), qkv.data);
  Rng rng(11, 2);
  const auto op = tiled ? tiled_causal_attention : causal_attention;
  Tensor y = op(g, qkv, H, H_kv, 0.4f, p, p > 0, rng, nullptr);
  REQUIRE(y.shape == Shape{B, T, H * D});
  g.backward(sum(g, mul(g, y, g.constant(y.shape, seed.data()))));
  return {std::vector<float>(y.data, y.data + y.numel()), std::vector<float>(qkv.grad, qkv.grad + qkv.numel())};
}

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

// max |a - b| relative to the largest |b| (at least 1).
float max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m / std::max(1.f, max_abs(b));
}

}  // namespace

TEST_CASE("tiled attention equals the exact kernel within float rounding", "[ops][attention][tiled]") {
  // {B, T, H, H_kv, D}: T below one tile of 16, a tile and a rest (19, 37, 70), whole tiles (64);
  // D 3 (no full lane of 8), 8, 16, 32 (the four-register sums); grouped and multi-query heads.
  const auto shape = GENERATE(std::array<int64_t, 5>{2, 5, 2, 2, 3}, std::array<int64_t, 5>{1, 19, 2, 2, 16},
                              std::array<int64_t, 5>{2, 37, 4, 2, 8}, std::array<int64_t, 5>{1, 64, 2, 1, 32},
                              std::array<int64_t, 5>{2, 70, 2, 2, 32});
  const int64_t B = shape[0], T = shape[1], H = shape[2], H_kv = shape[3], D = shape[4];
  INFO("B " << B << " T " << T << " H " << H << " H_kv " << H_kv << " D " << D);
  for (float p : {0.f, 0.3f}) {
    INFO("dropout " << p);
    const auto x = random_vector(B * T * (H + 2 * H_kv) * D, 5, -1.5f, 1.5f);
    const auto seed = random_vector(B * T * H * D, 6);
    const Run exact = attend(false, x, seed, B, T, H, H_kv, D, p), tiled = attend(true, x, seed, B, T, H, H_kv, D, p);
    CHECK(max_rel_diff(tiled.y, exact.y) < 2e-6f);
    CHECK(max_rel_diff(tiled.grad, exact.grad) < 1e-5f);
    CHECK(max_abs(exact.grad) > 0.1f);  // the comparison sees gradients
  }
}

TEST_CASE("tiled attention's gradients check", "[ops][attention][tiled]") {
  // T = 21: a tile and a rest; H_kv 2 and 1 (grouped and multi-query); dropout on the weights.
  const int64_t B = 2, T = 21, H = 2, D = 4;
  for (const int64_t H_kv : {2, 1}) {
    INFO("H_kv " << H_kv);
    const int64_t W = (H + 2 * H_kv) * D;
    REQUIRE_GRADCHECK({random_vector(B * T * W, 7)}, {{B, T, W}}, [&](Graph& g, const std::vector<Tensor>& in) {
      Rng rng(3, 1);
      return Probe{tiled_causal_attention(g, in[0], H, H_kv, 0.4f, 0.25f, true, rng), {}};
    });
  }
}

TEST_CASE("tiled attention gives the same bits on 1 and 2 threads", "[ops][attention][tiled]") {
  const int64_t B = 3, T = 45, H = 4, H_kv = 2, D = 16;
  const auto x = random_vector(B * T * (H + 2 * H_kv) * D, 5, -1.5f, 1.5f);
  const auto seed = random_vector(B * T * H * D, 6);
  const int saved = omp_get_max_threads();
  Run runs[2];
  for (int threads = 1; threads <= 2; ++threads) {
    omp_set_num_threads(threads);
    runs[threads - 1] = attend(true, x, seed, B, T, H, H_kv, D, 0.2f);
  }
  omp_set_num_threads(saved);
  CHECK(runs[0].y == runs[1].y);
  CHECK(runs[0].grad == runs[1].grad);
}

TEST_CASE("tiled attention's Regen makes its output again, bit for bit", "[ops][attention][tiled]") {
  Graph g;
  const int64_t B = 2, T = 20, H = 2, D = 8;
  const auto v = random_vector(B * T * 3 * H * D, 6);
  Tensor qkv = g.constant({B, T, 3 * H * D}, v.data());
  Rng rng(4, 1);
  Regen again;
  const Tensor y = tiled_causal_attention(g, qkv, H, H, 0.5f, 0.2f, true, rng, &again);
  const std::vector<float> want(y.data, y.data + y.numel());
  std::fill(y.data, y.data + y.numel(), -1.f);
  again();
  CHECK(std::memcmp(y.data, want.data(), sizeof(float) * want.size()) == 0);
}
