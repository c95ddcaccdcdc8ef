// exp for floats, computed the way glibc's expf computes it on a CPU with FMA (its
// __expf_fma, glibc 2.36): x·32/ln 2 = k + r in double, 2^(k/32) from a 32-entry table, a
// cubic in r, all with the same fused multiply-adds, then rounded to float. So the bits are
// those std::exp(float) gave on this project's machines, while exp_floats runs eight at a time
// and no longer depends on which variant the C library picks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moe {

namespace expf_detail {

// glibc's __exp2f_data: tab[i] = bits(2^(i/32)) - (i << 47), and the constants scaled by 32.
extern const uint64_t kTab[32];
constexpr double kInvLn2N = 0x1.71547652b82fep+5;  // 32 / ln 2
constexpr double kShift = 0x1.8p+52;
constexpr double kC0 = 0x1.c6af84b912394p-20, kC1 = 0x1.ebfce50fac4f3p-13, kC2 = 0x1.62e42ff0c52d6p-6;

// |x| >= 88 (or not finite): glibc's slow path, taken by calling it.
inline bool special(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return ((u >> 20) & 0x7ff) > 0x42a;
}

}  // namespace expf_detail

inline float exp_float(float x) {
  using namespace expf_detail;
  if (special(x)) return std::exp(x);
  const double xd = x;
  const double kds = std::fma(kInvLn2N, xd, kShift);
  uint64_t ki;
  std::memcpy(&ki, &kds, sizeof ki);
  const double kd = kds - kShift;
  const double r = std::fma(kInvLn2N, xd, -kd);
  const uint64_t t = kTab[ki % 32] + (ki << 47);
  double s;
  std::memcpy(&s, &t, sizeof s);
  const double z = std::fma(r, kC0, kC1);
  const double r2 = r * r;
  double y = std::fma(r, kC2, 1.0);
  y = std::fma(z, r2, y);
  return float(y * s);
}

// y[i] = exp_float(x[i]) for i < n; y may be x.
void exp_floats(const float* x, float* y, int64_t n);

}  // namespace moe
