#include "moe/kernels/positive_rows.hpp"

#include "moe/kernels/x86.hpp"

namespace moe {

namespace detail {

int64_t positive_bits_scalar(uint16_t* bits, const float* x, int64_t n) {
  int64_t count = 0;
  for (int64_t w = 0; w < positive_bit_words(n); ++w) {
    unsigned word = 0;
    for (int64_t j = 0; j < 16 && w * 16 + j < n; ++j)
      if (x[w * 16 + j] > 0.f) word |= 1u << j, ++count;
    bits[w] = uint16_t(word);
  }
  return count;
}

void pack_positive_scalar(float* values, const uint16_t* bits, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (bits[i / 16] >> (i % 16) & 1u) *values++ = x[i];
}

void unpack_positive_scalar(float* x, const uint16_t* bits, const float* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bits[i / 16] >> (i % 16) & 1u ? *values++ : 0.f;
}

void mul_positive_mask_scalar(float* d, const uint16_t* bits, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] *= bits[i / 16] >> (i % 16) & 1u ? 1.f : 0.f;
}

}  // namespace detail

namespace {

using namespace detail;

#ifdef MOE_X86
// Sixteen entries a word, whole words in registers (compress and expand between registers, and
// full-width stores and loads: the 15 floats of room), the last partial word as the scalar code.
MOE_TARGET_AVX512 int64_t positive_bits16(uint16_t* bits, const float* x, int64_t n) {
  const int64_t whole = n / 16;
  int64_t count = 0;
  for (int64_t w = 0; w < whole; ++w) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + w * 16), _mm512_setzero_ps(), _CMP_GT_OQ);
    bits[w] = uint16_t(m);
    count += __builtin_popcount(unsigned(m));
  }
  return count + positive_bits_scalar(bits + whole, x + whole * 16, n - whole * 16);
}

MOE_TARGET_AVX512 void pack_positive16(float* values, const uint16_t* bits, const float* x, int64_t n) {
  const int64_t whole = n / 16;
  for (int64_t w = 0; w < whole; ++w) {
    const __mmask16 m = bits[w];
    _mm512_storeu_ps(values, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(x + w * 16)));
    values += __builtin_popcount(unsigned(m));
  }
  pack_positive_scalar(values, bits + whole, x + whole * 16, n - whole * 16);
}

MOE_TARGET_AVX512 void unpack_positive16(float* x, const uint16_t* bits, const float* values, int64_t n) {
  const int64_t whole = n / 16;
  for (int64_t w = 0; w < whole; ++w) {
    const __mmask16 m = bits[w];
    _mm512_storeu_ps(x + w * 16, _mm512_maskz_expand_ps(m, _mm512_loadu_ps(values)));
    values += __builtin_popcount(unsigned(m));
  }
  unpack_positive_scalar(x + whole * 16, bits + whole, values, n - whole * 16);
}

MOE_TARGET_AVX512 void mul_positive_mask16(float* d, const uint16_t* bits, int64_t n) {
  const int64_t whole = n / 16;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t w = 0; w < whole; ++w)
    _mm512_storeu_ps(d + w * 16, _mm512_mul_ps(_mm512_loadu_ps(d + w * 16), _mm512_maskz_mov_ps(bits[w], one)));
  mul_positive_mask_scalar(d + whole * 16, bits + whole, n - whole * 16);
}
#endif

#ifdef MOE_X86
const bool kAvx512 = cpu_has_avx512();
#else
constexpr bool kAvx512 = false;
#endif

}  // namespace

int64_t positive_bits(uint16_t* bits, const float* x, int64_t n) {
#ifdef MOE_X86
  if (kAvx512) return positive_bits16(bits, x, n);
#endif
  return positive_bits_scalar(bits, x, n);
}

void pack_positive(float* values, const uint16_t* bits, const float* x, int64_t n) {
#ifdef MOE_X86
  if (kAvx512) return pack_positive16(values, bits, x, n);
#endif
  pack_positive_scalar(values, bits, x, n);
}

void unpack_positive(float* x, const uint16_t* bits, const float* values, int64_t n) {
#ifdef MOE_X86
  if (kAvx512) return unpack_positive16(x, bits, values, n);
#endif
  unpack_positive_scalar(x, bits, values, n);
}

void mul_positive_mask(float* d, const uint16_t* bits, int64_t n) {
#ifdef MOE_X86
  if (kAvx512) return mul_positive_mask16(d, bits, n);
#endif
  mul_positive_mask_scalar(d, bits, n);
}

}  // namespace moe
