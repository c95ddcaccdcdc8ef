// Every autograd op: finite-difference gradient checks and hand-computed forward values.
#include <catch2/catch.hpp>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstring>

#include "gradcheck.hpp"
#include "moe/kernels/expf.hpp"
#include "moe/kernels/log1pf.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/nn.hpp"
#include "moe/kernels/bits.hpp"
#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"

using namespace moe;
using test::Probe;
using test::random_vector;

namespace {

// A one-input op checked at random inputs in [lo, hi).
void check_unary(const Shape& s, std::function<Tensor(Graph&, const Tensor&)> op, float lo = -1.f, float hi = 1.f,
                 test::GradCheckOptions opt = {}) {
  REQUIRE_GRADCHECK({random_vector(s.numel(), 1, lo, hi)}, {s},
                    [&](Graph& g, const std::vector<Tensor>& in) { return Probe{op(g, in[0]), {}}; }, opt);
}

Tensor none() { return Tensor{}; }

}  // namespace

TEST_CASE("gemm matches the reference for every transpose, odd sizes, alpha and beta", "[ops][gemm]") {
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [M, N, K] : {std::array<int64_t, 3>{1, 1, 1}, {7, 19, 5}, {13, 33, 300}, {97, 40, 17}}) {
        auto A = random_vector(M * K, 1), B = random_vector(K * N, 2), C0 = random_vector(M * N, 3);
        std::vector<float> C = C0, R = C0;
        const int64_t lda = ta ? M : K, ldb = tb ? K : N;
        gemm(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.f, C.data(), N);
        gemm_reference(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.f, R.data(), N);
        double d = 0;
        for (size_t i = 0; i < C.size(); ++i) d = std::max(d, double(std::fabs(C[i] - R[i])));
        INFO("ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K << " max diff " << d);
        REQUIRE(d < 1e-4);
      }
}

TEST_CASE("gemm gives the same bits on 1 and 2 threads", "[ops][gemm]") {
  const int64_t M = 300, N = 200, K = 600;
  auto A = random_vector(M * K, 1), B = random_vector(K * N, 2);
  std::vector<float> c1(static_cast<size_t>(M * N)), c2(static_cast<size_t>(M * N));
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  gemm(false, true, M, N, K, 1.f, A.data(), K, B.data(), K, 0.f, c1.data(), N);
  omp_set_num_threads(2);
  gemm(false, true, M, N, K, 1.f, A.data(), K, B.data(), K, 0.f, c2.data(), N);
  omp_set_num_threads(saved);
  REQUIRE(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
}

TEST_CASE("gradient checks: dense algebra", "[ops][gradcheck]") {
  SECTION("linear with bias") {
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(2 * 3 * 5, 1), random_vector(4 * 5, 2), random_vector(4, 3)}),
                      (std::vector<Shape>{{2, 3, 5}, {4, 5}, {4}}),
                      [](Graph& g, const std::vector<Tensor>& in) { return Probe{linear(g, in[0], in[1], in[2]), {}}; });
  }
  SECTION("linear without bias") {
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(6 * 5, 1), random_vector(3 * 5, 2)}),
                      (std::vector<Shape>{{6, 5}, {3, 5}}),
                      [](Graph& g, const std::vector<Tensor>& in) { return Probe{linear(g, in[0], in[1], none()), {}}; });
  }
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      DYNAMIC_SECTION("bmm trans_a " << ta << " trans_b " << tb) {
        const Shape sa = ta ? Shape{2, 3, 4, 5} : Shape{2, 3, 5, 4};  // op(a): [.., 5, 4]
        const Shape sb = tb ? Shape{2, 3, 6, 4} : Shape{2, 3, 4, 6};  // op(b): [.., 4, 6]
        REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(sa.numel(), 1), random_vector(sb.numel(), 2)}),
                          (std::vector<Shape>{sa, sb}), [=](Graph& g, const std::vector<Tensor>& in) {
                            return Probe{bmm(g, in[0], in[1], ta, tb), {}};
                          });
      }
    }
  SECTION("add, mul, add_bias") {
    std::vector<std::vector<float>> two = {random_vector(12, 1), random_vector(12, 2)};
    std::vector<Shape> s2 = {{3, 4}, {3, 4}};
    REQUIRE_GRADCHECK(two, s2, [](Graph& g, const std::vector<Tensor>& in) { return Probe{add(g, in[0], in[1]), {}}; });
    REQUIRE_GRADCHECK(two, s2, [](Graph& g, const std::vector<Tensor>& in) { return Probe{mul(g, in[0], in[1]), {}}; });
    // Over a fresh tensor (scale's output), as the model uses it; scale's backward does not read it.
    REQUIRE_GRADCHECK(two, s2, [](Graph& g, const std::vector<Tensor>& in) {
      return Probe{add_into(g, in[0], scale(g, in[1], 1.5f)), {}};
    });
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(12, 1), random_vector(4, 2)}),
                      (std::vector<Shape>{{3, 4}, {4}}),
                      [](Graph& g, const std::vector<Tensor>& in) { return Probe{add_bias(g, in[0], in[1]), {}}; });
  }
  SECTION("scale, sum, mean") {
    check_unary({3, 4}, [](Graph& g, const Tensor& x) { return scale(g, x, -2.5f); });
    check_unary({3, 4}, [](Graph& g, const Tensor& x) { return sum(g, x); });
    check_unary({3, 4}, [](Graph& g, const Tensor& x) { return mean(g, x); });
  }
  SECTION("embedding (repeated ids accumulate)") {
    static const int32_t ids[6] = {2, 0, 2, 3, 1, 2};
    check_unary({4, 5}, [](Graph& g, const Tensor& table) { return embedding(g, ids, table, {2, 3, 5}); });
  }
  SECTION("layernorm") {
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(3 * 6, 1, -2, 2), random_vector(6, 2), random_vector(6, 3)}),
                      (std::vector<Shape>{{3, 6}, {6}, {6}}),
                      [](Graph& g, const std::vector<Tensor>& in) { return Probe{layernorm(g, in[0], in[1], in[2]), {}}; },
                      test::GradCheckOptions{1e-2, 2e-3, 2e-2, 1234, {}});
  }
  SECTION("rmsnorm") {
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(3 * 6, 1, -2, 2), random_vector(6, 2)}),
                      (std::vector<Shape>{{3, 6}, {6}}),
                      [](Graph& g, const std::vector<Tensor>& in) { return Probe{rmsnorm(g, in[0], in[1]), {}}; },
                      test::GradCheckOptions{1e-2, 2e-3, 2e-2, 1234, {}});
  }
}

TEST_CASE("gradient checks: the queries and keys of a fused projection (qk_rmsnorm, rope)", "[ops][gradcheck][qk]") {
  // H = 4 query heads and H_kv = 2 key/value heads of D = 6: qkv [B, T, (4 + 2·2)·6].
  const int64_t B = 2, T = 5, H = 4, H_kv = 2, D = 6, W = (H + 2 * H_kv) * D;
  SECTION("qk_rmsnorm") {
    REQUIRE_GRADCHECK(
        (std::vector<std::vector<float>>{random_vector(B * T * W, 1, -2, 2), random_vector(D, 2), random_vector(D, 3)}),
        (std::vector<Shape>{{B, T, W}, {D}, {D}}),
        [&](Graph& g, const std::vector<Tensor>& in) { return Probe{qk_rmsnorm(g, in[0], in[1], in[2], H, H_kv), {}}; },
        test::GradCheckOptions{1e-2, 2e-3, 2e-2, 1234, {}});
  }
  SECTION("rope") {
    REQUIRE_GRADCHECK({random_vector(B * T * W, 1, -2, 2)}, {{B, T, W}}, [&](Graph& g, const std::vector<Tensor>& in) {
      return Probe{rope(g, in[0], H, H_kv, 100.0), {}};
    });
  }
}

