// Tensor, arena, autograd tape, parameter store and random generator.
#include <catch2/catch.hpp>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "moe/kernels/vmath.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/params.hpp"
#include "moe/tensor/rng.hpp"

using namespace moe;

TEST_CASE("Shape reports sizes and rejects bad dimensions", "[core]") {
  Shape s{2, 3, 4};
  REQUIRE(s.numel() == 24);
  REQUIRE(s[-1] == 4);
  REQUIRE(s.str() == "[2, 3, 4]");
  REQUIRE_THROWS_WITH((Shape{1, 2, 3, 4, 5}), Catch::Contains("at most 4 dimensions"));
  REQUIRE_THROWS_WITH(s[3], Catch::Contains("out of range"));
  Tensor t;
  t.shape = s;
  REQUIRE_THROWS_WITH(t.view({5, 5}), Catch::Contains("cannot view [2, 3, 4] as [5, 5]"));
}

TEST_CASE("Arena reuses its memory after reset", "[core]") {
  Arena a(1024);
  float* p1 = a.alloc_floats(100);
  float* p2 = a.alloc_floats(1000);  // bigger than a chunk: gets its own
  REQUIRE(reinterpret_cast<uintptr_t>(p1) % 64 == 0);
  REQUIRE(reinterpret_cast<uintptr_t>(p2) % 64 == 0);
  size_t reserved = a.bytes_reserved();
  a.reset();
  REQUIRE(a.bytes_used() == 0);
  REQUIRE(a.alloc_floats(100) == p1);
  a.alloc_floats(1000);
  REQUIRE(a.bytes_reserved() == reserved);
}

TEST_CASE("Arena::release gives the pages back and keeps the chunks", "[core]") {
  Arena a(size_t(1) << 20);
  auto* p = static_cast<uint8_t*>(a.alloc_bytes(size_t(1) << 20));
  std::fill(p, p + (size_t(1) << 20), uint8_t(7));
  const size_t reserved = a.bytes_reserved();
#ifdef __linux__
  CHECK(a.bytes_resident() >= (size_t(1) << 20));
#endif
  a.release();
#ifdef __linux__
  CHECK(a.bytes_resident() <= 2 * 4096);  // at most the partial pages at the chunk's ends
#endif
  REQUIRE(a.bytes_used() == 0);
  REQUIRE(a.bytes_reserved() == reserved);
  auto* q = static_cast<uint8_t*>(a.alloc_bytes(size_t(1) << 20));
  REQUIRE(q == p);
#ifdef __linux__
  // The chunk's whole pages read as zeros again (dropped, then mapped afresh); 7s at most in
  // the partial pages at its ends.
  size_t sevens = 0;
  for (size_t i = 0; i < (size_t(1) << 20); ++i) sevens += q[i] == 7;
  CHECK(sevens <= 2 * 4096);
#endif
}

TEST_CASE("Graph records only in grad mode and starts its tensors' gradients from zero at each backward", "[core]") {
  Graph g;
  Tensor x = g.zeros({3}, true);
  int runs = 0;
  int* counter = &runs;
  auto record_double = [&](Tensor in) {
    Tensor out = g.output({3}, in);
    for (int i = 0; i < 3; ++i) out.data[i] = 2 * in.data[i];
    if (out.requires_grad())
      g.record([=] {
        ++*counter;
        for (int i = 0; i < 3; ++i) in.grad[i] += 2 * out.grad[i];
      });
    return out;
  };
  Tensor y = record_double(x);
  REQUIRE(y.requires_grad());
  REQUIRE(g.tape_size() == 1);
  float seed[3] = {1, 2, 3};
  g.backward_from(y, seed);
  REQUIRE(x.grad[0] == 2 * 1);
  x.grad[1] = 100;  // left over: the next backward zeroes it first
  g.backward_from(y, seed);
  REQUIRE(runs == 2);
  REQUIRE(x.grad[0] == 2 * 1);
  REQUIRE(x.grad[1] == 2 * 2);
  {
    NoGradGuard ng(g);
    Tensor z = record_double(x);
    REQUIRE_FALSE(z.requires_grad());
  }
  REQUIRE(g.grad_enabled());
  REQUIRE(g.tape_size() == 1);
  g.clear();
  REQUIRE(g.tape_size() == 0);
  Tensor scalar_no_grad = g.zeros({1}, false);
  REQUIRE_THROWS_WITH(g.backward(scalar_no_grad), Catch::Contains("does not track a gradient"));
}

