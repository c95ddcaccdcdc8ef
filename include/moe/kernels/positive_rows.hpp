// A relu layer's output kept by its positive entries: every entry is > 0 or +0 (the GEMM's
// relu epilogue and act::relu give nothing else), so a bit per entry and the positive values
// in order give it back exactly, in about half the memory at initialisation and less later.
#pragma once

#include <cstdint>

namespace moe {

// Words of positive_bits for n entries: 16 entries a word.
inline int64_t positive_bit_words(int64_t n) { return (n + 15) / 16; }

// bits[i / 16] bit i % 16 = x[i] > 0 for i < n (the last word's unused bits 0). Returns how
// many are set.
int64_t positive_bits(uint16_t* bits, const float* x, int64_t n);
// values = the x[i] > 0 in order of i, as bits marks them. Writes up to 15 floats past the
// last value (room the caller leaves), whose contents are unspecified.
void pack_positive(float* values, const uint16_t* bits, const float* x, int64_t n);
// x[i] = the next value where bits marks i, else +0: what pack_positive was given. Reads up to
// 15 floats past the last value (which must be readable).
void unpack_positive(float* x, const uint16_t* bits, const float* values, int64_t n);

// d[i] *= 1 where bits marks i, else 0 (relu's derivative, with d · 0's sign as act::relu_grad
// gives it).
void mul_positive_mask(float* d, const uint16_t* bits, int64_t n);

namespace detail {
// The portable versions the functions above fall back on without AVX-512 (for tests).
int64_t positive_bits_scalar(uint16_t* bits, const float* x, int64_t n);
void pack_positive_scalar(float* values, const uint16_t* bits, const float* x, int64_t n);
void unpack_positive_scalar(float* x, const uint16_t* bits, const float* values, int64_t n);
void mul_positive_mask_scalar(float* d, const uint16_t* bits, int64_t n);
}  // namespace detail

}  // namespace moe