TEST_CASE("rope rotates each pair (i, i + D/2) by t·theta^(-2i/D); qk_rmsnorm normalises each head", "[ops][qk]") {
  // One query head and one key head of D = 4 (and a value head, copied), at positions 0 and 1.
  const int64_t D = 4, W = 3 * D;
  std::vector<float> x(size_t(2 * W));
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 5) - 1.5f;
  Graph g;
  const Tensor in = g.constant({1, 2, W}, x.data());
  const Tensor r = rope(g, in, 1, 1, 100.0);
  for (int64_t c = 0; c < W; ++c) CHECK(r.data[c] == x[size_t(c)]);  // position 0: unchanged
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < D / 2; ++i) {
      const double a = std::pow(100.0, -2.0 * double(i) / double(D));  // angle at position 1
      const float* row = x.data() + W + h * D;
      CHECK(r.data[W + h * D + i] == Approx(row[i] * std::cos(a) - row[i + D / 2] * std::sin(a)).margin(1e-6));
      CHECK(r.data[W + h * D + i + D / 2] == Approx(row[i + D / 2] * std::cos(a) + row[i] * std::sin(a)).margin(1e-6));
    }
  for (int64_t c = 2 * D; c < W; ++c) CHECK(r.data[W + c] == x[size_t(W + c)]);  // values untouched
  std::vector<float> ones(size_t(D), 1.f);
  const Tensor n = qk_rmsnorm(g, in, g.constant({D}, ones.data()), g.constant({D}, ones.data()), 1, 1);
  for (int64_t row = 0; row < 2; ++row)
    for (int64_t h = 0; h < 2; ++h) {
      double ss = 0;
      for (int64_t c = 0; c < D; ++c) ss += double(n.data[row * W + h * D + c]) * n.data[row * W + h * D + c];
      CHECK(ss / double(D) == Approx(1.0).epsilon(1e-4));  // mean square 1 (eps aside)
    }
}

TEST_CASE("rmsnorm kernels give the same bits on 1 and 2 threads", "[ops][rmsnorm]") {
  const int64_t N = 301, C = 96;
  const auto x = random_vector(N * C, 1), w = random_vector(C, 2), dy = random_vector(N * C, 3);
  std::vector<float> y[2], dx[2], dw[2];
  const int saved = omp_get_max_threads();
  for (int t = 0; t < 2; ++t) {
    omp_set_num_threads(t + 1);
    std::vector<float> rstd(static_cast<size_t>(N));
    y[t].resize(size_t(N * C)), dx[t].assign(size_t(N * C), 0.f), dw[t].assign(size_t(C), 0.f);
    rmsnorm_forward(y[t].data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
    rmsnorm_backward(dx[t].data(), dw[t].data(), dy.data(), x.data(), w.data(), rstd.data(), N, C);
  }
  omp_set_num_threads(saved);
  CHECK(y[0] == y[1]);
  CHECK(dx[0] == dx[1]);
  CHECK(dw[0] == dw[1]);
}

TEST_CASE("gradient checks: elementwise and layout", "[ops][gradcheck]") {
  // relu away from its kink at 0.
  auto x = random_vector(20, 5, 0.1f, 1.f);
  for (size_t i = 0; i < x.size(); i += 2) x[i] = -x[i];
  REQUIRE_GRADCHECK({x}, {{4, 5}}, [](Graph& g, const std::vector<Tensor>& in) { return Probe{relu(g, in[0]), {}}; });
  check_unary({4, 5}, [](Graph& g, const Tensor& t) { return gelu(g, t); }, -3, 3);
  check_unary({4, 5}, [](Graph& g, const Tensor& t) { return silu(g, t); }, -3, 3);
  check_unary({4, 5}, [](Graph& g, const Tensor& t) { return softplus(g, t); }, -3, 3);
  check_unary({4, 5}, [](Graph& g, const Tensor& t) {
    Rng rng(9, 1);  // fixed mask
    return dropout(g, t, 0.3f, true, rng);
  });
  check_unary({4, 5}, [](Graph& g, const Tensor& t) {
    Rng rng(9, 1);
    return dropout(g, scale(g, t, 1.5f), 0.3f, true, rng, true);  // over scale's output
  });
  REQUIRE_GRADCHECK({random_vector(20, 6), random_vector(20, 7)}, {{4, 5}, {4, 5}},
                    [](Graph& g, const std::vector<Tensor>& in) {
                      Rng rng(9, 1);  // fixed mask; over scale's output, as over a product's
                      return Probe{dropout_add_into(g, in[0], scale(g, in[1], 1.5f), 0.3f, true, rng), {}};
                    });
  check_unary({2, 3, 8}, [](Graph& g, const Tensor& t) { return split_heads(g, t, 4); });
  check_unary({2, 4, 3, 2}, [](Graph& g, const Tensor& t) { return merge_heads(g, t); });
  check_unary({2, 3, 8}, [](Graph& g, const Tensor& t) { return slice_cols(g, t, 3, 4); });
}

TEST_CASE("gradient checks: softmax and loss", "[ops][gradcheck]") {
  check_unary({3, 5}, [](Graph& g, const Tensor& t) { return softmax(g, t); }, -2, 2);
  check_unary({2, 3, 4, 4}, [](Graph& g, const Tensor& t) { return causal_softmax(g, t); }, -2, 2);
  static const int32_t targets[6] = {0, 4, 2, 2, 1, 3};
  check_unary({2, 3, 5}, [](Graph& g, const Tensor& t) { return cross_entropy(g, t, targets); }, -2, 2);
}

TEST_CASE("gradient checks: MoE routing", "[ops][gradcheck]") {
  SECTION("topk_softmax, skipping points whose selection flips") {
    auto r = test::gradcheck({random_vector(6 * 5, 3, -2, 2)}, {{6, 5}}, [](Graph& g, const std::vector<Tensor>& in) {
      TopK t = topk_softmax(g, in[0], 2);
      return Probe{t.weights, std::vector<int32_t>(t.index, t.index + 12)};
    });
    INFO("checked " << r.checked << " skipped " << r.skipped << " " << r.first_failure);
    REQUIRE(r.checked >= 12);  // every kept logit of every row at least
    REQUIRE(r.failures == 0);
  }
  SECTION("gather_rows (a row taken twice)") {
    static const int32_t rows[4] = {2, 0, 2, 3};
    check_unary({4, 3}, [](Graph& g, const Tensor& t) { return gather_rows(g, t, rows, 4); });
  }
  SECTION("index_add_weighted into h and gates (a row hit twice)") {
    static const int32_t rows[3] = {1, 0, 1};
    static const int32_t gate_pos[3] = {3, 0, 2};
    REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(9, 1), random_vector(4, 2)}),
                      (std::vector<Shape>{{3, 3}, {2, 2}}), [](Graph& g, const std::vector<Tensor>& in) {
                        Tensor acc = g.zeros({2, 3}, g.grad_enabled());
                        index_add_weighted(g, acc, in[0], rows, in[1], gate_pos, 3);
                        return Probe{acc, {}};
                      });
  }
  SECTION("a whole routed layer: x -> router -> top-2 -> experts -> weighted sum") {
    // inputs: x [6, 4], router weight [3, 4], expert weights [3][4, 4]
    REQUIRE_GRADCHECK(
        (std::vector<std::vector<float>>{random_vector(24, 1), random_vector(12, 2, -2, 2), random_vector(48, 3)}),
        (std::vector<Shape>{{6, 4}, {3, 4}, {3, 4, 4}}), [](Graph& g, const std::vector<Tensor>& in) {
          const int64_t N = 6, E = 3, K = 2, C = 4;
          TopK top = topk_softmax(g, linear(g, in[0], in[1], none()), K);
          int32_t* off = g.arena().alloc_ints(E + 1);
          int32_t* tok = g.arena().alloc_ints(N * K);
          int32_t* pos = g.arena().alloc_ints(N * K);
          group_by_expert(top.index, N, K, E, off, tok, pos);
          Tensor acc = g.zeros({N, C}, g.grad_enabled());
          for (int64_t e = 0; e < E; ++e) {
            const int64_t n = off[e + 1] - off[e];
            if (n == 0) continue;
            Tensor w = in[2];
            w.data += e * C * C;
            if (w.grad) w.grad += e * C * C;
            w.shape = {C, C};
            Tensor h = gelu(g, linear(g, gather_rows(g, in[0], tok + off[e], n), w, none()));
            index_add_weighted(g, acc, h, tok + off[e], top.weights, pos + off[e], n);
          }
          return Probe{acc, std::vector<int32_t>(top.index, top.index + N * K)};
        });
  }
}

