// Masks kept as bits, 16 entries a word (bit i % 16 of word i / 16): dropout's masks, and a
// relu layer's output kept by its positive entries. Every entry of a relu output is > 0 or +0
// (the GEMM's relu epilogue and act::relu give nothing else), so a bit per entry and the
// positive values in order give it back exactly, in about half the memory at initialisation
// and less later.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe {

// Words of a mask of n entries.
inline int64_t bit_words(int64_t n) { return (n + 15) / 16; }
inline bool bit_at(const uint16_t* bits, int64_t i) { return bits[i >> 4] >> (i & 15) & 1u; }
// Entries i .. i+31 as the bits of a word (bit j: entry i + j; past the mask's end, garbage).
// Reads the four words from entry i's: the mask must leave 3 words of room past its last.
inline uint32_t bits_from(const uint16_t* bits, int64_t i) {
  uint64_t w;
  std::memcpy(&w, bits + (i >> 4), sizeof w);
  return uint32_t(w >> (i & 15));
}

// bit i = bytes[i] != 0 for i < n (the last word's unused bits 0).
void bits_from_bytes(uint16_t* bits, const uint8_t* bytes, int64_t n);
// out[j] = bit first + j, for j < n, as bytes 0 or 1 (the inverse of bits_from_bytes, from
// any entry). Writes n rounded up to 32 bytes and reads up to 3 words past the last entry's
// word (the mask must leave that room).
inline void bytes_from_bits(uint8_t* out, const uint16_t* bits, int64_t first, int64_t n) {
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const uint32_t m = bits_from(bits, first + j0);
#if defined(__AVX2__)
    // Byte j of the 32 takes byte j / 8 of m (in each 128-bit lane: m is in every lane), then
    // its bit j % 8.
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(m)),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                                                2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_and_si256(spread, _mm256_set1_epi64x(int64_t(0x8040201008040201)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j0), _mm256_min_epu8(bit, _mm256_set1_epi8(1)));
#else
    for (int64_t j = 0; j < 32; ++j) out[j0 + j] = uint8_t(m >> j & 1u);
#endif
  }
}
// y[i] = x[i] · (bit i ? s : 0) (y may be x): dropout's factor, or relu's derivative with s 1,
// the sign of x · 0 included.
void scale_by_bits(float* y, const float* x, const uint16_t* bits, float s, int64_t n);
// dx[i] += dy[i] · (bit i ? s : 0), the product and sum rounded once (an fma, as GCC contracts
// the plain expression).
void add_scaled_by_bits(float* dx, const float* dy, const uint16_t* bits, float s, int64_t n);

// bit i = x[i] > 0 for i < n. Returns how many are set.
int64_t positive_bits(uint16_t* bits, const float* x, int64_t n);
// values = the x[i] > 0 in order of i, as bits marks them. Writes up to 15 floats past the
// last value (room the caller leaves), whose contents are unspecified.
void pack_positive(float* values, const uint16_t* bits, const float* x, int64_t n);
// x[i] = the next value where bits marks i, else +0: what pack_positive was given. Reads up to
// 15 floats past the last value (which must be readable).
void unpack_positive(float* x, const uint16_t* bits, const float* values, int64_t n);

namespace detail {
// The portable versions the functions above fall back on without AVX-512 (for tests).
void bits_from_bytes_scalar(uint16_t* bits, const uint8_t* bytes, int64_t n);
void scale_by_bits_scalar(float* y, const float* x, const uint16_t* bits, float s, int64_t n);
void add_scaled_by_bits_scalar(float* dx, const float* dy, const uint16_t* bits, float s, int64_t n);
int64_t positive_bits_scalar(uint16_t* bits, const float* x, int64_t n);
void pack_positive_scalar(float* values, const uint16_t* bits, const float* x, int64_t n);
void unpack_positive_scalar(float* x, const uint16_t* bits, const float* values, int64_t n);
}  // namespace detail

}  // namespace moe
