// log and cos of doubles, four at a time in AVX2 lanes, for the normals of Rng::fill_normal
// (Box-Muller: sqrt(-2 log u1)·cos(2π u2)). fdlibm's methods, as glibc's, in double
// arithmetic with fused multiply-adds: not glibc's bits, but on every input fill_normal gives
// them, (k + 1)/(2^24 + 1) for log and 2π·k/2^24 for cos (k < 2^24), each is within
// kLogDoublesUlps or kCosDoublesUlps units in the last place of glibc's (tests/test_core.cpp
// checks every one). fill_normal rests its exactness on those bounds: where they leave the
// float of a normal in doubt it computes that one with glibc's functions.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe {

constexpr double kLogDoublesUlps = 2, kCosDoublesUlps = 2;

// Whether log_doubles and cos_doubles are built (x86-64-v3 builds, where __AVX2__ is defined);
// without them the functions below do nothing and fill_normal uses glibc's throughout.
bool vmath_vectorized();

// out[i] = log(u[i]) for i < n rounded down to 4, u in (0, 1].
void log_doubles(const double* u, double* out, int64_t n);
// out[i] = cos(a[i]) for i < n rounded down to 4, a in [0, 2π].
void cos_doubles(const double* a, double* out, int64_t n);

#if defined(__AVX2__)
// The four-lane forms, inline so that fill_normal's loop keeps its values in registers.

// log(u) for u in (0, 1], four at a time: fdlibm's method (u = 2^e·m with m in [√½, √2),
// log m = f - f²/2 + s(f²/2 + R(s²)) with f = m - 1, s = f/(2 + f), and e·ln 2 in two parts).
inline __m256d log_doubles4(__m256d u) {
  const __m256i bits = _mm256_castpd_si256(u);
  __m256i e = _mm256_sub_epi64(_mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(1023));
  __m256d m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFll)),
                                                  _mm256_set1_epi64x(0x3FF0000000000000ll)));  // [1, 2)
  const __m256d big = _mm256_cmp_pd(m, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
  e = _mm256_sub_epi64(e, _mm256_castpd_si256(big));  // big lanes are all ones: -(-1)
  // The exponent as a double (|e| < 2^31): the low words, converted.
  const __m256d k = _mm256_cvtepi32_pd(_mm256_castsi256_si128(_mm256_permute4x64_epi64(
      _mm256_shuffle_epi32(e, 0x08), 0x08)));
  const __m256d f = _mm256_sub_pd(m, _mm256_set1_pd(1.0));
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s), w = _mm256_mul_pd(z, z);
  const __m256d t1 = _mm256_mul_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_set1_pd(1.531383769920937332e-01),
                                                                         _mm256_set1_pd(2.222219843214978396e-01)),
                                                      _mm256_set1_pd(3.999999999940941908e-01)));
  const __m256d t2 = _mm256_mul_pd(
      z, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_fmadd_pd(w, _mm256_set1_pd(1.479819860511658591e-01),
                                                               _mm256_set1_pd(1.818357216161805012e-01)),
                                            _mm256_set1_pd(2.857142874366239149e-01)),
                         _mm256_set1_pd(6.666666666666735130e-01)));
  const __m256d R = _mm256_add_pd(t2, t1);
  const __m256d hfsq = _mm256_mul_pd(_mm256_set1_pd(0.5), _mm256_mul_pd(f, f));
  // k·ln2_hi - ((hfsq - (s·(hfsq + R) + k·ln2_lo)) - f)
  const __m256d inner = _mm256_fmadd_pd(k, _mm256_set1_pd(1.90821492927058770002e-10),
                                        _mm256_mul_pd(s, _mm256_add_pd(hfsq, R)));
  return _mm256_fmadd_pd(k, _mm256_set1_pd(6.93147180369123816490e-01),
                         _mm256_sub_pd(f, _mm256_sub_pd(hfsq, inner)));
}