TEST_CASE("forward values against hand-computed cases", "[ops]") {
  Graph g;
  NoGradGuard ng(g);
  SECTION("softmax of [1, 2, 3]") {
    const float v[3] = {1, 2, 3};
    Tensor y = softmax(g, g.constant({1, 3}, v));
    CHECK(y.data[0] == Approx(0.0900306));
    CHECK(y.data[1] == Approx(0.2447285));
    CHECK(y.data[2] == Approx(0.6652410));
  }
  SECTION("causal softmax masks the future exactly") {
    const float v[4] = {5, 7, 1, 1};
    Tensor y = causal_softmax(g, g.constant({2, 2}, v));
    CHECK(y.data[0] == 1.f);
    CHECK(y.data[1] == 0.f);
    CHECK(y.data[2] == Approx(0.5));
  }
  SECTION("LayerNorm of [1, 2, 3, 4]") {
    const float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1}, b[4] = {0, 0, 0, 0};
    Tensor y = layernorm(g, g.constant({1, 4}, x), g.constant({4}, w), g.constant({4}, b));
    // mean 2.5, variance 1.25: (x - 2.5) / sqrt(1.25 + 1e-5)
    CHECK(y.data[0] == Approx(-1.3416355));
    CHECK(y.data[1] == Approx(-0.4472118));
    CHECK(y.data[3] == Approx(1.3416355));
  }
  SECTION("cross-entropy of a known distribution") {
    // logits log([0.5, 0.25, 0.25]): loss of target 1 is ln 4, of target 0 is ln 2.
    const float l[6] = {std::log(0.5f), std::log(0.25f), std::log(0.25f), std::log(0.5f), std::log(0.25f), std::log(0.25f)};
    const int32_t t[2] = {1, 0};
    Tensor y = cross_entropy(g, g.constant({2, 3}, l), t);
    CHECK(y.data[0] == Approx((std::log(4.0) + std::log(2.0)) / 2));
    const int32_t bad[2] = {1, 3};
    REQUIRE_THROWS_WITH(cross_entropy(g, g.constant({2, 3}, l), bad), Catch::Contains("cross_entropy") && Catch::Contains("target 3"));
  }
  SECTION("GELU, SiLU, softplus at known points") {
    const float x[3] = {-1, 0, 2};
    Tensor ge = gelu(g, g.constant({3}, x)), si = silu(g, g.constant({3}, x)), sp = softplus(g, g.constant({3}, x));
    CHECK(ge.data[0] == Approx(-0.15865525));
    CHECK(ge.data[2] == Approx(1.95449974));
    CHECK(si.data[0] == Approx(-0.26894142));
    CHECK(sp.data[1] == Approx(std::log(2.0)));
    const float big[1] = {30};
    CHECK(softplus(g, g.constant({1}, big)).data[0] == 30.f);
  }
  SECTION("linear on a 2x3 case") {
    const float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, -1, 0.5f, 0.5f, 0.5f}, b[2] = {10, 20};
    Tensor y = linear(g, g.constant({2, 3}, x), g.constant({2, 3}, w), g.constant({2}, b));
    CHECK(y.data[0] == Approx(8));   // 1 - 3 + 10
    CHECK(y.data[1] == Approx(23));  // 3 + 20
    CHECK(y.data[2] == Approx(8));   // 4 - 6 + 10
    CHECK(y.data[3] == Approx(27.5));
  }
  SECTION("top-k with ties broken toward the lower expert id") {
    const float a[4] = {1, 3, 3, 0}, b[4] = {2, 2, 2, 2};
    TopK ta = topk_softmax(g, g.constant({1, 4}, a), 2);
    CHECK(ta.index[0] == 1);
    CHECK(ta.index[1] == 2);
    CHECK(ta.weights.data[0] == Approx(0.5));
    TopK tb = topk_softmax(g, g.constant({1, 4}, b), 2);
    CHECK(tb.index[0] == 0);
    CHECK(tb.index[1] == 1);
    const float c[3] = {0, 1, 2};
    TopK tc = topk_softmax(g, g.constant({1, 3}, c), 2);
    CHECK(tc.index[0] == 2);
    CHECK(tc.weights.data[0] == Approx(1 / (1 + std::exp(-1.0))));
  }
  SECTION("group_by_expert") {
    // N=3 tokens, K=2: token 0 -> {2, 0}, token 1 -> {0, 1}, token 2 -> {2, 1}.
    const int32_t index[6] = {2, 0, 0, 1, 2, 1};
    int32_t off[4], tok[6], pos[6];
    group_by_expert(index, 3, 2, 3, off, tok, pos);
    CHECK(std::vector<int32_t>(off, off + 4) == std::vector<int32_t>{0, 2, 4, 6});
    // expert 0: tokens 0 (slot 1), 1 (slot 2); expert 1: 1 (slot 3), 2 (slot 5); expert 2: 0 (slot 0), 2 (slot 4)
    CHECK(std::vector<int32_t>(tok, tok + 6) == std::vector<int32_t>{0, 1, 1, 2, 0, 2});
    CHECK(std::vector<int32_t>(pos, pos + 6) == std::vector<int32_t>{1, 2, 3, 5, 0, 4});
  }
  SECTION("split/merge heads round trip") {
    auto v = random_vector(2 * 3 * 8, 4);
    Tensor x = g.constant({2, 3, 8}, v.data());
    Tensor y = merge_heads(g, split_heads(g, x, 4));
    REQUIRE(std::memcmp(x.data, y.data, sizeof(float) * 48) == 0);
    // y[b0, h1, t1, d0] (flat 1*T*D + 1*D = 8) is x[b0, t1, c = h1*D + 0 = 2] (flat 1*8 + 2).
    CHECK(split_heads(g, x, 4).data[8] == v[10]);
  }
}