TEST_CASE("ParamStore keeps named parameters in one block", "[core]") {
  ParamStore ps;
  int a = ps.add("a.weight", {3, 5});
  int b = ps.add("a.bias", {3}, false);
  REQUIRE_THROWS_WITH(ps.add("a.bias", {3}), Catch::Contains("duplicate"));
  ps.finalize();
  REQUIRE_THROWS(ps.add("late", {1}));
  Tensor ta = ps.get(a), tb = ps.get(b);
  REQUIRE(ta.data == ps.data());
  REQUIRE(tb.data == ps.data() + 16);  // 15 floats padded to a 64-byte boundary
  REQUIRE(tb.grad == ps.grad() + 16);
  REQUIRE(ps.find("a.bias") == b);
  REQUIRE(ps.find("nope") == -1);
  REQUIRE_FALSE(ps.info(b).decay);
  ta.grad[0] = 5;
  ps.zero_grad();
  REQUIRE(ta.grad[0] == 0);
}

TEST_CASE("Rng is deterministic, thread-count independent and restorable", "[core][rng]") {
  const int64_t n = 200000;  // above the parallel threshold
  std::vector<float> one(n), two(n);
  int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  Rng r1(42, 7);
  r1.fill_normal(one.data(), n);
  omp_set_num_threads(2);
  Rng r2(42, 7);
  r2.fill_normal(two.data(), n);
  omp_set_num_threads(saved);
  REQUIRE(std::memcmp(one.data(), two.data(), sizeof(float) * n) == 0);
  REQUIRE(r1.state().counter == uint64_t(n));
  // The fill (eight at a time) gives the bits of normal() one by one, with mean and stddev too.
  Rng r3(42, 7);
  for (int64_t i = 0; i < 1003; ++i) REQUIRE(one[size_t(i)] == r3.normal());
  std::vector<float> scaled(1003);
  Rng r4(42, 7), r5(42, 7);
  r4.fill_normal(scaled.data(), int64_t(scaled.size()), 0.5f, 3.f);
  for (float x : scaled) {
    const float z = r5.normal();
    REQUIRE(x == 0.5f + 3.f * z);
  }

  double m = 0, v = 0;
  for (float x : one) m += x;
  m /= n;
  for (float x : one) v += (x - m) * (x - m);
  v /= n;
  REQUIRE(std::abs(m) < 0.01);
  REQUIRE(std::abs(v - 1.0) < 0.02);

  Rng a(1, 0);
  a.uniform();
  RngState s = a.state();
  float next = a.uniform();
  Rng b(s);
  REQUIRE(b.uniform() == next);
  REQUIRE(Rng(1, 0).uniform() != Rng(1, 1).uniform());  // streams differ
  for (int i = 0; i < 1000; ++i) {
    float u = a.uniform();
    REQUIRE(u >= 0.f);
    REQUIRE(u < 1.f);
    REQUIRE(a.below(7) < 7);
  }
}

TEST_CASE("fill_uniform and fill_keep_mask (8 or 16 counters at a time) give the scalar generator's numbers",
          "[core][rng]") {
  // Odd lengths leave a scalar tail; a start just below 2^32 crosses into the counter's high
  // word; 70001 numbers are split among threads. Both vector widths where the CPU has them.
  std::vector<bool> widths{false};
  if (rng_avx512()) widths.push_back(true);
  const bool was = rng_avx512();
  for (bool wide : widths) {
    set_rng_avx512(wide);
    for (uint64_t start : {uint64_t(0), uint64_t(5), (uint64_t(1) << 32) - 3, (uint64_t(1) << 32) - 17}) {
      for (int64_t n : {int64_t(1), int64_t(8), int64_t(13), int64_t(31), int64_t(70001)}) {
        Rng bulk(RngState{99, 3, start}), masked(RngState{99, 3, start}), single(RngState{99, 3, start});
        std::vector<float> v(static_cast<size_t>(n));
        std::vector<uint8_t> keep(static_cast<size_t>(n), 7);
        bulk.fill_uniform(v.data(), n, -2.f, 3.f);
        masked.fill_keep_mask(keep.data(), n, 0.375f);
        for (int64_t i = 0; i < n; ++i) {
          const float u = single.uniform();
          const float expect = std::fma(5.f, u, -2.f);  // lo + (hi - lo)·u, rounded once
          if (v[size_t(i)] != expect || keep[size_t(i)] != uint8_t(u >= 0.375f)) {
            INFO("avx512 " << wide << " start " << start << " n " << n << " i " << i);
            REQUIRE(v[size_t(i)] == expect);
            REQUIRE(int(keep[size_t(i)]) == int(u >= 0.375f));
          }
        }
        REQUIRE(bulk.state().counter == single.state().counter);
        REQUIRE(masked.state().counter == single.state().counter);
      }
    }
  }
  set_rng_avx512(was);
}

