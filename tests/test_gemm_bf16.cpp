// The bf16 GEMM (training.precision "bf16"): the rounding to bf16, each kernel against the
// reference (inputs rounded to bf16, products summed in double) in every form on odd shapes,
// the emulated kernel against VDPBF16PS bit for bit (on CPUs with AVX512-BF16), thread-count
// determinism, gemm_bf16_bias, and the MOE_BF16_KERNEL choice.
#include <catch2/catch.hpp>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "gradcheck.hpp"
#include "moe/kernels/gemm_bf16.hpp"

using namespace moe;
using test::random_vector;

namespace {

std::vector<Bf16Kernel> runnable_bf16_kernels() {
  std::vector<Bf16Kernel> ks{Bf16Kernel::emulated};
  if (cpu_has_avx512_bf16()) ks.push_back(Bf16Kernel::avx512bf16);
  return ks;
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Odd sizes around the 12x32 tile, 96-row blocks and odd K (a padded last pair).
constexpr std::array<std::array<int64_t, 3>, 14> kSizes{{{1, 1, 1},
                                                         {11, 31, 3},
                                                         {12, 32, 2},
                                                         {13, 33, 1},
                                                         {25, 65, 40},
                                                         {96, 47, 9},
                                                         {97, 40, 17},
                                                         {5, 15, 257},
                                                         {101, 70, 131},
                                                         {193, 21, 64},
                                                         {1, 300, 5},
                                                         {3, 1, 7},
                                                         {7, 100, 33},
                                                         {40, 129, 200}}};

}  // namespace

TEST_CASE("to_bf16 rounds to nearest even, flushes denormals, quiets NaN", "[gemm_bf16]") {
  CHECK(to_bf16(1.f) == 0x3f80);
  CHECK(to_bf16(from_bits(0x3f808000)) == 0x3f80);  // a tie: to the even 0x3f80
  CHECK(to_bf16(from_bits(0x3f818000)) == 0x3f82);  // a tie: to the even 0x3f82
  CHECK(to_bf16(from_bits(0x3f808001)) == 0x3f81);
  CHECK(to_bf16(from_bits(0x3f807fff)) == 0x3f80);
  CHECK(to_bf16(-2.5f) == 0xc020);
  CHECK(to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up to infinity
  CHECK(to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(to_bf16(from_bits(0x00000001)) == 0x0000);  // denormals: zeros of their sign
  CHECK(to_bf16(from_bits(0x807fffff)) == 0x8000);
  CHECK(to_bf16(-0.f) == 0x8000);
  CHECK(to_bf16(from_bits(0x7f800001)) == 0x7fc0);  // a signalling NaN comes back quiet
  CHECK(from_bf16(0x3f80) == 1.f);
  for (float x : random_vector(1000, 11, -100.f, 100.f)) {
    const float r = from_bf16(to_bf16(x));
    CHECK(std::fabs(r - x) <= std::ldexp(std::fabs(x), -8));  // half an ulp of 8 bits
  }
}

TEST_CASE("gemm_bf16 kernels match the reference: all transposes, odd sizes, ld > width, beta", "[gemm_bf16]") {
  for (Bf16Kernel kern : runnable_bf16_kernels())
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (auto [M, N, K] : kSizes)
          for (float beta : {0.f, 1.f, 0.5f}) {
            const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
            const auto A = random_vector((ta ? K : M) * lda, uint64_t(M * 7 + K));
            const auto B = random_vector((tb ? N : K) * ldb, uint64_t(N * 5 + K));
            auto C = random_vector(M * ldc, 3), R = C;
            if (beta == 0.f)
              for (int64_t i = 0; i < M; ++i) C[size_t(i * ldc)] = std::numeric_limits<float>::quiet_NaN();
            gemm_bf16(kern, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
            gemm_bf16_reference(ta, tb, M, N, K, A.data(), lda, B.data(), ldb, beta, R.data(), ldc);
            INFO(bf16_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K
                                        << " beta " << beta);
            // An fp32 sum of K + 1 terms is within (K + 1)·2^-24 of Σ|terms| of the exact one;
            // the inputs are bf16 on both sides, so nothing else differs.
            double worst = 0;
            for (int64_t i = 0; i < M; ++i)
              for (int64_t j = 0; j < N; ++j) {
                double mag = std::fabs(beta == 0.f ? 0.0 : double(beta) * 1.0);
                for (int64_t k = 0; k < K; ++k) {
                  const float a = ta ? A[size_t(k * lda + i)] : A[size_t(i * lda + k)];
                  const float b = tb ? B[size_t(j * ldb + k)] : B[size_t(k * ldb + j)];
                  mag += std::fabs(double(from_bf16(to_bf16(a))) * double(from_bf16(to_bf16(b))));
                }
                const double err = std::fabs(double(C[size_t(i * ldc + j)]) - double(R[size_t(i * ldc + j)]));
                REQUIRE(err <= double(K + 2) * std::ldexp(mag, -24) + 1e-30);
                worst = std::max(worst, err);
              }
            // ldc's spare column is never written.
            for (int64_t i = 0; i < M; ++i) REQUIRE(bits(C[size_t(i * ldc + N)]) == bits(R[size_t(i * ldc + N)]));
          }
}

TEST_CASE("gemm_bf16: the emulated kernel gives the bits of VDPBF16PS", "[gemm_bf16]") {
  if (!cpu_has_avx512_bf16()) {
    WARN("this CPU lacks AVX512-BF16: emulated == avx512bf16 not checked (the emulated kernel runs alone)");
    return;
  }
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [M, N, K] : kSizes) {
        const int64_t lda = ta ? M : K, ldb = tb ? K : N;
        // Wide ranges, so that sums cancel and round often; a few denormals, zeros and huge values.
        auto A = random_vector(M * K, uint64_t(M + 17 * K), -1e3f, 1e3f);
        auto B = random_vector(K * N, uint64_t(N + 3 * K), -1e-3f, 1e-3f);
        A[0] = from_bits(0x00012345), B[0] = -0.f;
        if (A.size() > 2) A[2] = 3e38f;
        auto bias = random_vector(N, 5);
        bias[0] = from_bits(0x80000010);  // a denormal start: read as -0
        std::vector<float> c1(size_t(M * N)), c2(c1.size());
        for (bool relu : {false, true}) {
          gemm_bf16_bias(Bf16Kernel::emulated, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, bias.data(), c1.data(),
                         N, relu);
          gemm_bf16_bias(Bf16Kernel::avx512bf16, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, bias.data(),
                         c2.data(), N, relu);
          INFO("ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K << " relu " << relu);
          REQUIRE(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
        }
        // Sums that fall below 2^-126 on the way: products of 1e-20 and 1e-19 cancelling.
        std::vector<float> tinyA(size_t(M * K)), tinyB(size_t(K * N));
        for (size_t i = 0; i < tinyA.size(); ++i) tinyA[i] = (i % 3 ? 1e-20f : -1.3e-20f) * float(1 + i % 5);
        for (size_t i = 0; i < tinyB.size(); ++i) tinyB[i] = (i % 2 ? 1e-19f : -0.7e-19f) * float(1 + i % 7);
        gemm_bf16(Bf16Kernel::emulated, ta, tb, M, N, K, tinyA.data(), lda, tinyB.data(), ldb, 0.f, c1.data(), N);
        gemm_bf16(Bf16Kernel::avx512bf16, ta, tb, M, N, K, tinyA.data(), lda, tinyB.data(), ldb, 0.f, c2.data(), N);
        INFO("tiny values: ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K);
        REQUIRE(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
      }
}

TEST_CASE("gemm_bf16 gives the same bits on 1 and 2 threads, in every form and kernel", "[gemm_bf16]") {
  const int saved = omp_get_max_threads();
  for (Bf16Kernel kern : runnable_bf16_kernels())
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (auto [M, N, K] : {std::array<int64_t, 3>{300, 200, 301}, {20, 500, 300}, {1, 700, 300}}) {
          const int64_t lda = ta ? M : K, ldb = tb ? K : N;
          const auto A = random_vector(M * K, 1), B = random_vector(K * N, 2);
          std::vector<std::vector<float>> out;
          for (int threads : {1, 2}) {
            omp_set_num_threads(threads);
            out.push_back(random_vector(M * N, 3));
            gemm_bf16(kern, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, 1.f, out.back().data(), N);
          }
          INFO(bf16_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K);
          REQUIRE(std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)) == 0);
        }
  omp_set_num_threads(saved);
}

TEST_CASE("gemm_bf16_bias gives the bits of gemm_bf16 on C filled with the bias rows (then relu)", "[gemm_bf16]") {
  for (Bf16Kernel kern : runnable_bf16_kernels())
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (auto [M, N, K] : kSizes) {
          const int64_t lda = ta ? M : K, ldb = tb ? K : N;
          const auto A = random_vector(M * K, 8), B = random_vector(K * N, 9), bias = random_vector(N, 10);
          std::vector<float> want(size_t(M * N)), got(want.size(), std::numeric_limits<float>::quiet_NaN());
          for (int64_t i = 0; i < M; ++i) std::copy(bias.begin(), bias.end(), want.begin() + i * N);
          gemm_bf16(kern, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, 1.f, want.data(), N);
          for (bool relu : {false, true}) {
            gemm_bf16_bias(kern, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, bias.data(), got.data(), N, relu);
            INFO(bf16_kernel_name(kern) << " ta " << ta << " tb " << tb << " M " << M << " N " << N << " K " << K);
            for (size_t i = 0; i < want.size(); ++i)
              REQUIRE(bits(got[i]) == bits(relu ? (want[i] > 0.f ? want[i] : 0.f) : want[i]));
          }
        }
}

TEST_CASE("MOE_BF16_KERNEL chooses the bf16 kernel, avx512bf16 only where the CPU has it", "[gemm_bf16]") {
  CHECK(choose_bf16_kernel(nullptr, true) == Bf16Kernel::avx512bf16);
  CHECK(choose_bf16_kernel("", false) == Bf16Kernel::emulated);
  CHECK(choose_bf16_kernel("emulated", true) == Bf16Kernel::emulated);
  CHECK(choose_bf16_kernel("avx512bf16", true) == Bf16Kernel::avx512bf16);
  CHECK_THROWS_WITH(choose_bf16_kernel("avx512bf16", false), Catch::Contains("lacks AVX512-BF16"));
  CHECK_THROWS_WITH(choose_bf16_kernel("bf16", true), Catch::Contains("emulated or avx512bf16"));
}