TEST_CASE("add_into and dropout in place give add's and dropout's bits, and take no data memory", "[ops]") {
  const auto x0 = random_vector(24, 1), y0 = random_vector(24, 2), dz = random_vector(24, 3);
  std::vector<float> out[2], dx[2], dy[2];
  size_t used[2];
  for (int in_place = 0; in_place < 2; ++in_place) {
    Graph g;
    Tensor x = g.constant({4, 6}, x0.data()), y = g.constant({4, 6}, y0.data());
    x.grad = g.zeros({4, 6}, false).data, y.grad = g.zeros({4, 6}, false).data;
    Rng rng(5, 2);
    const Tensor a = scale(g, y, 2.f);
    const size_t before = g.arena().bytes_used();
    const Tensor d = dropout(g, a, 0.25f, true, rng, in_place);
    const Tensor z = in_place ? add_into(g, x, d) : add(g, x, d);
    used[in_place] = g.arena().bytes_used() - before;
    if (in_place) CHECK(z.data == a.data);
    g.backward_from(z, dz.data());
    out[in_place].assign(z.data, z.data + 24);
    dx[in_place].assign(x.grad, x.grad + 24);
    dy[in_place].assign(y.grad, y.grad + 24);
  }
  CHECK(out[0] == out[1]);
  CHECK(dx[0] == dx[1]);
  CHECK(dy[0] == dy[1]);
  CHECK(used[0] >= used[1] + 2 * 24 * sizeof(float));  // neither output has data of its own
}

TEST_CASE("dropout_add_into gives add_into(x, dropout(o)) bit for bit, and without dropout add_into", "[ops]") {
  // 5 runs of the mask and a part, past the size where the threads share the work.
  const int64_t R = 5 * 4096 / 64 + 3, C = 64, n = R * C;
  const auto x0 = random_vector(n, 1), y0 = random_vector(n, 2), dz = random_vector(n, 3);
  for (const float p : {0.f, 0.25f}) {
    for (const bool training : {true, false}) {
      INFO("p " << p << " training " << training);
      std::vector<float> out[2], dx[2], dy[2];
      for (int fused = 0; fused < 2; ++fused) {
        Graph g;
        Tensor x = g.constant({R, C}, x0.data()), y = g.constant({R, C}, y0.data());
        x.grad = g.zeros({R, C}, false).data, y.grad = g.zeros({R, C}, false).data;
        Rng rng(5, 2);
        const Tensor o = scale(g, y, 2.f);
        const Tensor z = fused ? dropout_add_into(g, x, o, p, training, rng)
                               : add_into(g, x, dropout(g, o, p, training, rng, true));
        CHECK(z.data == o.data);
        g.backward_from(z, dz.data());
        out[fused].assign(z.data, z.data + n);
        dx[fused].assign(x.grad, x.grad + n);
        dy[fused].assign(y.grad, y.grad + n);
        if (p > 0 && training) CHECK(rng.state().counter == Rng(5, 2).state().counter + uint64_t(n));
      }
      CHECK(out[0] == out[1]);
      CHECK(dx[0] == dx[1]);
      CHECK(dy[0] == dy[1]);
    }
  }
}

TEST_CASE("Regens make an op's output again, bit for bit, where it was", "[ops]") {
  Graph g;
  const auto xv = random_vector(6 * 8, 1), wv = random_vector(5 * 8, 2), bv = random_vector(5, 3),
             lw = random_vector(8, 4), lb = random_vector(8, 5);
  Tensor x = g.constant({6, 8}, xv.data()), w = g.constant({5, 8}, wv.data()), b = g.constant({5}, bv.data());
  Tensor nw = g.constant({8}, lw.data()), nb = g.constant({8}, lb.data());
  std::vector<float> qkv_v = random_vector(2 * 3 * 24, 6);
  Tensor qkv = g.constant({2, 3, 24}, qkv_v.data());
  Rng rng(4, 1);
  Regen again[8];
  const int32_t rows[4] = {5, 0, 2, 2}, offsets[3] = {0, 1, 4};
  const Tensor outs[8] = {linear(g, x, w, b, &again[0]),
                          layernorm(g, x, nw, nb, 1e-5f, &again[1]),
                          dropout(g, scale(g, x, 1.f), 0.3f, true, rng, true, &again[2]),
                          add_into(g, x, scale(g, x, 2.f), &again[3]),
                          gather_row_groups(g, x, rows, offsets, 2, &again[4]),
                          causal_attention(g, qkv, 2, 2, 0.5f, 0.2f, true, rng, &again[5]),
                          rmsnorm(g, x, nw, 1e-5f, &again[6]),
                          dropout_add_into(g, x, scale(g, x, 1.f), 0.3f, true, rng, &again[7])};
  for (int i = 0; i < 8; ++i) {
    INFO("op " << i);
    const Tensor& y = outs[i];
    const std::vector<float> want(y.data, y.data + y.numel());
    std::fill(y.data, y.data + y.numel(), -1.f);
    if (i == 2 || i == 7) std::copy(x.data, x.data + x.numel(), y.data);  // in place: its input made again first
    if (i == 3)
      for (int64_t j = 0; j < y.numel(); ++j) y.data[j] = x.data[j] * 2.f;
    again[i]();
    CHECK(std::memcmp(y.data, want.data(), sizeof(float) * want.size()) == 0);
  }
}

TEST_CASE("shape errors name the op and the shapes", "[ops]") {
  Graph g;
  Tensor a = g.zeros({2, 3}, false), b = g.zeros({4, 5}, false), w = g.zeros({4, 3}, false);
  REQUIRE_THROWS_WITH(linear(g, b, w, none()), Catch::Contains("linear") && Catch::Contains("[4, 5]"));
  REQUIRE_THROWS_WITH(add(g, a, b), Catch::Contains("add") && Catch::Contains("[2, 3] vs [4, 5]"));
  REQUIRE_THROWS_WITH(bmm(g, a, b, false, false), Catch::Contains("bmm"));
  REQUIRE_THROWS_WITH(split_heads(g, g.zeros({1, 2, 6}, false), 4), Catch::Contains("divisible"));
  REQUIRE_THROWS_WITH(topk_softmax(g, a, 4), Catch::Contains("topk_softmax"));
  const int32_t bad_id[2] = {0, 9};
  REQUIRE_THROWS_WITH(embedding(g, bad_id, w, {2, 3}), Catch::Contains("id 9"));
}

