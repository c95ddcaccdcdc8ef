// The instruction sets of the hand-written x86 kernels (gemm, the random generator's fills):
// the target attributes that compile a function for one whatever the build's flags, and the
// run-time checks that the CPU has it. One list of AVX-512 features for both, so that code
// compiled for them runs only where the check found them.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_X86 1
#define MOE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MOE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#endif

namespace moe {

// Whether this CPU has AVX2 and FMA (false off x86).
inline bool cpu_has_avx2() {
#ifdef MOE_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Whether it has what MOE_TARGET_AVX512 compiles for: AVX-512 F, VL, BW and DQ, and AVX2/FMA.
inline bool cpu_has_avx512() {
#ifdef MOE_X86
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace moe
