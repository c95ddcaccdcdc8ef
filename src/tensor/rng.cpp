#include "moe/tensor/rng.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/kernels/vmath.hpp"
#include "moe/kernels/x86.hpp"
#include "moe/tensor/parallel.hpp"

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

// The Box-Muller transform in double, with glibc's log and cos: u1 in (0, 1], arg = 2π·u2.
// fill_normal's vector path falls back on it for the numbers its own log and cos leave in doubt.
inline float box_muller(double u1, double arg) { return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(arg)); }

// One normal from a Philox block (Box-Muller on words 0 and 1, in double for accuracy).
inline float block_normal(const uint32_t w[4]) {
  double u1 = (double(w[0] >> 8) + 1.0) / 16777217.0;  // (0, 1]: log is finite
  double u2 = double(w[1] >> 8) / 16777216.0;
  return box_muller(u1, 6.283185307179586 * u2);
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

// Uniforms as to_unit makes them: 24 random bits times 2^-24, exact.
inline __m256 to_unit8(__m256i w) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

}  // namespace
#endif

#if defined(MOE_X86) && defined(__AVX2__)
#define MOE_RNG_AVX512 1
// GCC 12's AVX-512 intrinsics start unmasked results from _mm512_undefined_epi32(), a
// self-initialised variable that -Wmaybe-uninitialized reports once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// Sixteen Philox blocks at a time with AVX-512, for the counters ctr_lo + 0..15 (carries
// included): each block in a 64-bit lane, every word of its state in the lane's low half.
// The high halves fill with junk that nothing reads: _mm512_mul_epu32 multiplies low halves,
// the xors keep halves apart, and only the low halves of word 0 are returned. The same
// integer arithmetic as Rng::philox, so the same bits; about twice philox8's speed (a
// throwaway timing on this machine: 1.35 against 2.94 ns a uniform), because the products
// come out whole, with no blends to split them, and each round's two xors are one ternlog.
struct RoundKeys16 {
  __m512i k0[10], k1[10];
  MOE_TARGET_AVX512 explicit RoundKeys16(uint64_t key) {
    uint32_t a = uint32_t(key), b = uint32_t(key >> 32);
    for (int r = 0; r < 10; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = _mm512_set1_epi64(int64_t(a));
      k1[r] = _mm512_set1_epi64(int64_t(b));
    }
  }
};

// Word 0 of the blocks of the sixteen counters in ctr_a (blocks 0..7) and ctr_b (8..15).
MOE_TARGET_AVX512 inline __m512i philox16_word0(const RoundKeys16& keys, uint64_t ctr_hi, __m512i ctr_a,
                                                __m512i ctr_b) {
  const __m512i m0 = _mm512_set1_epi64(int64_t(0xD2511F53u)), m1 = _mm512_set1_epi64(int64_t(0xCD9E8D57u));
  // Word 1 is the counter's high word.
  __m512i c0a = ctr_a, c0b = ctr_b;
  __m512i c1a = _mm512_srli_epi64(c0a, 32), c1b = _mm512_srli_epi64(c0b, 32);
  __m512i c2a = _mm512_set1_epi64(int64_t(uint32_t(ctr_hi))), c2b = c2a;
  __m512i c3a = _mm512_set1_epi64(int64_t(ctr_hi >> 32)), c3b = c3a;
  for (int r = 0; r < 10; ++r) {
    const __m512i p0a = _mm512_mul_epu32(c0a, m0), p1a = _mm512_mul_epu32(c2a, m1);
    const __m512i p0b = _mm512_mul_epu32(c0b, m0), p1b = _mm512_mul_epu32(c2b, m1);
    c0a = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1a, 32), c1a, keys.k0[r], 0x96);  // a ^ b ^ c
    c2a = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0a, 32), c3a, keys.k1[r], 0x96);
    c1a = p1a, c3a = p0a;
    c0b = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1b, 32), c1b, keys.k0[r], 0x96);
    c2b = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0b, 32), c3b, keys.k1[r], 0x96);
    c1b = p1b, c3b = p0b;
  }
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_permutex2var_epi32(c0a, low_halves, c0b);
}

// The same for the counters ctr_lo + 0..15 (carries included).
MOE_TARGET_AVX512 inline __m512i philox16_word0(const RoundKeys16& keys, uint64_t ctr_hi, uint64_t ctr_lo) {
  const __m512i base = _mm512_set1_epi64(int64_t(ctr_lo));
  return philox16_word0(keys, ctr_hi, _mm512_add_epi64(base, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
                        _mm512_add_epi64(base, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15)));
}