TEST_CASE("fused causal attention equals the composed ops, and its gradients check", "[ops][attention]") {
  // T = 19: blocks of eight rows side by side and a rest of three; C / H = 16: two column
  // chunks of the weighted sums; 3: their one-by-one columns.
  const auto shape = GENERATE(std::array<int64_t, 4>{2, 5, 2, 6}, std::array<int64_t, 4>{1, 19, 2, 32});
  const int64_t B = shape[0], T = shape[1], H = shape[2], C = shape[3];
  INFO("B " << B << " T " << T << " H " << H << " C " << C);
  const auto composed = [&](Graph& g, const Tensor& qkv, float p, Rng& rng) {
    Tensor q = split_heads(g, slice_cols(g, qkv, 0, C), H);
    Tensor k = split_heads(g, slice_cols(g, qkv, C, C), H);
    Tensor v = split_heads(g, slice_cols(g, qkv, 2 * C, C), H);
    Tensor att = dropout(g, causal_softmax(g, scale(g, bmm(g, q, k, false, true), 0.4f)), p, p > 0, rng);
    return merge_heads(g, bmm(g, att, v, false, false));
  };
  for (float p : {0.f, 0.3f}) {
    INFO("dropout " << p);
    const auto x = random_vector(B * T * 3 * C, 5, -1.5f, 1.5f);
    const auto seed_grad = random_vector(B * T * C, 6);
    std::vector<float> grads[2], outs[2];
    for (int fused = 0; fused < 2; ++fused) {
      Graph g;
      Tensor qkv = g.new_tensor({B, T, 3 * C}, true);
      std::copy(x.begin(), x.end(), qkv.data);
      Rng rng(11, 2);
      Tensor y = fused ? causal_attention(g, qkv, H, H, 0.4f, p, p > 0, rng) : composed(g, qkv, p, rng);
      REQUIRE(y.shape == Shape{B, T, C});
      outs[fused].assign(y.data, y.data + y.numel());
      Tensor loss = sum(g, mul(g, y, g.constant(y.shape, seed_grad.data())));
      g.backward(loss);
      grads[fused].assign(qkv.grad, qkv.grad + qkv.numel());
    }
    for (size_t i = 0; i < outs[0].size(); ++i) REQUIRE(outs[1][i] == Approx(outs[0][i]).margin(1e-6));
    for (size_t i = 0; i < grads[0].size(); ++i) REQUIRE(grads[1][i] == Approx(grads[0][i]).margin(1e-5));
  }
  REQUIRE_GRADCHECK({random_vector(B * T * 3 * C, 7)}, {{B, T, 3 * C}}, [&](Graph& g, const std::vector<Tensor>& in) {
    Rng rng(3, 1);
    return Probe{causal_attention(g, in[0], H, H, 0.4f, 0.25f, true, rng), {}};
  });
}

TEST_CASE("grouped-query attention equals attention with each key/value head repeated", "[ops][attention]") {
  // H = 4 query heads over H_kv = 2 (groups of two) and 1 (multi-query): the same outputs as
  // the fused op on a qkv whose k and v hold head h / (H / H_kv) in place of head h, and the
  // gradient of a shared key/value head the sum of its copies'. T = 11: a block of eight rows
  // and a rest.
  const int64_t B = 2, T = 11, H = 4, D = 8, C = H * D;
  for (const int64_t H_kv : {2, 1}) {
    INFO("H_kv " << H_kv);
    const int64_t W = C + 2 * H_kv * D, G = H / H_kv;
    const auto x = random_vector(B * T * W, 5, -1.5f, 1.5f);
    const auto seed_grad = random_vector(B * T * C, 6);
    std::vector<float> full(size_t(B * T * 3 * C));  // every head's own k and v
    for (int64_t n = 0; n < B * T; ++n) {
      std::copy(x.begin() + n * W, x.begin() + n * W + C, full.begin() + n * 3 * C);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t part = 0; part < 2; ++part)
          std::copy_n(x.begin() + n * W + C + part * H_kv * D + h / G * D, D,
                      full.begin() + n * 3 * C + C + part * C + h * D);
    }
    for (float p : {0.f, 0.3f}) {
      INFO("dropout " << p);
      std::vector<float> outs[2], grads[2];
      for (int grouped = 0; grouped < 2; ++grouped) {
        Graph g;
        const int64_t width = grouped ? W : 3 * C;
        Tensor qkv = g.new_tensor({B, T, width}, true);
        std::copy_n(grouped ? x.data() : full.data(), B * T * width, qkv.data);
        Rng rng(11, 2);
        Tensor y = causal_attention(g, qkv, H, grouped ? H_kv : H, 0.4f, p, p > 0, rng);
        outs[grouped].assign(y.data, y.data + y.numel());
        g.backward(sum(g, mul(g, y, g.constant(y.shape, seed_grad.data()))));
        grads[grouped].assign(qkv.grad, qkv.grad + qkv.numel());
      }
      CHECK(outs[0] == outs[1]);  // each query head's sums are the same, in the same order
      for (int64_t n = 0; n < B * T; ++n) {
        for (int64_t c = 0; c < C; ++c) REQUIRE(grads[1][size_t(n * W + c)] == grads[0][size_t(n * 3 * C + c)]);
        for (int64_t part = 0; part < 2; ++part)
          for (int64_t j = 0; j < H_kv; ++j)
            for (int64_t d = 0; d < D; ++d) {
              float sum_of_copies = 0;
              for (int64_t h = j * G; h < (j + 1) * G; ++h) sum_of_copies += grads[0][size_t(n * 3 * C + C + part * C + h * D + d)];
              REQUIRE(grads[1][size_t(n * W + C + part * H_kv * D + j * D + d)] == Approx(sum_of_copies).margin(1e-6));
            }
      }
    }
    REQUIRE_GRADCHECK({random_vector(B * T * W, 7)}, {{B, T, W}}, [&](Graph& g, const std::vector<Tensor>& in) {
      Rng rng(3, 1);
      return Probe{causal_attention(g, in[0], H, H_kv, 0.4f, 0.25f, true, rng), {}};
    });
  }
}

TEST_CASE("linear_act equals linear then the activation, bit for bit, and its gradients check", "[ops][linear_act]") {
  const std::pair<Activation, Tensor (*)(Graph&, const Tensor&)> acts[] = {
      {Activation::kRelu, relu}, {Activation::kGelu, gelu}, {Activation::kSilu, silu}};
  for (const auto& [kind, separate] : acts)
    for (bool bias : {true, false}) {
      INFO("activation " << int(kind) << (bias ? " with bias" : " without bias"));
      const int64_t N = 37, I = 19, O = 23;  // odd sizes: GEMM edges
      const auto x = random_vector(N * I, 1), w = random_vector(O * I, 2), b = random_vector(O, 3);
      const auto dy = random_vector(N * O, 4);
      std::vector<float> out[2], grad_x[2], grad_w[2], grad_b[2];
      for (int fused = 0; fused < 2; ++fused) {
        Graph g;
        Tensor tx = g.new_tensor({N, I}, true), tw = g.new_tensor({O, I}, true), tb;
        std::copy(x.begin(), x.end(), tx.data);
        std::copy(w.begin(), w.end(), tw.data);
        if (bias) {
          tb = g.new_tensor({O}, true);
          std::copy(b.begin(), b.end(), tb.data);
        }
        Tensor y = fused ? linear_act(g, tx, tw, tb, kind) : separate(g, linear(g, tx, tw, tb));
        out[fused].assign(y.data, y.data + y.numel());
        g.backward_from(y, dy.data());
        grad_x[fused].assign(tx.grad, tx.grad + tx.numel());
        grad_w[fused].assign(tw.grad, tw.grad + tw.numel());
        if (bias) grad_b[fused].assign(tb.grad, tb.grad + tb.numel());
      }
      CHECK(out[0] == out[1]);
      CHECK(grad_x[0] == grad_x[1]);
      CHECK(grad_w[0] == grad_w[1]);
      CHECK(grad_b[0] == grad_b[1]);
      REQUIRE_GRADCHECK((std::vector<std::vector<float>>{random_vector(3 * 5, 5, -2, 2), random_vector(4 * 5, 6),
                                                         random_vector(4, 7)}),
                        (std::vector<Shape>{{3, 5}, {4, 5}, {4}}), [=](Graph& g, const std::vector<Tensor>& in) {
                          return Probe{linear_act(g, in[0], in[1], bias ? in[2] : none(), kind), {}};
                        });
    }
}

