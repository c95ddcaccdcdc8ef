// The GEMM kernels chosen at run time: each one (portable and, when the CPU has them, avx2
// and avx512) against the reference loop on every form and edge size, thread-count
// determinism, avx512 == avx2 bit for bit, and the MOE_GEMM_KERNEL choice.
#include <catch2/catch.hpp>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli_util.hpp"
#include "gradcheck.hpp"
#include "moe/kernels/gemm.hpp"

using namespace moe;
using test::random_vector;

namespace {

// The kernels this CPU can run: avx2 and avx512 are tested wherever the CPU has them, the
// portable one everywhere.
std::vector<GemmKernel> runnable_kernels() {
  std::vector<GemmKernel> ks{GemmKernel::portable};
  if (gemm_cpu_has_avx2()) ks.push_back(GemmKernel::avx2);
  if (gemm_cpu_has_avx512()) ks.push_back(GemmKernel::avx512);
  return ks;
}

// Sizes around the blocking: tiles of MR x NR = 6x16 (portable, avx2) or 12x32 (avx512),
// KC = 256 deep, MC = 96 rows per task.
constexpr std::array<std::array<int64_t, 3>, 19> kSizes{{{1, 1, 1},
                                                         {11, 31, 3},
                                                         {12, 32, 1},
                                                         {25, 65, 40},
                                                         {24, 64, 256},
                                                         {96, 47, 9},
                                                         {2, 3, 1},
                                                         {6, 16, 1},
                                                         {7, 17, 5},
                                                         {5, 15, 256},
                                                         {13, 33, 257},
                                                         {12, 32, 300},
                                                         {97, 40, 17},
                                                         {101, 70, 513},
                                                         {193, 21, 64},
                                                         {1, 40, 300},
                                                         {1, 300, 5},
                                                         {1, 513, 130},
                                                         {3, 1, 7}}};

}  // namespace

TEST_CASE("gemm kernels match the reference: all transposes, edge sizes, ld > width, alpha and beta",
          "[gemm]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (GemmKernel kern : runnable_kernels())
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (auto [M, N, K] : kSizes)
          for (float beta : {0.f, 1.f, -0.75f})
            for (float alpha : {1.f, 0.5f}) {
              // Leading dimensions wider than the matrices; the gaps hold NaN and must stay
              // unread (A, B) and untouched (C).
              const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 7;
              const int64_t a_rows = ta ? K : M, b_rows = tb ? N : K;
              auto A = random_vector(a_rows * lda, 1), B = random_vector(b_rows * ldb, 2);
              auto C0 = random_vector(M * ldc, 3);
              for (int64_t r = 0; r < a_rows; ++r)
                for (int64_t c = (ta ? M : K); c < lda; ++c) A[size_t(r * lda + c)] = nan;
              for (int64_t r = 0; r < b_rows; ++r)
                for (int64_t c = (tb ? K : N); c < ldb; ++c) B[size_t(r * ldb + c)] = nan;
              for (int64_t i = 0; i < M; ++i) {
                for (int64_t j = N; j < ldc; ++j) C0[size_t(i * ldc + j)] = 123.f;
                if (beta == 0.f)  // beta 0 must not read C
                  for (int64_t j = 0; j < N; ++j) C0[size_t(i * ldc + j)] = nan;
              }
              std::vector<float> C = C0, R = C0;
              gemm(kern, ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
              gemm_reference(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, R.data(), ldc);
              double d = 0;
              bool gaps_kept = true;
              for (int64_t i = 0; i < M; ++i) {
                for (int64_t j = 0; j < N; ++j) {
                  const float c = C[size_t(i * ldc + j)], r = R[size_t(i * ldc + j)];
                  d = std::max(d, std::isfinite(c) ? double(std::fabs(c - r)) : 1e30);
                }
                for (int64_t j = N; j < ldc; ++j) gaps_kept = gaps_kept && C[size_t(i * ldc + j)] == 123.f;
              }
              INFO(gemm_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K
                                          << " alpha " << alpha << " beta " << beta << " max diff " << d);
              REQUIRE(d < 1e-6 * double(K) + 1e-5);
              REQUIRE(gaps_kept);
            }
}

TEST_CASE("gemm kernels: K = 0 or alpha = 0 only scale C by beta", "[gemm]") {
  for (GemmKernel kern : runnable_kernels())
    for (auto [K, alpha] : {std::pair<int64_t, float>{0, 1.f}, {9, 0.f}}) {
      const int64_t M = 7, N = 19;
      auto A = random_vector(M * 9, 1), B = random_vector(9 * N, 2), C0 = random_vector(M * N, 3);
      std::vector<float> C = C0;
      gemm(kern, false, false, M, N, K, alpha, A.data(), 9, B.data(), N, 0.5f, C.data(), N);
      for (size_t i = 0; i < C.size(); ++i) REQUIRE(C[i] == 0.5f * C0[i]);
    }
}

TEST_CASE("gemm kernels give the same bits on 1 and 2 threads, in every form", "[gemm]") {
  const int saved = omp_get_max_threads();
  for (GemmKernel kern : runnable_kernels())
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        // Row blocks only, column groups (few rows), and the one-row path.
        for (auto [M, N, K] : {std::array<int64_t, 3>{300, 200, 600}, {20, 500, 300}, {1, 700, 300}}) {
          const int64_t lda = ta ? M : K, ldb = tb ? K : N;
          auto A = random_vector(M * K, 1), B = random_vector(K * N, 2);
          std::vector<std::vector<float>> out;
          for (int threads : {1, 2}) {
            omp_set_num_threads(threads);
            out.push_back(random_vector(M * N, 3));
            gemm(kern, ta, tb, M, N, K, 1.f, A.data(), lda, B.data(), ldb, 0.25f, out.back().data(), N);
          }
          INFO(gemm_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K);
          REQUIRE(std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)) == 0);
        }
  omp_set_num_threads(saved);
}