MOE_TARGET_AVX512 inline __m512 to_unit16(__m512i w) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

}  // namespace
#endif

// Where a fill's uniforms go: o[i] = lo + range·u as one fma (rounded once, in every path
// and at every optimisation level; what the optimised x86-64-v3 build made of the plain
// expression before), or keep[i] = u >= p.
struct detail::UniformSink {
  float* o = nullptr;
  float lo = 0.f, range = 1.f;
  uint8_t* keep = nullptr;
  float p = 0.f;
  void put(int64_t i, float u) const {
    if (keep)
      keep[i] = u >= p;
    else
      o[i] = std::fma(range, u, lo);
  }
};

namespace {
using detail::UniformSink;

#if defined(MOE_RNG_AVX512)
// Numbers [i0, i1) of a fill from counter `first`, i1 - i0 a multiple of 16.
MOE_TARGET_AVX512 __attribute__((noinline)) void uniform_run16(const UniformSink& sink, uint64_t seed,
                                                                uint64_t stream, uint64_t first, int64_t i0,
                                                                int64_t i1) {
  const RoundKeys16 keys(seed);
  const __m512 lo = _mm512_set1_ps(sink.lo), range = _mm512_set1_ps(sink.range), p = _mm512_set1_ps(sink.p);
  const __m128i one = _mm_set1_epi8(1);
  for (int64_t i = i0; i < i1; i += 16) {
    const __m512 u = to_unit16(philox16_word0(keys, stream, first + uint64_t(i)));
    if (sink.keep)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(sink.keep + i),
                       _mm_maskz_mov_epi8(_mm512_cmp_ps_mask(u, p, _CMP_GE_OQ), one));
    else
      _mm512_storeu_ps(sink.o + i, _mm512_fmadd_ps(range, u, lo));
  }
}

// Keep-mask bytes out[j] = u_j >= p for j < n, u_j the uniform of counter first + at[j]
// (any counters: at holds n rounded up to 16 entries).
MOE_TARGET_AVX512 __attribute__((noinline)) void keep_mask_at16(uint64_t seed, uint64_t stream, uint64_t first,
                                                                 const uint32_t* at, int64_t n, float p,
                                                                 uint8_t* out) {
  const RoundKeys16 keys(seed);
  const __m512 pv = _mm512_set1_ps(p);
  const __m128i one = _mm_set1_epi8(1);
  const __m512i base = _mm512_set1_epi64(int64_t(first));
  for (int64_t j = 0; j < n; j += 16) {
    const auto* offsets = reinterpret_cast<const __m256i*>(at + j);
    const __m512i a = _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm256_loadu_si256(offsets)));
    const __m512i b = _mm512_add_epi64(base, _mm512_cvtepu32_epi64(_mm256_loadu_si256(offsets + 1)));
    const __m512 u = to_unit16(philox16_word0(keys, stream, a, b));
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    _mm_mask_storeu_epi8(out + j, valid, _mm_maskz_mov_epi8(_mm512_cmp_ps_mask(u, pv, _CMP_GE_OQ), one));
  }
}
#pragma GCC diagnostic pop
#endif

#if defined(__AVX2__)
// The same eight at a time (i1 - i0 a multiple of 8).
void uniform_run8(const UniformSink& sink, uint64_t seed, uint64_t stream, uint64_t first, int64_t i0, int64_t i1) {
  const RoundKeys keys(seed);
  const __m256 lo = _mm256_set1_ps(sink.lo), range = _mm256_set1_ps(sink.range), p = _mm256_set1_ps(sink.p);
  for (int64_t i = i0; i < i1; i += 8) {
    __m256i w0, w1;
    philox8(keys, stream, first + uint64_t(i), w0, w1);
    const __m256 u = to_unit8(w0);
    if (sink.keep) {
      const uint64_t bits = uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(u, p, _CMP_GE_OQ)));
      const uint64_t bytes = _pdep_u64(bits, 0x0101010101010101ull);
      std::memcpy(sink.keep + i, &bytes, 8);
    } else {
      _mm256_storeu_ps(sink.o + i, _mm256_fmadd_ps(range, u, lo));
    }
  }
}
#endif

#if defined(MOE_RNG_AVX512)
bool build_and_cpu_have_avx512() { return cpu_has_avx512(); }
#else
bool build_and_cpu_have_avx512() { return false; }
#endif