TEST_CASE("log_doubles and cos_doubles are within their bounds of glibc's on every input fill_normal gives them",
          "[core][rng][kernels]") {
  // Every u1 = (k + 1)/(2^24 + 1) and every 2π·u2 = 2π·k/2^24 the generator can make: the bound
  // fill_normal's exactness rests on (it computes float(sqrt(-2 log u1)·cos 2π u2) with them
  // and falls back on glibc's where the bounds leave the float in doubt).
  if (!vmath_vectorized()) return;
  const int64_t K = int64_t(1) << 24, chunk = 1 << 16;
  const auto ulps = [](double mine, double theirs) {
    if (mine == theirs) return 0.0;
    const double t = std::fabs(theirs);
    return std::fabs(mine - theirs) / (std::nextafter(t, INFINITY) - t);
  };
  double worst_log = 0, worst_cos = 0;
#pragma omp parallel for schedule(static) reduction(max : worst_log, worst_cos)
  for (int64_t c0 = 0; c0 < K; c0 += chunk) {
    std::vector<double> u(chunk), a(chunk), l(chunk), co(chunk);
    for (int64_t j = 0; j < chunk; ++j) {
      const int64_t k = c0 + j;
      u[size_t(j)] = (double(k) + 1.0) / 16777217.0;
      a[size_t(j)] = 6.283185307179586 * (double(k) / 16777216.0);
    }
    log_doubles(u.data(), l.data(), chunk);
    cos_doubles(a.data(), co.data(), chunk);
    for (int64_t j = 0; j < chunk; ++j) {
      worst_log = std::max(worst_log, ulps(l[size_t(j)], std::log(u[size_t(j)])));
      worst_cos = std::max(worst_cos, ulps(co[size_t(j)], std::cos(a[size_t(j)])));
    }
  }
  INFO("worst log " << worst_log << " ulp, worst cos " << worst_cos << " ulp");
  CHECK(worst_log <= kLogDoublesUlps);
  CHECK(worst_cos <= kCosDoublesUlps);
  std::vector<double> ones{1.0, 1.0, 1.0, 1.0}, out(4, -1.0);
  log_doubles(ones.data(), out.data(), 4);
  CHECK(out[0] == 0.0);
}

TEST_CASE("fill_keep_mask_causal gives fill_keep_mask's lower triangles and advances as far", "[core][rng]") {
  // T = 1, 5 (a triangle short of a vector), 32 (makeMoE's: 528 numbers, whole vectors), 33;
  // 40 matrices of 32 are split among threads; starts across the counter's high word.
  std::vector<bool> widths{false};
  if (rng_avx512()) widths.push_back(true);
  const bool was = rng_avx512();
  for (bool wide : widths) {
    set_rng_avx512(wide);
    for (uint64_t start : {uint64_t(3), (uint64_t(1) << 32) - 700}) {
      for (const auto& [mats, T] : {std::pair<int64_t, int64_t>{3, 1}, {3, 5}, {40, 32}, {2, 33}}) {
        Rng full(RngState{7, 2, start}), causal(RngState{7, 2, start});
        std::vector<uint8_t> all(static_cast<size_t>(mats * T * T)), tri(static_cast<size_t>(mats * T * (T + 1) / 2), 7);
        full.fill_keep_mask(all.data(), mats * T * T, 0.25f);
        causal.fill_keep_mask_causal(tri.data(), mats, T, 0.25f);
        int64_t j = 0, wrong = 0;
        for (int64_t k = 0; k < mats; ++k)
          for (int64_t t = 0; t < T; ++t)
            for (int64_t c = 0; c <= t; ++c, ++j) wrong += tri[size_t(j)] != all[size_t((k * T + t) * T + c)];
        INFO("avx512 " << wide << " start " << start << " mats " << mats << " T " << T);
        REQUIRE(wrong == 0);
        REQUIRE(causal.state().counter == full.state().counter);
      }
    }
  }
  set_rng_avx512(was);
}