TEST_CASE("gemm and gemv: avx512 gives the same bits as avx2 on random shapes, forms, alpha and beta", "[gemm]") {
  if (!gemm_cpu_has_avx512()) {
    WARN("this CPU lacks AVX-512: avx512 == avx2 not checked");
    return;
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> small(1, 80), deep(1, 700);
  for (int trial = 0; trial < 200; ++trial) {
    const bool ta = trial & 1, tb = trial & 2;
    // Every tenth call one row, else up to 80 x 80, up to 700 deep.
    const int64_t M = trial % 10 == 0 ? 1 : small(rng), N = small(rng), K = deep(rng);
    const float alpha = trial % 3 == 0 ? 1.f : 0.37f, beta = trial % 4 == 0 ? 0.f : (trial % 4 == 1 ? 1.f : -0.6f);
    const int64_t lda = (ta ? M : K) + trial % 3, ldb = (tb ? K : N) + trial % 5, ldc = N + trial % 2;
    auto A = random_vector((ta ? K : M) * lda, uint64_t(trial) + 1);
    auto B = random_vector((tb ? N : K) * ldb, uint64_t(trial) + 1000);
    auto C2 = random_vector(M * ldc, uint64_t(trial) + 2000), C5 = C2;
    gemm(GemmKernel::avx2, ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C2.data(), ldc);
    gemm(GemmKernel::avx512, ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C5.data(), ldc);
    INFO("ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K << " alpha " << alpha << " beta "
               << beta);
    REQUIRE(std::memcmp(C2.data(), C5.data(), C2.size() * sizeof(float)) == 0);
    // gemv on A's first K values, up to 1120 columns (more than one call of accumulated rows).
    const int64_t Nv = 14 * N, ldv = (tb ? K : Nv) + trial % 5;
    auto Bv = random_vector((tb ? Nv : K) * ldv, uint64_t(trial) + 3000);
    auto v2 = random_vector(Nv, uint64_t(trial) + 4000), v5 = v2;
    gemv(GemmKernel::avx2, tb, Nv, K, alpha, A.data(), Bv.data(), ldv, beta, v2.data());
    gemv(GemmKernel::avx512, tb, Nv, K, alpha, A.data(), Bv.data(), ldv, beta, v5.data());
    REQUIRE(std::memcmp(v2.data(), v5.data(), v2.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("gemm computes each row of C as it computes that row alone, in every form and kernel", "[gemm]") {
  // What lets evaluation batch several forwards into one: a row's bits do not depend on M.
  std::mt19937 rng(11);
  std::uniform_int_distribution<int64_t> rows(2, 40), small(1, 70), deep(1, 600);
  for (GemmKernel kern : runnable_kernels())
    for (int trial = 0; trial < 40; ++trial) {
      const bool ta = trial & 1, tb = trial & 2;
      const int64_t M = rows(rng), N = small(rng), K = trial % 5 == 0 ? 300 + deep(rng) : deep(rng);
      const float alpha = trial % 3 == 0 ? 1.f : 0.37f, beta = trial % 4 == 0 ? 0.f : (trial % 4 == 1 ? 1.f : -0.6f);
      const int64_t lda = ta ? M : K, ldb = tb ? K : N;
      auto A = random_vector((ta ? K : M) * lda, uint64_t(trial) + 1);
      auto B = random_vector((tb ? N : K) * ldb, uint64_t(trial) + 1000);
      auto C = random_vector(M * N, uint64_t(trial) + 2000), C0 = C;
      gemm(kern, ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), N);
      for (int64_t i : {int64_t(0), M / 2, M - 1}) {
        std::vector<float> row(C0.begin() + i * N, C0.begin() + (i + 1) * N);
        // Row i of op(A) alone: for Aᵀ stored, column i of A with stride lda.
        gemm(kern, ta, tb, 1, N, K, alpha, ta ? A.data() + i : A.data() + i * lda, lda, B.data(), ldb, beta,
             row.data(), N);
        INFO("kernel " << gemm_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N
                       << " K " << K << " row " << i);
        REQUIRE(std::memcmp(row.data(), C.data() + i * N, sizeof(float) * size_t(N)) == 0);
      }
    }
}

TEST_CASE("gemm_bias gives the bits of gemm on C filled with the bias rows (then relu), in every form and kernel",
          "[gemm]") {
  for (GemmKernel k : runnable_kernels())
    for (const auto& [M, N, K] : kSizes)
      for (int form = 0; form < 8; ++form) {
        const bool ta = form & 1, tb = form & 2, relu = form & 4;
        INFO(gemm_kernel_name(k) << " M=" << M << " N=" << N << " K=" << K << " ta=" << ta << " tb=" << tb
                                 << " relu=" << relu);
        const int64_t ldc = N + 3;
        const auto A = random_vector(M * K, uint64_t(1 + M)), B = random_vector(K * N, uint64_t(2 + N)),
                   bias = random_vector(N, uint64_t(3 + K));
        std::vector<float> want(size_t(M * ldc), 7.f), got(want);
        for (int64_t i = 0; i < M; ++i) std::copy(bias.begin(), bias.end(), want.begin() + i * ldc);
        gemm(k, ta, tb, M, N, K, 1.f, A.data(), ta ? M : K, B.data(), tb ? K : N, 1.f, want.data(), ldc);
        if (relu)
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) {
              float& v = want[size_t(i * ldc + j)];
              v = v > 0.f ? v : 0.f;
            }
        gemm_bias(k, ta, tb, M, N, K, A.data(), ta ? M : K, B.data(), tb ? K : N, bias.data(), got.data(), ldc,
                  relu);
        REQUIRE(std::memcmp(want.data(), got.data(), sizeof(float) * want.size()) == 0);
      }
  // No products: C is the bias rows.
  const float bias[3] = {1.f, -2.f, 0.5f};
  std::vector<float> c(6, 9.f);
  gemm_bias(false, true, 2, 3, 0, nullptr, 1, nullptr, 1, bias, c.data(), 3);
  REQUIRE(c == std::vector<float>{1.f, -2.f, 0.5f, 1.f, -2.f, 0.5f});
}

TEST_CASE("gemv matches the reference on one row, B stored either way", "[gemm]") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int64_t> small(1, 300), deep(1, 600);
  for (GemmKernel kern : runnable_kernels())
    for (int trial = 0; trial < 30; ++trial) {
      const bool tb = trial & 1;
      const int64_t N = small(rng), K = deep(rng), ldb = (tb ? K : N) + trial % 3;
      const float alpha = trial % 3 == 0 ? 1.f : 0.37f, beta = trial % 4 == 0 ? 0.f : (trial % 4 == 1 ? 1.f : -0.6f);
      auto a = random_vector(K, uint64_t(trial) + 1);
      auto B = random_vector((tb ? N : K) * ldb, uint64_t(trial) + 1000);
      auto c = random_vector(N, uint64_t(trial) + 2000), ref = c;
      gemv(kern, tb, N, K, alpha, a.data(), B.data(), ldb, beta, c.data());
      gemm_reference(false, tb, 1, N, K, alpha, a.data(), K, B.data(), ldb, beta, ref.data(), N);
      for (int64_t j = 0; j < N; ++j) REQUIRE(c[size_t(j)] == Approx(ref[size_t(j)]).margin(1e-4));
    }
}

TEST_CASE("MOE_GEMM_KERNEL chooses the kernel, avx2 and avx512 only where the CPU has them", "[gemm]") {
  CHECK(choose_gemm_kernel(nullptr, true) == GemmKernel::avx2);
  CHECK(choose_gemm_kernel("", true) == GemmKernel::avx2);
  CHECK(choose_gemm_kernel(nullptr, true, true) == GemmKernel::avx512);
  CHECK(choose_gemm_kernel("", true, true) == GemmKernel::avx512);
  CHECK(choose_gemm_kernel(nullptr, false) == GemmKernel::portable);
  CHECK(choose_gemm_kernel("portable", true) == GemmKernel::portable);
  CHECK(choose_gemm_kernel("portable", true, true) == GemmKernel::portable);
  CHECK(choose_gemm_kernel("avx2", true) == GemmKernel::avx2);
  CHECK(choose_gemm_kernel("avx2", true, true) == GemmKernel::avx2);
  CHECK(choose_gemm_kernel("avx512", true, true) == GemmKernel::avx512);
  CHECK_THROWS_WITH(choose_gemm_kernel("avx2", false), Catch::Contains("lacks AVX2"));
  CHECK_THROWS_WITH(choose_gemm_kernel("avx512", true, false), Catch::Contains("lacks AVX-512"));
  CHECK_THROWS_WITH(choose_gemm_kernel("sse", true),
                    Catch::Contains("portable, avx2 or avx512") && Catch::Contains("'sse'"));
  CHECK(std::string(gemm_kernel_name(GemmKernel::avx512)) == "avx512");
  CHECK(std::string(gemm_kernel_name(GemmKernel::avx2)) == "avx2");
  CHECK(std::string(gemm_kernel_name(GemmKernel::portable)) == "portable");

  // moe bench reports the kernel it runs; a bad value is one clear error.
  const std::string cd = std::string("cd ") + MOE_SOURCE_DIR + " && ";
  const std::string args = "bench --config tests/fixtures/tiny_sweep.json --steps 1 --generate 0";
  moe_test::Run p = moe_test::run_moe(args + " --json", cd + "MOE_GEMM_KERNEL=portable");
  INFO(p.out);
  REQUIRE(p.code == 0);
  CHECK_THAT(p.out, Catch::Contains("\"gemm_kernel\":\"portable\""));
  moe_test::Run d = moe_test::run_moe(args, cd + "env -u MOE_GEMM_KERNEL");
  INFO(d.out);
  REQUIRE(d.code == 0);
  const char* widest = gemm_cpu_has_avx512() ? "avx512" : gemm_cpu_has_avx2() ? "avx2" : "portable";
  CHECK_THAT(d.out, Catch::Contains(std::string("gemm kernel ") + widest));
  if (gemm_cpu_has_avx512()) {
    moe_test::Run f = moe_test::run_moe(args + " --json", cd + "MOE_GEMM_KERNEL=avx2");
    INFO(f.out);
    REQUIRE(f.code == 0);
    CHECK_THAT(f.out, Catch::Contains("\"gemm_kernel\":\"avx2\""));
  } else {
    moe_test::Run f = moe_test::run_moe(args, cd + "MOE_GEMM_KERNEL=avx512");
    CHECK(f.code == 1);
    CHECK_THAT(f.out, Catch::Contains("lacks AVX-512"));
  }
  moe_test::Run bad = moe_test::run_moe(args, cd + "MOE_GEMM_KERNEL=fast");
  CHECK(bad.code == 1);
  CHECK_THAT(bad.out, Catch::Contains("MOE_GEMM_KERNEL must be portable, avx2 or avx512, got 'fast'"));
}

TEST_CASE("gemv on B stored [N, K] gives the bits of gemv on its transpose, in every kernel", "[gemm]") {
  // What lets the decoder run on a Linear's weight as it is stored: the same sums, one fma a
  // step in order, whichever way the rows come (tiles of 16 rows and 16 k, and their edges).
  std::mt19937 rng(13);
  std::uniform_int_distribution<int64_t> cols(1, 700), deep(1, 600);
  for (GemmKernel kern : runnable_kernels())
    for (int trial = 0; trial < 40; ++trial) {
      const int64_t N = trial < 4 ? 512 : cols(rng), K = trial < 4 ? 128 * (trial + 1) : deep(rng);
      const int64_t ldb = K + (trial % 3 == 0 ? 0 : trial % 5);
      const float alpha = trial % 3 == 0 ? 1.f : 0.37f, beta = trial % 4 == 0 ? 0.f : (trial % 4 == 1 ? 1.f : -0.6f);
      auto a = random_vector(K, uint64_t(trial) + 1);
      auto W = random_vector(N * ldb, uint64_t(trial) + 1000);  // [N, K], rows ldb apart
      std::vector<float> Wt(size_t(K * N));
      for (int64_t j = 0; j < N; ++j)
        for (int64_t k = 0; k < K; ++k) Wt[size_t(k * N + j)] = W[size_t(j * ldb + k)];
      auto rows = random_vector(N, uint64_t(trial) + 2000), axpy = rows;
      gemv(kern, true, N, K, alpha, a.data(), W.data(), ldb, beta, rows.data());
      gemv(kern, false, N, K, alpha, a.data(), Wt.data(), N, beta, axpy.data());
      INFO(gemm_kernel_name(kern) << " N " << N << " K " << K << " ldb " << ldb);
      REQUIRE(std::memcmp(rows.data(), axpy.data(), sizeof(float) * size_t(N)) == 0);
    }
}

TEST_CASE("gemv_skip_zeros gives gemv's bits on B [K, N], reading only the rows nonzeros multiply", "[gemm]") {
  // A relu's output (mostly zeros) times the next weight in the decode layout: skipping a zero
  // of a leaves every sum as it was. Odd sizes, every kernel, zeros of both signs, 0% to 100% zeros.
  std::mt19937 rng(17);
  std::uniform_int_distribution<int64_t> cols(1, 700), deep(1, 900);
  for (GemmKernel kern : runnable_kernels())
    for (int trial = 0; trial < 40; ++trial) {
      const int64_t N = trial < 4 ? 128 : cols(rng), K = trial < 4 ? 512 : deep(rng), ldb = N + trial % 3;
      const float alpha = trial % 3 == 0 ? 1.f : 0.37f, beta = trial % 4 == 0 ? 0.f : (trial % 4 == 1 ? 1.f : -0.6f);
      auto a = random_vector(K, uint64_t(trial) + 1);
      const int zeros_in_10 = trial % 11;  // 0..10 tenths of a are zero
      for (int64_t k = 0; k < K; ++k)
        if (int64_t(k * 7 + trial) % 10 < zeros_in_10) a[size_t(k)] = k % 2 ? 0.f : -0.f;
      auto B = random_vector(K * ldb, uint64_t(trial) + 1000);  // [K, N], rows ldb apart
      auto dense = random_vector(N, uint64_t(trial) + 2000), sparse = dense;
      gemv(kern, false, N, K, alpha, a.data(), B.data(), ldb, beta, dense.data());
      gemv_skip_zeros(kern, N, K, alpha, a.data(), B.data(), ldb, beta, sparse.data());
      INFO(gemm_kernel_name(kern) << " N " << N << " K " << K << " zeros " << zeros_in_10 << "/10");
      REQUIRE(std::memcmp(dense.data(), sparse.data(), sizeof(float) * size_t(N)) == 0);
    }
}