std::atomic<bool> g_avx512{build_and_cpu_have_avx512()};

}  // namespace

bool rng_avx512() { return g_avx512.load(std::memory_order_relaxed); }

void set_rng_avx512(bool on) {
  if (on && !build_and_cpu_have_avx512()) throw std::runtime_error("Rng: this CPU (or build) has no AVX-512");
  g_avx512.store(on, std::memory_order_relaxed);
}

uint64_t Rng::take_fill(int64_t n) {
  const uint64_t first = s_.counter + shard_index_ * uint64_t(n);
  s_.counter += shard_count_ * uint64_t(n);
  return first;
}

Rng Rng::take_window(uint64_t offset, uint64_t total) {
  const Rng window(RngState{s_.seed, s_.stream, s_.counter + offset});
  s_.counter += total;
  return window;
}

void Rng::set_shard(uint64_t index, uint64_t count) {
  if (count == 0 || index >= count)
    throw std::invalid_argument("Rng: shard " + std::to_string(index) + " of " + std::to_string(count));
  shard_index_ = index, shard_count_ = count;
}

void Rng::set_segments(uint64_t count, uint64_t stride) {
  if (count == 0) throw std::invalid_argument("Rng: 0 segments");
  segments_ = count, segment_stride_ = stride;
}

template <class FillAt>
void Rng::fill_segments(int64_t n, FillAt fill_at) {
  if (uint64_t(n) % segments_ != 0)
    throw std::logic_error("Rng: a fill of " + std::to_string(n) + " numbers cannot be split into " +
                           std::to_string(segments_) + " segments");
  const int64_t m = n / int64_t(segments_);
  const uint64_t first = take_fill(m);
  for (uint64_t j = 0; j < segments_; ++j) fill_at(int64_t(j) * m, m, first + j * segment_stride_);
}

void Rng::fill_uniforms(const UniformSink& sink, int64_t n) {
  const RngState s = s_;
  fill_segments(n, [&](int64_t offset, int64_t m, uint64_t first) {
    UniformSink seg = sink;
    if (seg.keep) seg.keep += offset;
    else seg.o += offset;
    // Runs of 1024 numbers (a multiple of every vector width), split among the threads; the
    // numbers depend only on their counters, so not on the split.
    constexpr int64_t kRun = 1024;
    const int64_t runs = (m + kRun - 1) / kRun;
#pragma omp parallel for schedule(static) if (m > kParallelMinWork)
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t i0 = r * kRun, i1 = std::min(m, i0 + kRun);
      int64_t i = i0;
#if defined(MOE_RNG_AVX512)
      if (rng_avx512()) {
        const int64_t end = i0 + (i1 - i0) / 16 * 16;
        if (end > i) uniform_run16(seg, s.seed, s.stream, first, i, end);
        i = end;
      }
#endif
#if defined(__AVX2__)
      const int64_t end8 = i + (i1 - i) / 8 * 8;
      if (end8 > i) uniform_run8(seg, s.seed, s.stream, first, i, end8);
      i = end8;
#endif
      for (; i < i1; ++i) {
        uint32_t w[4];
        philox(s.seed, s.stream, first + uint64_t(i), w);
        seg.put(i, to_unit(w[0]));
      }
    }
  });
}

void Rng::fill_uniform(float* out, int64_t n, float lo, float hi) {
  UniformSink sink;
  sink.o = out, sink.lo = lo, sink.range = hi - lo;
  fill_uniforms(sink, n);
}

void Rng::fill_keep_mask(uint8_t* keep, int64_t n, float p) {
  UniformSink sink;
  sink.keep = keep, sink.p = p;
  fill_uniforms(sink, n);
}

