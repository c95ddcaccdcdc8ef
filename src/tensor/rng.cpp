#include "moe/tensor/rng.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

#include "moe/tensor/parallel.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace moe {

void Rng::philox(uint64_t key, uint64_t ctr_hi, uint64_t ctr_lo, uint32_t out[4]) {
  uint32_t c0 = uint32_t(ctr_lo), c1 = uint32_t(ctr_lo >> 32), c2 = uint32_t(ctr_hi), c3 = uint32_t(ctr_hi >> 32);
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = uint32_t(p1);
    uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = uint32_t(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

namespace {
// 24 random bits -> [0, 1), exactly representable in float.
inline float to_unit(uint32_t u) { return float(u >> 8) * (1.0f / 16777216.0f); }

// One normal from a Philox block (Box-Muller on words 0 and 1, in double for accuracy).
inline float block_normal(const uint32_t w[4]) {
  double u1 = (double(w[0] >> 8) + 1.0) / 16777217.0;  // (0, 1]: log is finite
  double u2 = double(w[1] >> 8) / 16777216.0;
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}
}  // namespace

uint32_t Rng::next_u32() {
  uint32_t w[4];
  philox(s_.seed, s_.stream, s_.counter++, w);
  return w[0];
}

uint64_t Rng::next_u64() {
  uint32_t w[4];
  philox(s_.seed, s_.stream, s_.counter++, w);
  return (uint64_t(w[1]) << 32) | w[0];
}

float Rng::uniform() { return to_unit(next_u32()); }

float Rng::normal() {
  uint32_t w[4];
  philox(s_.seed, s_.stream, s_.counter++, w);
  return block_normal(w);
}

uint64_t Rng::below(uint64_t n) {
  // Rejection keeps it exactly uniform; one draw almost always suffices.
  uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t v;
  do v = next_u64(); while (v >= limit);
  return v % n;
}

#if defined(__AVX2__)
namespace {

// Eight 32x32->64 products a[j] * m: their high and low words.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox keys of the 10 rounds, broadcast.
struct RoundKeys {
  __m256i k0[10], k1[10];
  explicit RoundKeys(uint64_t key) {
    uint32_t a = uint32_t(key), b = uint32_t(key >> 32);
    for (int r = 0; r < 10; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = _mm256_set1_epi32(int(a));
      k1[r] = _mm256_set1_epi32(int(b));
    }
  }
};

// Words 0 and 1 of the Philox blocks of counters ctr_lo + 0..7: the same bits as Rng::philox.
inline void philox8(const RoundKeys& keys, uint64_t ctr_hi, uint64_t ctr_lo, __m256i& word0, __m256i& word1) {
  __m256i c0, c1;
  if (uint32_t(ctr_lo) <= 0xFFFFFFF8u) {  // no carry into the high word within the eight
    c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(ctr_lo))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    c1 = _mm256_set1_epi32(int(uint32_t(ctr_lo >> 32)));
  } else {
    alignas(32) uint32_t lo32[8], hi32[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t c = ctr_lo + uint64_t(j);
      lo32[j] = uint32_t(c);
      hi32[j] = uint32_t(c >> 32);
    }
    c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
  }
  __m256i c2 = _mm256_set1_epi32(int(uint32_t(ctr_hi)));
  __m256i c3 = _mm256_set1_epi32(int(uint32_t(ctr_hi >> 32)));
  const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m1 = _mm256_set1_epi32(int(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), keys.k0[r]);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), keys.k1[r]);
    c3 = lo0;
  }
  word0 = c0;
  word1 = c1;
}

inline __m256i philox8_word0(const RoundKeys& keys, uint64_t ctr_hi, uint64_t ctr_lo) {
  __m256i w0, w1;
  philox8(keys, ctr_hi, ctr_lo, w0, w1);
  return w0;
}

}  // namespace
#endif

uint64_t Rng::take_fill(int64_t n) {
  uint64_t offset = 0, total = uint64_t(n);
  if (window_total_ > 0) {  // this fill only
    if (window_offset_ + uint64_t(n) > window_total_)
      throw std::logic_error("Rng: a window of " + std::to_string(window_total_) + " numbers cannot hold " +
                             std::to_string(n) + " at offset " + std::to_string(window_offset_));
    offset = window_offset_, total = window_total_;
    window_offset_ = window_total_ = 0;
  } else {
    offset = shard_index_ * uint64_t(n), total = shard_count_ * uint64_t(n);
  }
  const uint64_t first = s_.counter + offset;
  s_.counter += total;
  return first;
}

