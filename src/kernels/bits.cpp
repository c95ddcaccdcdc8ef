#include "moe/kernels/bits.hpp"

#include <cmath>

#include "moe/kernels/x86.hpp"

namespace moe {

namespace detail {

void bits_from_bytes_scalar(uint16_t* bits, const uint8_t* bytes, int64_t n) {
  for (int64_t w = 0; w < bit_words(n); ++w) {
    unsigned word = 0;
    for (int64_t j = 0; j < 16 && w * 16 + j < n; ++j)
      if (bytes[w * 16 + j]) word |= 1u << j;
    bits[w] = uint16_t(word);
  }
}

void scale_by_bits_scalar(float* y, const float* x, const uint16_t* bits, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * (bit_at(bits, i) ? s : 0.f);
}

void add_scaled_by_bits_scalar(float* dx, const float* dy, const uint16_t* bits, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = std::fma(dy[i], bit_at(bits, i) ? s : 0.f, dx[i]);
}

int64_t positive_bits_scalar(uint16_t* bits, const float* x, int64_t n) {
  int64_t count = 0;
  for (int64_t w = 0; w < bit_words(n); ++w) {
    unsigned word = 0;
    for (int64_t j = 0; j < 16 && w * 16 + j < n; ++j)
      if (x[w * 16 + j] > 0.f) word |= 1u << j, ++count;
    bits[w] = uint16_t(word);
  }
  return count;
}

void pack_positive_scalar(float* values, const uint16_t* bits, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (bit_at(bits, i)) *values++ = x[i];
}

void unpack_positive_scalar(float* x, const uint16_t* bits, const float* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bit_at(bits, i) ? *values++ : 0.f;
}

}  // namespace detail

namespace {

using namespace detail;

#ifdef MOE_X86
// Sixteen entries a word, whole words in registers (compress and expand between registers, and
// full-width stores and loads: the 15 floats of room), the last partial word as the scalar code.
MOE_TARGET_AVX512 void bits_from_bytes16(uint16_t* bits, const uint8_t* bytes, int64_t n) {
  const int64_t whole = n / 16;
  for (int64_t w = 0; w < whole; ++w)
    bits[w] = uint16_t(_mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + w * 16)),
                                          _mm_set1_epi8(-1)));
  bits_from_bytes_scalar(bits + whole, bytes + whole * 16, n - whole * 16);
}

MOE_TARGET_AVX512 void scale_by_bits16(float* y, const float* x, const uint16_t* bits, float s, int64_t n) {
  const int64_t whole = n / 16;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t w = 0; w < whole; ++w)
    _mm512_storeu_ps(y + w * 16, _mm512_mul_ps(_mm512_loadu_ps(x + w * 16), _mm512_maskz_mov_ps(bits[w], sv)));
  scale_by_bits_scalar(y + whole * 16, x + whole * 16, bits + whole, s, n - whole * 16);
}

MOE_TARGET_AVX512 void add_scaled_by_bits16(float* dx, const float* dy, const uint16_t* bits, float s, int64_t n) {
  const int64_t whole = n / 16;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t w = 0; w < whole; ++w)
    _mm512_storeu_ps(dx + w * 16, _mm512_fmadd_ps(_mm512_loadu_ps(dy + w * 16), _mm512_maskz_mov_ps(bits[w], sv),
                                                  _mm512_loadu_ps(dx + w * 16)));
  add_scaled_by_bits_scalar(dx + whole * 16, dy + whole * 16, bits + whole, s, n - whole * 16);
}

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

const bool kAvx512 = cpu_has_avx512();
#define MOE_BITS_DISPATCH(call16, call) \
  if (kAvx512) return call16;           \
  return call;
#else
#define MOE_BITS_DISPATCH(call16, call) return call;
#endif

}  // namespace

void bits_from_bytes(uint16_t* bits, const uint8_t* bytes, int64_t n) {
  MOE_BITS_DISPATCH(bits_from_bytes16(bits, bytes, n), bits_from_bytes_scalar(bits, bytes, n))
}

void scale_by_bits(float* y, const float* x, const uint16_t* bits, float s, int64_t n) {
  MOE_BITS_DISPATCH(scale_by_bits16(y, x, bits, s, n), scale_by_bits_scalar(y, x, bits, s, n))
}

void add_scaled_by_bits(float* dx, const float* dy, const uint16_t* bits, float s, int64_t n) {
  MOE_BITS_DISPATCH(add_scaled_by_bits16(dx, dy, bits, s, n), add_scaled_by_bits_scalar(dx, dy, bits, s, n))
}

int64_t positive_bits(uint16_t* bits, const float* x, int64_t n) {
  MOE_BITS_DISPATCH(positive_bits16(bits, x, n), positive_bits_scalar(bits, x, n))
}

void pack_positive(float* values, const uint16_t* bits, const float* x, int64_t n) {
  MOE_BITS_DISPATCH(pack_positive16(values, bits, x, n), pack_positive_scalar(values, bits, x, n))
}

void unpack_positive(float* x, const uint16_t* bits, const float* values, int64_t n) {
  MOE_BITS_DISPATCH(unpack_positive16(x, bits, values, n), unpack_positive_scalar(x, bits, values, n))
}

}  // namespace moe