void Rng::fill_keep_mask_causal(uint8_t* keep, int64_t mats, int64_t T, float p) {
  const int64_t TT = T * T, tri = T * (T + 1) / 2;
  const RngState s = s_;
  fill_segments(mats * TT, [&](int64_t offset, int64_t m, uint64_t first) {
    if (offset % TT != 0 || m % TT != 0)
      throw std::logic_error("Rng: a causal mask's segments must hold whole " + std::to_string(T) + "x" +
                             std::to_string(T) + " matrices");
    uint8_t* const out = keep + offset / TT * tri;
    const int64_t count = m / TT;
#if defined(MOE_RNG_AVX512)
    if (rng_avx512()) {
      // The counters of a matrix's lower triangle, row by row, relative to its first; padded
      // to whole vectors (the padding's bytes are not stored).
      thread_local std::vector<uint32_t> at;
      at.assign(size_t((tri + 15) / 16 * 16), 0u);
      for (int64_t t = 0, j = 0; t < T; ++t)
        for (int64_t c = 0; c <= t; ++c) at[size_t(j++)] = uint32_t(t * T + c);
      const uint32_t* const offsets = at.data();  // the calling thread's, shared with the team
#pragma omp parallel for schedule(static) if (count * tri > kParallelMinWork)
      for (int64_t k = 0; k < count; ++k)
        keep_mask_at16(s.seed, s.stream, first + uint64_t(k * TT), offsets, tri, p, out + k * tri);
      return;
    }
#endif
    // Row by row: the row's first t+1 numbers of a run whole vectors long, then copied.
#pragma omp parallel for schedule(static) if (count * tri > kParallelMinWork)
    for (int64_t k = 0; k < count; ++k) {
      uint8_t row[64];
      UniformSink sink;
      sink.keep = row, sink.p = p;
      for (int64_t t = 0; t < T; ++t) {
        const uint64_t row_first = first + uint64_t(k * TT + t * T);
        uint8_t* dst = out + k * tri + t * (t + 1) / 2;
        int64_t c = 0;
        for (; c <= t; c += 64) {
          const int64_t len = std::min<int64_t>(64, t + 1 - c);
          int64_t i = 0;
#if defined(__AVX2__)
          i = (len + 7) / 8 * 8;
          uniform_run8(sink, s.seed, s.stream, row_first + uint64_t(c), 0, i);
#endif
          for (; i < len; ++i) {
            uint32_t w[4];
            philox(s.seed, s.stream, row_first + uint64_t(c + i), w);
            sink.put(i, to_unit(w[0]));
          }
          std::memcpy(dst + c, row, size_t(len));
        }
      }
    }
  });
}

void Rng::fill_normal(float* out, int64_t n, float mean, float stddev) {
  const RngState s = s_;
  fill_segments(n, [&](int64_t offset, int64_t m, uint64_t first) {
    float* const o = out + offset;
    // A normal costs a Philox block, a log and a cos in double, some fifty times a uniform: the
    // router noise of one layer (tokens x experts) is already worth two threads.
    int64_t done = 0;
#if defined(__AVX2__)
    // Eight Philox blocks at a time, and their u1 and 2π·u2 in double as block_normal makes
    // them. The log and the cos four at a time (log_doubles4, cos_doubles4 in
    // moe/kernels/vmath.hpp), each within kLogDoublesUlps or kCosDoublesUlps of glibc's for
    // every input they can get (the test checks them all), so the product
    // r = sqrt(-2 log u1)·cos(2π u2) is within a relative kSafe of what glibc's give
    // (half the log's error, the cos's, and the roundings of sqrt and product in each, with
    // room for a glibc one unit off this one). Where no float rounding boundary lies within
    // that distance of r, float(r) is the float glibc's give; elsewhere (about one in 2^24),
    // and for u1 = 1 (log exactly 0), they are computed as before.
    constexpr double kSafe = (kLogDoublesUlps / 2 + kCosDoublesUlps + 4.5) * 0x1p-52;
    const int64_t blocks = m / 8;
    const RoundKeys keys(s.seed);
    parallel_for(blocks, m > kParallelMinWork / 32, [&](int64_t b) {
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
      for (int half = 0; half < 2; ++half) {
        const __m256d u = _mm256_load_pd(u1 + 4 * half);
        const __m256d r = _mm256_mul_pd(_mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), log_doubles4(u))),
                                        cos_doubles4(_mm256_load_pd(arg + 4 * half)));
        const __m256d d = _mm256_mul_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), r), _mm256_set1_pd(kSafe));
        const __m128 f = _mm256_cvtpd_ps(r);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_sub_pd(r, d)), hi = _mm256_cvtpd_ps(_mm256_add_pd(r, d));
        const int safe = _mm_movemask_ps(_mm_cmpeq_ps(lo, hi)) &
                         ~_mm256_movemask_pd(_mm256_cmp_pd(u, _mm256_set1_pd(1.0), _CMP_EQ_OQ));
        alignas(16) float fs[4];
        _mm_store_ps(fs, f);
        for (int j = 0; j < 4; ++j) {
          const int i = 4 * half + j;
          const float z = (safe >> j) & 1 ? fs[j] : box_muller(u1[i], arg[i]);
          dst[i] = mean + stddev * z;
        }
      }
    });
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