void Rng::set_shard(uint64_t index, uint64_t count) {
  if (count == 0 || index >= count)
    throw std::invalid_argument("Rng: shard " + std::to_string(index) + " of " + std::to_string(count));
  shard_index_ = index, shard_count_ = count;
}

void Rng::set_next_window(uint64_t offset, uint64_t total) { window_offset_ = offset, window_total_ = total; }

void Rng::set_segments(uint64_t count, uint64_t stride) {
  if (count == 0) throw std::invalid_argument("Rng: 0 segments");
  segments_ = count, segment_stride_ = stride;
}

template <class FillAt>
void Rng::fill_segments(float* out, int64_t n, FillAt fill_at) {
  if (uint64_t(n) % segments_ != 0)
    throw std::logic_error("Rng: a fill of " + std::to_string(n) + " numbers cannot be split into " +
                           std::to_string(segments_) + " segments");
  const int64_t m = n / int64_t(segments_);
  const uint64_t first = take_fill(m);
  for (uint64_t j = 0; j < segments_; ++j) fill_at(out + int64_t(j) * m, m, first + j * segment_stride_);
}

void Rng::fill_uniform(float* out, int64_t n, float lo, float hi) {
  const RngState s = s_;
  fill_segments(out, n, [&](float* o, int64_t m, uint64_t first) {
    int64_t done = 0;
#if defined(__AVX2__)
    // Eight counters at a time; the same numbers as the scalar loop below.
    const int64_t blocks = m / 8;
    const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f), vlo = _mm256_set1_ps(lo),
                 vrange = _mm256_set1_ps(hi - lo);
    const RoundKeys keys(s.seed);
#pragma omp parallel for schedule(static) if (m > kParallelMinWork)
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i w = philox8_word0(keys, s.stream, first + uint64_t(b * 8));
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), scale);
      _mm256_storeu_ps(o + b * 8, _mm256_add_ps(vlo, _mm256_mul_ps(vrange, u)));
    }
    done = blocks * 8;
#endif
    for (int64_t i = done; i < m; ++i) {
      uint32_t w[4];
      philox(s.seed, s.stream, first + uint64_t(i), w);
      o[i] = lo + (hi - lo) * to_unit(w[0]);
    }
  });
}

void Rng::fill_normal(float* out, int64_t n, float mean, float stddev) {
  const RngState s = s_;
  fill_segments(out, n, [&](float* o, int64_t m, uint64_t first) {
    // A normal costs a Philox block, a log and a cos in double, some fifty times a uniform: the
    // router noise of one layer (tokens x experts) is already worth two threads.
    int64_t done = 0;
#if defined(__AVX2__)
    // Eight Philox blocks at a time, and their u1 and 2π·u2 in double as block_normal makes
    // them; the log and cos one by one.
    const int64_t blocks = m / 8;
    const RoundKeys keys(s.seed);
#pragma omp parallel for schedule(static) if (m > kParallelMinWork / 32)
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i w0, w1;
      philox8(keys, s.stream, first + uint64_t(b * 8), w0, w1);
      const __m256i k1 = _mm256_srli_epi32(w0, 8), k2 = _mm256_srli_epi32(w1, 8);
      alignas(32) double u1[8], arg[8];
      for (int half = 0; half < 2; ++half) {
        const __m128i a = half ? _mm256_extracti128_si256(k1, 1) : _mm256_castsi256_si128(k1);
        const __m128i c = half ? _mm256_extracti128_si256(k2, 1) : _mm256_castsi256_si128(k2);
        _mm256_store_pd(u1 + 4 * half, _mm256_div_pd(_mm256_add_pd(_mm256_cvtepi32_pd(a), _mm256_set1_pd(1.0)),
                                                     _mm256_set1_pd(16777217.0)));
        _mm256_store_pd(arg + 4 * half, _mm256_mul_pd(_mm256_set1_pd(6.283185307179586),
                                                      _mm256_div_pd(_mm256_cvtepi32_pd(c), _mm256_set1_pd(16777216.0))));
      }
      float* dst = o + b * 8;
      for (int j = 0; j < 8; ++j) dst[j] = mean + stddev * float(std::sqrt(-2.0 * std::log(u1[j])) * std::cos(arg[j]));
    }
    done = blocks * 8;
#endif
    for (int64_t i = done; i < m; ++i) {
      uint32_t w[4];
      philox(s.seed, s.stream, first + uint64_t(i), w);
      o[i] = mean + stddev * block_normal(w);
    }
  });
}

}  // namespace moe
