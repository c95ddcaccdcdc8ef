// Google Benchmark of moe's GEMM on the shapes of configs/makemoe.json (B*T = 512 token rows,
// C = 128, 3C qkv, expert hidden 512, vocab 65, 8 experts top-2: about 128 rows per expert):
// the forward x·Wᵀ (A·Bᵀ), the backward dX = dY·W (A·B) and dW = dYᵀ·X (Aᵀ·B). Each shape
// runs moe's gemm with each kernel, the naive loop (gemm_reference, one thread) and, when
// built with it, OpenBLAS's cblas_sgemm (a yardstick: only this program links it), on 1 and
// 2 threads. The counter GFLOP/s is 2·M·N·K per call over wall time.
// Build: cmake -DMOE_BENCH=ON; run: scripts/bench_gemm.sh (prints a table against OpenBLAS).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <random>
#include <string>
#include <vector>

#include "moe/kernels/gemm.hpp"

#ifdef MOE_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace {

struct Shape {
  const char* name;
  bool trans_a, trans_b;
  int64_t M, N, K;
  float beta;  // 0 in the forward pass (no bias), 1 in the backward (gradients accumulate)
};

// The GEMMs of one makemoe.json training step (dense_ops.cpp's linear: y = x·Wᵀ,
// dx += dy·W, dW += dyᵀ·x), one entry per distinct shape.
const Shape kShapes[] = {
    {"fwd_qkv", false, true, 512, 384, 128, 0.f},      // x·Wqkvᵀ
    {"fwd_proj", false, true, 512, 128, 128, 0.f},     // attention output projection
    {"fwd_fc1", false, true, 128, 512, 128, 0.f},      // one expert's first layer
    {"fwd_fc2", false, true, 128, 128, 512, 0.f},      // one expert's second layer
    {"fwd_lm_head", false, true, 512, 65, 128, 0.f},   // logits
    {"dx_qkv", false, false, 512, 128, 384, 1.f},      // dY·W
    {"dx_fc1", false, false, 128, 128, 512, 1.f},
    {"dx_fc2", false, false, 128, 512, 128, 1.f},
    {"dw_qkv", true, false, 384, 128, 512, 1.f},       // dYᵀ·X
    {"dw_fc1", true, false, 512, 128, 128, 1.f},
    {"dw_fc2", true, false, 128, 512, 128, 1.f},
    {"dw_lm_head", true, false, 65, 128, 512, 1.f},
};

struct Operands {
  std::vector<float> A, B, C;
  int64_t lda, ldb, ldc;
  explicit Operands(const Shape& s)
      : A(size_t(s.M * s.K)), B(size_t(s.K * s.N)), C(size_t(s.M * s.N)),
        lda(s.trans_a ? s.M : s.K), ldb(s.trans_b ? s.K : s.N), ldc(s.N) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto* v : {&A, &B, &C})
      for (float& x : *v) x = u(rng);
  }
};

template <class F>
void run(benchmark::State& state, const Shape& s, F&& call) {
  Operands o(s);
  call(s, o);  // warm-up: packing buffers, thread pool
  for (auto _ : state) {
    call(s, o);
    benchmark::DoNotOptimize(o.C.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2e-9 * double(s.M * s.N * s.K), benchmark::Counter::kIsIterationInvariantRate);
}

void ours(benchmark::State& state, const Shape& s, moe::GemmKernel k, int threads) {
  omp_set_num_threads(threads);
  run(state, s, [k](const Shape& s, Operands& o) {
    moe::gemm(k, s.trans_a, s.trans_b, s.M, s.N, s.K, 1.f, o.A.data(), o.lda, o.B.data(), o.ldb, s.beta, o.C.data(),
              o.ldc);
  });
}

void naive(benchmark::State& state, const Shape& s) {
  run(state, s, [](const Shape& s, Operands& o) {
    moe::gemm_reference(s.trans_a, s.trans_b, s.M, s.N, s.K, 1.f, o.A.data(), o.lda, o.B.data(), o.ldb, s.beta,
                        o.C.data(), o.ldc);
  });
}

#ifdef MOE_HAVE_OPENBLAS
void openblas(benchmark::State& state, const Shape& s, int threads) {
  openblas_set_num_threads(threads);
  run(state, s, [](const Shape& s, Operands& o) {
    cblas_sgemm(CblasRowMajor, s.trans_a ? CblasTrans : CblasNoTrans, s.trans_b ? CblasTrans : CblasNoTrans,
                int(s.M), int(s.N), int(s.K), 1.f, o.A.data(), int(o.lda), o.B.data(), int(o.ldb), s.beta,
                o.C.data(), int(o.ldc));
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  // Per shape, the implementations side by side: ours/<kernel>, openblas, naive; names are
  // <shape>_<form>_<M>x<N>x<K>/<implementation>/threads:<n>.
  for (const Shape& s : kShapes) {
    const char* form = s.trans_a ? "AtB" : (s.trans_b ? "ABt" : "AB");
    const std::string shape = std::string(s.name) + "_" + form + "_" + std::to_string(s.M) + "x" +
                              std::to_string(s.N) + "x" + std::to_string(s.K);
    for (int threads : {1, 2}) {
      const std::string t = "/threads:" + std::to_string(threads);
      for (moe::GemmKernel k : {moe::GemmKernel::avx512, moe::GemmKernel::avx2, moe::GemmKernel::portable}) {
        if (k == moe::GemmKernel::avx2 && !moe::gemm_cpu_has_avx2()) continue;
        if (k == moe::GemmKernel::avx512 && !moe::gemm_cpu_has_avx512()) continue;
        benchmark::RegisterBenchmark((shape + "/ours_" + moe::gemm_kernel_name(k) + t).c_str(), ours, s, k, threads)
            ->UseRealTime();
      }
#ifdef MOE_HAVE_OPENBLAS
      benchmark::RegisterBenchmark((shape + "/openblas" + t).c_str(), openblas, s, threads)->UseRealTime();
#endif
    }
    benchmark::RegisterBenchmark((shape + "/naive/threads:1").c_str(), naive, s)->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
