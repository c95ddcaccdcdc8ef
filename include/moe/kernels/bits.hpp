// Masks kept as bits, 16 entries a word (bit i % 16 of word i / 16): dropout's masks, and a
// relu layer's output kept by its positive entries. Every entry of a relu output is > 0 or +0
// (the GEMM's relu epilogue and act::relu give nothing else), so a bit per entry and the
// positive values in order give it back exactly, in about half the memory at initialisation
// and less later.
#pragma once

#include <cstdint>

namespace moe {

// Words of a mask of n entries.
inline int64_t bit_words(int64_t n) { return (n + 15) / 16; }
inline bool bit_at(const uint16_t* bits, int64_t i) { return bits[i >> 4] >> (i & 15) & 1u; }

// bit i = bytes[i] != 0 for i < n (the last word's unused bits 0).
void bits_from_bytes(uint16_t* bits, const uint8_t* bytes, int64_t n);
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