TEST_CASE("grouped_mlp gives the bits of two grouped_linear ops, gradients too", "[ops][grouped]") {
  const int32_t offsets[5] = {0, 9, 9, 29, 37};
  const int64_t G = 4, S = 37, I = 19, F = 29, O = 23;
  for (const Activation act : {Activation::kRelu, Activation::kGelu})
    for (bool bias : {true, false}) {
      INFO("activation " << int(act) << (bias ? ", bias" : ", no bias"));
      const auto x = random_vector(S * I, 1), dy = random_vector(S * O, 4);
      std::vector<float> out[2], grads[2];
      for (int fused = 0; fused < 2; ++fused) {
        Graph g;
        Tensor tx = g.new_tensor({S, I}, true);
        std::copy(x.begin(), x.end(), tx.data);
        std::vector<Tensor> w1(G), b1(G), w2(G), b2(G);
        for (int64_t e = 0; e < G; ++e) {
          const auto fill = [&](Tensor& t, Shape shape, uint64_t seed) {
            t = g.new_tensor(shape, true);
            const auto v = random_vector(t.numel(), seed);
            std::copy(v.begin(), v.end(), t.data);
          };
          fill(w1[size_t(e)], {F, I}, uint64_t(10 + e));
          fill(w2[size_t(e)], {O, F}, uint64_t(30 + e));
          if (bias) {
            fill(b1[size_t(e)], {F}, uint64_t(20 + e));
            fill(b2[size_t(e)], {O}, uint64_t(40 + e));
          }
        }
        const Tensor y = fused ? grouped_mlp(g, tx, offsets, G, w1.data(), b1.data(), act, w2.data(), b2.data())
                               : grouped_linear(g, grouped_linear(g, tx, offsets, G, w1.data(), b1.data(), &act),
                                                offsets, G, w2.data(), b2.data());
        out[fused].assign(y.data, y.data + y.numel());
        g.backward_from(y, dy.data());
        grads[fused].assign(tx.grad, tx.grad + tx.numel());
        for (const auto* ts : {&w1, &b1, &w2, &b2})
          for (const Tensor& t : *ts)
            if (t.data) grads[fused].insert(grads[fused].end(), t.grad, t.grad + t.numel());
      }
      CHECK(out[0] == out[1]);
      CHECK(grads[0] == grads[1]);
    }
}

TEST_CASE("grouped_linear gives each group's rows the bits linear_act or linear gives them, gradients too",
          "[ops][grouped]") {
  // Four experts over 37 rows, one of them with none and one with a single row; odd sizes.
  const int32_t offsets[5] = {0, 9, 9, 29, 37};
  const int64_t G = 4, S = 37, I = 19, O = 23;
  const Activation silu_act = Activation::kSilu;
  for (const Activation* act : {&silu_act, static_cast<const Activation*>(nullptr)})
    for (bool bias : {true, false}) {
      INFO((act ? "silu" : "no activation") << (bias ? ", bias" : ", no bias"));
      const auto x = random_vector(S * I, 1), dy = random_vector(S * O, 4);
      std::vector<float> out[2], grad_x[2], grad_w[2], grad_b[2];
      for (int grouped = 0; grouped < 2; ++grouped) {
        Graph g;
        Tensor tx = g.new_tensor({S, I}, true);
        std::copy(x.begin(), x.end(), tx.data);
        std::vector<Tensor> w(G), b(G);
        for (int64_t e = 0; e < G; ++e) {
          w[size_t(e)] = g.new_tensor({O, I}, true);
          const auto we = random_vector(O * I, uint64_t(10 + e));
          std::copy(we.begin(), we.end(), w[size_t(e)].data);
          if (bias) {
            b[size_t(e)] = g.new_tensor({O}, true);
            const auto be = random_vector(O, uint64_t(20 + e));
            std::copy(be.begin(), be.end(), b[size_t(e)].data);
          }
        }
        Tensor y;
        if (grouped) {
          y = grouped_linear(g, tx, offsets, G, w.data(), b.data(), act);
        } else {  // each group alone, its rows gathered, the outputs put back in row order
          y = g.zeros({S, O}, true);
          for (int64_t e = 0; e < G; ++e) {
            const int64_t n = offsets[e + 1] - offsets[e];
            if (n == 0) continue;
            std::vector<int32_t> rows(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) rows[size_t(i)] = int32_t(offsets[e] + i);
            int32_t* kept = g.arena().alloc_ints(n);
            std::copy(rows.begin(), rows.end(), kept);
            Tensor xe = gather_rows(g, tx, kept, n);
            Tensor ye = act ? linear_act(g, xe, w[size_t(e)], b[size_t(e)], *act) : linear(g, xe, w[size_t(e)], b[size_t(e)]);
            Tensor ones = g.new_tensor({n}, false);
            std::fill(ones.data, ones.data + n, 1.f);
            int32_t* pos = g.arena().alloc_ints(n);
            for (int64_t i = 0; i < n; ++i) pos[i] = int32_t(i);
            index_add_weighted(g, y, ye, kept, ones, pos, n);
          }
        }
        out[grouped].assign(y.data, y.data + y.numel());
        g.backward_from(y, dy.data());
        grad_x[grouped].assign(tx.grad, tx.grad + tx.numel());
        grad_w[grouped].clear();
        grad_b[grouped].clear();
        for (int64_t e = 0; e < G; ++e) {
          grad_w[grouped].insert(grad_w[grouped].end(), w[size_t(e)].grad, w[size_t(e)].grad + O * I);
          if (bias) grad_b[grouped].insert(grad_b[grouped].end(), b[size_t(e)].grad, b[size_t(e)].grad + O);
        }
      }
      CHECK(out[0] == out[1]);
      CHECK(grad_x[0] == grad_x[1]);
      CHECK(grad_w[0] == grad_w[1]);
      CHECK(grad_b[0] == grad_b[1]);
    }
}