// cos(a) for a in [0, 2π], four at a time: a less n·π/2 (n the nearest integer, π/2 in three
// parts, the remainder as a double-double y + yy), then fdlibm's cos or sin kernel by n mod 4.
inline __m256d cos_doubles4(__m256d a) {
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(a, _mm256_set1_pd(6.36619772367581382433e-01)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // fdlibm's pio2_1, pio2_2, pio2_3 (33 + 33 + 53 bits of π/2) and the tail past pio2_3.
  const __m256d p1 = _mm256_set1_pd(1.57079632673412561417e+00), p2 = _mm256_set1_pd(6.07710050630396597660e-11),
                p3 = _mm256_set1_pd(2.02226624871116645580e-21), p3t = _mm256_set1_pd(8.47842766036889956997e-32);
  // n·p1 and n·p2 are exact (n < 8); each subtraction's error is carried into the tail.
  const __m256d r1 = _mm256_fnmadd_pd(n, p1, a);  // exact: a and n·p1 agree in their leading bits
  const __m256d w2 = _mm256_mul_pd(n, p2);
  const __m256d r2 = _mm256_sub_pd(r1, w2);
  const __m256d e2 = _mm256_sub_pd(_mm256_sub_pd(r1, r2), w2);  // r1 - w2 = r2 + e2 exactly
  const __m256d w3 = _mm256_mul_pd(n, p3);
  const __m256d w3e = _mm256_fmsub_pd(n, p3, w3);  // n·p3 = w3 + w3e exactly
  const __m256d r3 = _mm256_sub_pd(r2, w3);
  const __m256d e3 = _mm256_sub_pd(_mm256_sub_pd(r2, r3), w3);
  const __m256d tail = _mm256_sub_pd(_mm256_add_pd(e2, e3), _mm256_fmadd_pd(n, p3t, w3e));
  const __m256d y = _mm256_add_pd(r3, tail);
  const __m256d yy = _mm256_sub_pd(tail, _mm256_sub_pd(y, r3));
  const __m256d z = _mm256_mul_pd(y, y);
  // cos kernel: w + (((1 - w) - hz) + (z·r - y·yy)), w = 1 - hz, hz = z/2.
  const __m256d rc = _mm256_mul_pd(
      z, _mm256_fmadd_pd(
             z, _mm256_fmadd_pd(
                    z, _mm256_fmadd_pd(
                           z, _mm256_fmadd_pd(z, _mm256_fmadd_pd(z, _mm256_set1_pd(-1.13596475577881948265e-11),
                                                                 _mm256_set1_pd(2.08757232129817482790e-09)),
                                              _mm256_set1_pd(-2.75573143513906633035e-07)),
                           _mm256_set1_pd(2.48015872894767294178e-05)),
                    _mm256_set1_pd(-1.38888888888741095749e-03)),
             _mm256_set1_pd(4.16666666666666019037e-02)));
  const __m256d hz = _mm256_mul_pd(_mm256_set1_pd(0.5), z);
  const __m256d wc = _mm256_sub_pd(_mm256_set1_pd(1.0), hz);
  const __m256d kc = _mm256_add_pd(
      wc, _mm256_add_pd(_mm256_sub_pd(_mm256_sub_pd(_mm256_set1_pd(1.0), wc), hz),
                        _mm256_fmsub_pd(z, rc, _mm256_mul_pd(y, yy))));
  // sin kernel: y - ((z·(yy/2 - v·r) - yy) - v·S1), v = z·y.
  const __m256d v = _mm256_mul_pd(z, y);
  const __m256d rs = _mm256_fmadd_pd(
      z, _mm256_fmadd_pd(z, _mm256_fmadd_pd(z, _mm256_fmadd_pd(z, _mm256_set1_pd(1.58969099521155010221e-10),
                                                                _mm256_set1_pd(-2.50507602534068634195e-08)),
                                             _mm256_set1_pd(2.75573137070700676789e-06)),
                      _mm256_set1_pd(-1.98412698298579493134e-04)),
      _mm256_set1_pd(8.33333333332248946124e-03));
  const __m256d inner = _mm256_fmsub_pd(z, _mm256_fnmadd_pd(v, rs, _mm256_mul_pd(_mm256_set1_pd(0.5), yy)), yy);
  const __m256d ks = _mm256_sub_pd(y, _mm256_fnmadd_pd(v, _mm256_set1_pd(-1.66666666666666324348e-01), inner));
  // n mod 4: 0 cos, 1 -sin, 2 -cos, 3 sin.
  const __m256i q = _mm256_castpd_si256(_mm256_add_pd(n, _mm256_set1_pd(6755399441055744.0)));  // low bits: n
  const __m256d odd = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(q, _mm256_set1_epi64x(1)),
                                                             _mm256_set1_epi64x(1)));
  const __m256i sign_bit = _mm256_slli_epi64(_mm256_and_si256(_mm256_add_epi64(q, _mm256_set1_epi64x(1)),
                                                              _mm256_set1_epi64x(2)), 62);  // n = 1, 2
  return _mm256_xor_pd(_mm256_blendv_pd(kc, ks, odd), _mm256_castsi256_pd(sign_bit));
}
#endif

}  // namespace moe
