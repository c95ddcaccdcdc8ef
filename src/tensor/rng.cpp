#include "moe/tensor/rng.hpp"

#include <cmath>

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

void Rng::fill_uniform(float* out, int64_t n, float lo, float hi) {
  const RngState s = s_;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w[4];
    philox(s.seed, s.stream, s.counter + uint64_t(i), w);
    out[i] = lo + (hi - lo) * to_unit(w[0]);
  }
  s_.counter += uint64_t(n);
}

void Rng::fill_normal(float* out, int64_t n, float mean, float stddev) {
  const RngState s = s_;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w[4];
    philox(s.seed, s.stream, s.counter + uint64_t(i), w);
    out[i] = mean + stddev * block_normal(w);
  }
  s_.counter += uint64_t(n);
}

}  // namespace moe