TEST_CASE("gather_row_groups is the groups' gather_rows, its backward adding the last group first", "[ops][grouped]") {
  // Three groups that share rows (a token routed to several experts), gradients already in x.
  const int32_t rows[9] = {0, 2, 5, 1, 2, 3, 0, 5, 6};
  const int32_t offsets[4] = {0, 3, 6, 9};
  const int64_t N = 7, C = 21;
  const auto x = random_vector(N * C, 1), dy = random_vector(9 * C, 2), dz = random_vector(N * C, 3);
  std::vector<float> out[2], grad_x[2];
  for (int grouped = 0; grouped < 2; ++grouped) {
    Graph g;
    Tensor tx = g.new_tensor({N, C}, true);
    std::copy(x.begin(), x.end(), tx.data);
    // z = 3x, recorded last, puts a gradient in x before the gathers' backward adds to it.
    Tensor y = g.zeros({9, C}, true);
    Tensor parts[3];
    if (grouped) {
      y = gather_row_groups(g, tx, rows, offsets, 3);
    } else {
      for (int e = 0; e < 3; ++e) parts[e] = gather_rows(g, tx, rows + offsets[e], offsets[e + 1] - offsets[e]);
      // Stitch the parts into y by a recorded copy, so that dy reaches them.
      g.record([=] {
        for (int e = 0; e < 3; ++e)
          for (int64_t i = 0; i < (offsets[e + 1] - offsets[e]) * C; ++i) parts[e].grad[i] += y.grad[offsets[e] * C + i];
      });
      for (int e = 0; e < 3; ++e) std::copy(parts[e].data, parts[e].data + parts[e].numel(), y.data + offsets[e] * C);
    }
    Tensor z = scale(g, tx, 3.f);
    const float* dzp = dz.data();
    g.record([=] {
      for (int64_t i = 0; i < N * C; ++i) z.grad[i] += dzp[i];
    });
    out[grouped].assign(y.data, y.data + y.numel());
    g.backward_from(y, dy.data());
    grad_x[grouped].assign(tx.grad, tx.grad + tx.numel());
  }
  CHECK(out[0] == out[1]);
  CHECK(grad_x[0] == grad_x[1]);
  // The order the backward adds in: each row's sources, the last group first.
  int32_t start[N + 1], src[9];
  rows_by_target(start, src, rows, offsets, 3, N);
  const std::vector<std::vector<int32_t>> want = {{6, 0}, {3}, {4, 1}, {5}, {}, {7, 2}, {8}};
  for (int64_t t = 0; t < N; ++t) CHECK(std::vector<int32_t>(src + start[t], src + start[t + 1]) == want[size_t(t)]);
}

TEST_CASE("exp_floats gives exp_float's bits and std::exp's within one ulp", "[ops][exp]") {
  std::vector<float> x = random_vector(1001, 21, -110.f, 95.f);
  for (float v : {0.f, -0.f, 1e-30f, -1e-30f, 1e-45f, 88.f, 88.8f, -87.5f, -103.5f, -104.f, -150.f, 89.f})
    x.push_back(v);
  for (float v : {INFINITY, -INFINITY, NAN}) x.push_back(v);
  std::vector<float> y(x.size()), inplace = x;
  exp_floats(x.data(), y.data(), int64_t(x.size()));
  exp_floats(inplace.data(), inplace.data(), int64_t(inplace.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i]);
    const float one = exp_float(x[i]), libm = std::exp(x[i]);
    if (std::isnan(libm)) {
      REQUIRE(std::isnan(y[i]));
      continue;
    }
    REQUIRE(std::memcmp(&one, &y[i], sizeof one) == 0);
    REQUIRE(std::memcmp(&one, &inplace[i], sizeof one) == 0);
    // Within one ulp of the C library's expf (on glibc with FMA, the same bits).
    REQUIRE((y[i] == libm || std::nextafter(y[i], INFINITY) == libm || std::nextafter(y[i], -INFINITY) == libm));
  }
}

TEST_CASE("log1p_floats and softplus_floats give the C library's log1pf and act::softplus", "[ops][exp]") {
  // Log-uniform over [1e-12, 1e9), and every branch's edges: tiny, below and above 0.41422,
  // 1 + x a power of two (1, 3, 7), 2^53 and beyond, negative, -1, inf, NaN.
  std::vector<float> x = random_vector(200000, 22, -27.6f, 20.8f);
  for (float& v : x) v = std::exp(v);
  for (float v : {0.f, -0.f, 1e-45f, 1e-30f, 0x1p-54f, 0x1.2p-54f, 0x1p-29f, 0x1.1p-29f, 1e-10f, 0.41f, 0.41421f,
                  0.41422f, 0.4143f, 0.5f, 1.f, 3.f, 7.f, 1023.f, 16777215.f, 1e8f, 0x1.fffffep52f, 0x1p53f, 1e20f,
                  -0.25f, -0.5f, -1.f, -2.f, INFINITY, -INFINITY, NAN})
    x.push_back(v);
  std::vector<float> y(x.size()), inplace = x;
  log1p_floats(x.data(), y.data(), int64_t(x.size()));
  log1p_floats(inplace.data(), inplace.data(), int64_t(inplace.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i]);
    const float libm = std::log1p(x[i]);
    if (std::isnan(libm)) {
      REQUIRE((std::isnan(y[i]) && std::isnan(inplace[i])));
      continue;
    }
    REQUIRE(std::memcmp(&y[i], &inplace[i], sizeof libm) == 0);
    REQUIRE((y[i] == libm || std::nextafter(y[i], INFINITY) == libm || std::nextafter(y[i], -INFINITY) == libm));
#if defined(__GLIBC__) && __GLIBC__ == 2 && __GLIBC_MINOR__ == 36
    REQUIRE(std::memcmp(&y[i], &libm, sizeof libm) == 0);  // glibc 2.36's algorithm, its bits
#endif
  }
  // softplus over [-30, 30] and its threshold.
  std::vector<float> v = random_vector(3000, 23, -30.f, 30.f);
  for (float t : {20.f, std::nextafter(20.f, 0.f), std::nextafter(20.f, 30.f), -88.f, -104.f, 0.f}) v.push_back(t);
  std::vector<float> sp(v.size());
  softplus_floats(v.data(), sp.data(), int64_t(v.size()));
  for (size_t i = 0; i < v.size(); ++i) {
    INFO("v = " << v[i]);
    const float one = act::softplus(v[i]);
#if defined(__GLIBC__) && __GLIBC__ == 2 && __GLIBC_MINOR__ == 36
    REQUIRE(std::memcmp(&one, &sp[i], sizeof one) == 0);
#else
    REQUIRE(sp[i] == Approx(one).epsilon(1e-6));
#endif
  }
}

TEST_CASE("layernorm kernels give every row the bits it gets alone", "[ops][layernorm]") {
  // 19 rows: two blocks of eight side by side and three rows alone; C = 37.
  const int64_t N = 19, C = 37;
  const auto x = random_vector(N * C, 31, -2.f, 3.f), w = random_vector(C, 32), b = random_vector(C, 33),
             dy = random_vector(N * C, 34);
  std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C, 0.5f);
  layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);
  layernorm_backward(dx.data(), nullptr, nullptr, dy.data(), x.data(), w.data(), mean.data(), rstd.data(), N, C);
  for (int64_t n = 0; n < N; ++n) {
    INFO("row " << n);
    std::vector<float> y1(C), dx1(C, 0.5f);
    float m1, r1;
    layernorm_forward(y1.data(), &m1, &r1, x.data() + n * C, w.data(), b.data(), 1, C, 1e-5f);
    layernorm_backward(dx1.data(), nullptr, nullptr, dy.data() + n * C, x.data() + n * C, w.data(), &m1, &r1, 1, C);
    REQUIRE(std::memcmp(&m1, &mean[size_t(n)], sizeof m1) == 0);
    REQUIRE(std::memcmp(&r1, &rstd[size_t(n)], sizeof r1) == 0);
    REQUIRE(std::memcmp(y1.data(), y.data() + n * C, sizeof(float) * size_t(C)) == 0);
    REQUIRE(std::memcmp(dx1.data(), dx.data() + n * C, sizeof(float) * size_t(C)) == 0);
  }
}

