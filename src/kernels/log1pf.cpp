#include "moe/kernels/log1pf.hpp"

#include <cmath>
#include <initializer_list>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/expf.hpp"
#include "moe/kernels/lanes.hpp"

namespace moe {

#if defined(__AVX2__) && defined(__FMA__)
namespace {

inline __m256 f32(uint32_t bits) { return _mm256_castsi256_ps(_mm256_set1_epi32(int(bits))); }

// Eight lanes of log1pf, every lane 0 <= x < 2^53. The steps are glibc's, in its order and
// rounding (products and sums rounded one by one: fp-contract off), every branch computed and
// the lanes' results chosen by masks:
//   x < 2^-29: x, or x - x·x·0.5 from 2^-54 on;
//   x < 0.41422: k = 0, f = x;
//   else u = 1 + x = 2^k·m with m scaled into [sqrt(2)/2, sqrt(2)), f = m - 1, and c the
//   rounding error of 1 + x over u;
//   then log1p = k·ln2_hi - ((hfsq - (s·(hfsq + R) + (k·ln2_lo + c))) - f) with s = f/(2 + f)
//   and R a degree-7 polynomial in s², or the short form when m is exactly 1 or 2.
__attribute__((optimize("fp-contract=off"))) __m256 log1p8(__m256 x) {
  const __m256i hx = _mm256_castps_si256(x);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 ln2_hi = f32(0x3f317180), ln2_lo = f32(0x3717f7d1);
  // x >= 0.41422: u = 1 + x and its exponent k.
  const __m256i big = _mm256_cmpgt_epi32(hx, _mm256_set1_epi32(0x3ed413d6));
  const __m256 u0 = _mm256_add_ps(one, x);
  const __m256i hu0 = _mm256_castps_si256(u0);
  __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(hu0, 23), _mm256_set1_epi32(127));
  const __m256i kpos = _mm256_cmpgt_epi32(k, _mm256_setzero_si256());
  __m256 c = _mm256_blendv_ps(_mm256_sub_ps(x, _mm256_sub_ps(u0, one)), _mm256_sub_ps(one, _mm256_sub_ps(u0, x)),
                              _mm256_castsi256_ps(kpos));
  c = _mm256_div_ps(c, u0);
  __m256i hu = _mm256_and_si256(hu0, _mm256_set1_epi32(0x007fffff));
  const __m256i low = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3504f7), hu);  // hu < 0x3504f7
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      hu, _mm256_blendv_epi8(_mm256_set1_epi32(0x3f000000), _mm256_set1_epi32(0x3f800000), low)));
  k = _mm256_blendv_epi8(_mm256_add_epi32(k, _mm256_set1_epi32(1)), k, low);
  hu = _mm256_blendv_epi8(_mm256_srli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x00800000), hu), 2), hu, low);
  // x < 0.41422: k = 0, f = x, and hu nonzero (never the short form).
  const __m256 bigf = _mm256_castsi256_ps(big);
  const __m256 f = _mm256_blendv_ps(x, _mm256_sub_ps(m, one), bigf);
  k = _mm256_and_si256(k, big);
  hu = _mm256_blendv_epi8(_mm256_set1_epi32(1), hu, big);
  c = _mm256_and_ps(c, bigf);

  const __m256 kf = _mm256_cvtepi32_ps(k);
  const __m256i k0 = _mm256_cmpeq_epi32(k, _mm256_setzero_si256());
  const __m256 hfsq = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), f), f);
  const __m256 k_hi = _mm256_mul_ps(kf, ln2_hi);
  const __m256 k_lo_c = _mm256_add_ps(_mm256_mul_ps(kf, ln2_lo), c);
  // The full form.
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = f32(0x3e178897);  // Lp7
  for (const uint32_t lp : {0x3e1cd04fu, 0x3e3a3325u, 0x3e638e29u, 0x3e924925u, 0x3ecccccdu, 0x3f2aaaabu})
    p = _mm256_add_ps(f32(lp), _mm256_mul_ps(z, p));
  const __m256 R = _mm256_mul_ps(z, p);
  const __m256 sR = _mm256_mul_ps(s, _mm256_add_ps(hfsq, R));
  const __m256 full = _mm256_blendv_ps(
      _mm256_sub_ps(k_hi, _mm256_sub_ps(_mm256_sub_ps(hfsq, _mm256_add_ps(sR, k_lo_c)), f)),
      _mm256_sub_ps(f, _mm256_sub_ps(hfsq, sR)), _mm256_castsi256_ps(k0));
  // The short form (hu == 0: m is 1 or 2, |f| < 2^-20).
  const __m256 R2 = _mm256_mul_ps(hfsq, _mm256_sub_ps(one, _mm256_mul_ps(f32(0x3f2aaaab), f)));
  __m256 brief = _mm256_blendv_ps(_mm256_sub_ps(k_hi, _mm256_sub_ps(_mm256_sub_ps(R2, k_lo_c), f)),
                                  _mm256_sub_ps(f, R2), _mm256_castsi256_ps(k0));
  const __m256 fzero = _mm256_cmp_ps(f, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 at_zero = _mm256_and_ps(_mm256_add_ps(k_hi, k_lo_c), _mm256_castsi256_ps(~k0));
  brief = _mm256_blendv_ps(brief, at_zero, fzero);
  __m256 y = _mm256_blendv_ps(full, brief, _mm256_castsi256_ps(_mm256_cmpeq_epi32(hu, _mm256_setzero_si256())));
  // x < 2^-29.
  const __m256 tiny = _mm256_blendv_ps(_mm256_sub_ps(x, _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(0.5f))), x,
                                       _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x24800000), hx)));
  y = _mm256_blendv_ps(y, tiny, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x31000000), hx)));
  return y;
}

}  // namespace
#endif

void log1p_floats(const float* x, float* y, int64_t n) {
  const auto library = [](float v) { return std::log1p(v); };
#if defined(__AVX2__) && defined(__FMA__)
  map_floats8(
      x, y, n,
      [](__m256 v) {  // outside [0, 2^53): negative, huge, inf, NaN
        const __m256i hx = _mm256_castps_si256(v);
        return !_mm256_testz_si256(_mm256_or_si256(hx, _mm256_cmpgt_epi32(hx, _mm256_set1_epi32(0x59ffffff))),
                                   _mm256_set1_epi32(int(0x80000000)));
      },
      log1p8, library);
#else
  for (int64_t i = 0; i < n; ++i) y[i] = library(x[i]);
#endif
}

void softplus_floats(const float* x, float* y, int64_t n) {
  constexpr int64_t kChunk = 256;
  float e[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = n - i0 < kChunk ? n - i0 : kChunk;
    exp_floats(x + i0, e, m);
    log1p_floats(e, e, m);
    for (int64_t i = 0; i < m; ++i) y[i0 + i] = x[i0 + i] > act::kSoftplusThreshold ? x[i0 + i] : e[i];
  }
}

}  // namespace moe
