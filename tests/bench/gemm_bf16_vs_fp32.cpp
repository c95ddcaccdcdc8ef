// bf16 against fp32 GEMM on the makemoe.json shapes and a wide one, time per call, one
// process, side by side (each shape: fp32, then bf16, 0.2 s each). Not part of the build:
//   g++ -O3 -march=x86-64-v3 -fopenmp -Iinclude tests/bench/gemm_bf16_vs_fp32.cpp build/libmoe_core.a \
//       -o /tmp/gemm_bf16_vs_fp32 && /tmp/gemm_bf16_vs_fp32 [THREADS]
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <vector>
#include <omp.h>
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/gemm_bf16.hpp"
using namespace moe;
int main(int argc, char** argv) {
  omp_set_num_threads(argc > 1 ? atoi(argv[1]) : 1);
  struct S { const char* name; bool ta, tb; int64_t M, N, K; };
  S shapes[] = {{"qkv fwd", 0, 1, 512, 384, 128}, {"qkv dW", 1, 0, 384, 128, 512}, {"qkv dX", 0, 0, 512, 128, 384},
                {"fc1 fwd", 0, 1, 128, 512, 128}, {"fc1 dW", 1, 0, 512, 128, 128}, {"fc1 dX", 0, 0, 128, 128, 512},
                {"fc2 fwd", 0, 1, 128, 128, 512}, {"fc2 dW", 1, 0, 128, 512, 128}, {"fc2 dX", 0, 0, 128, 512, 128},
                {"big fwd", 0, 1, 512, 2048, 512}, {"big dW", 1, 0, 2048, 512, 512}, {"big dX", 0, 0, 512, 512, 2048}};
  for (auto s : shapes) {
    std::vector<float> A(s.M * s.K + 64, 0.5f), B(s.K * s.N + 64, 0.25f), C(s.M * s.N, 0.f);
    const int64_t lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    double t[2];
    for (int v = 0; v < 2; ++v) {
      int reps = 0; auto t0 = std::chrono::steady_clock::now(); double el = 0;
      do {
        if (v == 0) gemm(s.ta, s.tb, s.M, s.N, s.K, 1.f, A.data(), lda, B.data(), ldb, 1.f, C.data(), s.N);
        else gemm_bf16(s.ta, s.tb, s.M, s.N, s.K, A.data(), lda, B.data(), ldb, 1.f, C.data(), s.N);
        ++reps; el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } while (el < 0.2);
      t[v] = el / reps * 1e6;
    }
    double fl = 2.0 * s.M * s.N * s.K;
    printf("%-8s %5ld %5ld %5ld  fp32 %8.1f us (%6.1f GF/s)  bf16 %8.1f us (%6.1f GF/s)  ratio %.2f\n", s.name, s.M, s.N, s.K,
           t[0], fl / t[0] / 1e3, t[1], fl / t[1] / 1e3, t[0] / t[1]);
  }
}