TEST_CASE("scatter_add_weighted adds every row in index order, for any thread count, by target or not",
          "[ops][routing]") {
  for (int64_t C : {37, 128}) {
    const int64_t n = 700, tokens = 300;
    INFO("C " << C);
    const auto h = random_vector(n * C, 41), gates = random_vector(2 * tokens, 42);
    std::vector<int32_t> rows(n), gate_pos(n);
    for (int64_t i = 0; i < n; ++i) {
      rows[size_t(i)] = int32_t((i * 7) % tokens);  // every token several times, out of order
      gate_pos[size_t(i)] = int32_t((i * 5) % (2 * tokens));
    }
    const auto start = random_vector(tokens * C, 43);
    std::vector<float> want = start;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c)
        want[size_t(rows[size_t(i)] * C + c)] += gates[size_t(gate_pos[size_t(i)])] * h[size_t(i * C + c)];
    // The rows by target: each token's slots in index order.
    std::vector<int32_t> by_start(tokens + 1), by_src(n);
    const int32_t one_group[2] = {0, int32_t(n)};
    const RowsByTarget by = rows_by_target(by_start.data(), by_src.data(), rows.data(), one_group, 1, tokens);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int32_t> want_src;
      for (int64_t i = 0; i < n; ++i)
        if (rows[size_t(i)] == t) want_src.push_back(int32_t(i));
      REQUIRE(std::vector<int32_t>(by_src.begin() + by.start[t], by_src.begin() + by.start[t + 1]) == want_src);
    }
    const int saved = omp_get_max_threads();
    for (int threads : {1, 2, 3})
      for (const RowsByTarget* b : {static_cast<const RowsByTarget*>(nullptr), &by}) {
        INFO("threads " << threads << (b ? ", by target" : ", one thread"));
        omp_set_num_threads(threads);
        std::vector<float> got = start;
        scatter_add_weighted(got.data(), h.data(), rows.data(), gates.data(), gate_pos.data(), n, C, b);
        REQUIRE(std::memcmp(got.data(), want.data(), sizeof(float) * want.size()) == 0);
      }
    omp_set_num_threads(saved);
  }
}

TEST_CASE("bit masks: a relu output packed and unpacked exactly, dropout factors, both ways", "[ops][relu]") {
  // Bit for bit, empty vectors too (whose data() may be null, which memcmp must not get).
  const auto same = [](const std::vector<float>& u, const std::vector<float>& v) {
    return u.size() == v.size() && (u.empty() || std::memcmp(u.data(), v.data(), sizeof(float) * u.size()) == 0);
  };
  for (int64_t n : {0, 5, 16, 37, 512 * 3}) {
    INFO("n = " << n);
    std::vector<float> x = random_vector(n, 7, -1.f, 1.f);
    for (float& v : x) v = act::relu(v);  // > 0 or +0
    if (n > 3) x[3] = 1e-40f;             // a subnormal is positive too
    int64_t positive = 0;
    for (float v : x) positive += v > 0.f;
    const int64_t words = bit_words(n);
    for (int portable = 0; portable < 2; ++portable) {
      INFO((portable ? "portable" : "dispatched"));
      std::vector<uint16_t> bits(size_t(words), 0xFFFF);
      std::vector<float> values(size_t(positive + 16), -7.f), back(size_t(n), -7.f);
      const int64_t count = portable ? detail::positive_bits_scalar(bits.data(), x.data(), n)
                                     : positive_bits(bits.data(), x.data(), n);
      CHECK(count == positive);
      for (int64_t i = 0; i < words * 16; ++i)
        REQUIRE(bool(bits[size_t(i / 16)] >> (i % 16) & 1u) == (i < n && x[size_t(i)] > 0.f));
      if (portable)
        detail::pack_positive_scalar(values.data(), bits.data(), x.data(), n);
      else
        pack_positive(values.data(), bits.data(), x.data(), n);
      int64_t k = 0;
      for (float v : x)
        if (v > 0.f) REQUIRE(values[size_t(k++)] == v);
      if (portable)
        detail::unpack_positive_scalar(back.data(), bits.data(), values.data(), n);
      else
        unpack_positive(back.data(), bits.data(), values.data(), n);
      REQUIRE(same(back, x));  // +0 where not positive
      // relu's derivative from the bits: d·1 or d·0, signs of zero included.
      std::vector<float> d = random_vector(n, 8, -1.f, 1.f), want = d;
      for (int64_t i = 0; i < n; ++i) want[size_t(i)] *= act::relu_grad(x[size_t(i)]);
      if (portable)
        detail::scale_by_bits_scalar(d.data(), d.data(), bits.data(), 1.f, n);
      else
        scale_by_bits(d.data(), d.data(), bits.data(), 1.f, n);
      REQUIRE(same(d, want));
      // Dropout's factors from a mask of bytes made bits: x · (kept ? s : 0), and dx + dy · that
      // rounded once.
      std::vector<uint8_t> kept(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) kept[size_t(i)] = uint8_t(d[size_t(i)] > 0.1f);
      std::vector<uint16_t> mask(size_t(words), 0xFFFF);
      if (portable)
        detail::bits_from_bytes_scalar(mask.data(), kept.data(), n);
      else
        bits_from_bytes(mask.data(), kept.data(), n);
      for (int64_t i = 0; i < words * 16; ++i) REQUIRE(bit_at(mask.data(), i) == (i < n && kept[size_t(i)]));
      if (!portable && n > 0) {  // and back to bytes from any entry (3 words of room after the mask)
        std::vector<uint16_t> roomy(mask);
        roomy.resize(roomy.size() + 3, 0);
        std::vector<uint8_t> back(static_cast<size_t>(n + 32), 9);
        for (int64_t first : {int64_t(0), n / 3, n - 1}) {
          bytes_from_bits(back.data(), roomy.data(), first, n - first);
          REQUIRE(std::equal(back.begin(), back.begin() + (n - first), kept.begin() + first));
        }
      }
      const std::vector<float> dy = random_vector(n, 9, -1.f, 1.f);
      std::vector<float> y(static_cast<size_t>(n)), dx = random_vector(n, 10, -1.f, 1.f), y_want(static_cast<size_t>(n)), dx_want = dx;
      for (int64_t i = 0; i < n; ++i) {
        const float f = dropout_factor(kept[size_t(i)], 1.25f);
        y_want[size_t(i)] = x[size_t(i)] * f;
        dx_want[size_t(i)] = std::fma(dy[size_t(i)], f, dx[size_t(i)]);
      }
      if (portable) {
        detail::scale_by_bits_scalar(y.data(), x.data(), mask.data(), 1.25f, n);
        detail::add_scaled_by_bits_scalar(dx.data(), dy.data(), mask.data(), 1.25f, n);
      } else {
        scale_by_bits(y.data(), x.data(), mask.data(), 1.25f, n);
        add_scaled_by_bits(dx.data(), dy.data(), mask.data(), 1.25f, n);
      }
      REQUIRE(same(y, y_want));
      REQUIRE(same(dx, dx_want));
    }
  }
}
