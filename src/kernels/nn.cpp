#include "moe/kernels/nn.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "moe/kernels/expf.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// A row's statistics are chains of dependent adds in order of c; eight rows run side by side,
// so that their chains do not wait on each other. Products are rounded before they are added
// (fp-contract off): what the one-row loops compiled to where GCC vectorised their products,
// which was every c when C is a multiple of the vector width (and an fma in the remainder
// otherwise). Now the same for every C and every row grouping.
constexpr int64_t kRows = 8;

template <int64_t R>
__attribute__((optimize("fp-contract=off"))) void layernorm_stats(float* mean, float* rstd, const float* inp,
                                                                  int64_t C, float eps) {
  float m[R] = {}, v[R] = {};
  for (int64_t c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) m[r] += inp[r * C + c];
  for (int64_t r = 0; r < R; ++r) m[r] /= float(C);
  for (int64_t c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) v[r] += (inp[r * C + c] - m[r]) * (inp[r * C + c] - m[r]);
  for (int64_t r = 0; r < R; ++r) {
    mean[r] = m[r];
    rstd[r] = 1.f / std::sqrt(v[r] / float(C) + eps);
  }
}

// The means of dxhat = dy·w and of dxhat·xhat over each row.
template <int64_t R>
__attribute__((optimize("fp-contract=off"))) void layernorm_dx_stats(float* md, float* mdx, const float* dout,
                                                                     const float* inp, const float* w,
                                                                     const float* mean, const float* rstd,
                                                                     int64_t C) {
  float a[R] = {}, b[R] = {};
  for (int64_t c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) {
      const float xhat = (inp[r * C + c] - mean[r]) * rstd[r], dxhat = dout[r * C + c] * w[c];
      a[r] += dxhat;
      b[r] += dxhat * xhat;
    }
  for (int64_t r = 0; r < R; ++r) {
    md[r] = a[r] / float(C);
    mdx[r] = b[r] / float(C);
  }
}

// body(n0, R, stats) for blocks of kRows rows (the last ones alone), in parallel; stats(R) is
// the statistics function for R rows.
template <class Body>
void for_row_blocks(int64_t N, int64_t C, Body&& body) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  parallel_for(blocks, N * C > kParallelMinWork, [&](int64_t blk) {
    const int64_t n0 = blk * kRows, R = std::min(kRows, N - n0);
    if (R == kRows)
      body(n0, kRows, std::integral_constant<int64_t, kRows>());
    else
      for (int64_t n = n0; n < n0 + R; ++n) body(n, 1, std::integral_constant<int64_t, 1>());
  });
}

// The weight and bias gradients' sums of column c: dw[c] += Σ_n dy·(x - mean)·rstd, each term
// rounded after each product and then added (fp-contract off), and db[c] += Σ_n dy, in order
// of n. (What GCC made of this loop where it vectorised the products of four rows at a time,
// which it did for all rows when N is a multiple of 4 and for none of the last N % 4, which
// took an fma.)
__attribute__((optimize("fp-contract=off"))) void column_sum(const float* dout, const float* inp, const float* mean,
                                                             const float* rstd, int64_t N, int64_t C, int64_t c,
                                                             float* dw, float* db) {
  float sw = 0, sb = 0;
  for (int64_t n = 0; n < N; ++n) {
    const float dy = dout[n * C + c];
    sw += dy * (inp[n * C + c] - mean[n]) * rstd[n];
    sb += dy;
  }
  if (dw) dw[c] += sw;
  if (db) db[c] += sb;
}

// The same sums for kColBlock columns from c0, side by side in the lanes of kColVecs vectors:
// the one-column loops were chains of dependent adds, the most of the backward pass.
typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kColVecs = 4, kColBlock = 8 * kColVecs;
__attribute__((optimize("fp-contract=off"))) void column_sums(const float* dout, const float* inp, const float* mean,
                                                              const float* rstd, int64_t N, int64_t C, int64_t c0,
                                                              float* dw, float* db) {
  v8 sw[kColVecs] = {}, sb[kColVecs] = {};
  for (int64_t n = 0; n < N; ++n) {
    const float m = mean[n], s = rstd[n];
#pragma GCC unroll 4
    for (int64_t v = 0; v < kColVecs; ++v) {
      v8 dy, x;
      __builtin_memcpy(&dy, dout + n * C + c0 + 8 * v, sizeof dy);
      __builtin_memcpy(&x, inp + n * C + c0 + 8 * v, sizeof x);
      sw[v] += dy * (x - m) * s;
      sb[v] += dy;
    }
  }
  for (int64_t v = 0; v < kColVecs; ++v)
    for (int64_t j = 0; j < 8; ++j) {
      if (dw) dw[c0 + 8 * v + j] += sw[v][j];
      if (db) db[c0 + 8 * v + j] += sb[v][j];
    }
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, float eps) {
  for_row_blocks(N, C, [&](int64_t n0, int64_t R, auto rows) {
    layernorm_stats<decltype(rows)::value>(mean + n0, rstd + n0, inp + n0 * C, C, eps);
    for (int64_t n = n0; n < n0 + R; ++n) {
      const float* x = inp + n * C;
      float* y = out + n * C;
      const float m = mean[n], s = rstd[n];
      for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - m) * s * w[c] + b[c];
    }
  });
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C) {
  if (dinp) {
    for_row_blocks(N, C, [&](int64_t n0, int64_t R, auto rows) {
      float md[kRows], mdx[kRows];
      layernorm_dx_stats<decltype(rows)::value>(md, mdx, dout + n0 * C, inp + n0 * C, w, mean + n0, rstd + n0, C);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = n0 + r;
        const float *x = inp + n * C, *dy = dout + n * C;
        const float m = mean[n], s = rstd[n];
        float* dx = dinp + n * C;
        for (int64_t c = 0; c < C; ++c) {
          const float xhat = (x[c] - m) * s;
          dx[c] += (dy[c] * w[c] - md[r] - xhat * mdx[r]) * s;
        }
      }
    });
  }
  if (dw || db) {
    // Each column's two sums run down the rows in order; kColVecs vectors of columns side by
    // side in the lanes (the same sums as a column at a time, whose chains of dependent adds
    // took most of the backward pass), the last columns one by one.
    const int64_t wide = C / kColBlock;
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
    for (int64_t blk = 0; blk <= wide; ++blk) {
      if (blk < wide)
        column_sums(dout, inp, mean, rstd, N, C, blk * kColBlock, dw, db);
      else
        for (int64_t c = wide * kColBlock; c < C; ++c) column_sum(dout, inp, mean, rstd, N, C, c, dw, db);
    }
  }
}

namespace {
// Where row n of an RMSNorm's rows starts (see rmsnorm_forward).
inline int64_t norm_row(int64_t n, int64_t C, int64_t G, int64_t ld) { return ld == 0 ? n * C : n / G * ld + n % G * C; }
}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N, int64_t C, float eps,
                     int64_t G, int64_t ld) {
  parallel_for(N, N * C > kParallelMinWork, [&](int64_t n) {
    const int64_t at = norm_row(n, C, G, ld);
    const float* x = inp + at;
    float* y = out + at;
    float ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
    const float s = 1.f / std::sqrt(ss / float(C) + eps);
    rstd[n] = s;
    for (int64_t c = 0; c < C; ++c) y[c] = x[c] * s * w[c];
  });
}

void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int64_t N, int64_t C, int64_t G, int64_t ld) {
  if (dinp) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t at = norm_row(n, C, G, ld);
      const float *x = inp + at, *dy = dout + at;
      const float s = rstd[n];
      float m = 0;  // mean of dy·w·xhat
      for (int64_t c = 0; c < C; ++c) m += dy[c] * w[c] * x[c] * s;
      m /= float(C);
      float* dx = dinp + at;
      for (int64_t c = 0; c < C; ++c) dx[c] += (dy[c] * w[c] - x[c] * s * m) * s;
    }
  }
  if (dw) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
    for (int64_t c = 0; c < C; ++c) {
      float acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t at = norm_row(n, C, G, ld) + c;
        acc += dout[at] * inp[at] * rstd[n];
      }
      dw[c] += acc;
    }
  }
}

void rope_tables(float* cos, float* sin, int64_t first, int64_t n, int64_t D, double theta) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(first + t) * std::pow(theta, -2.0 * double(i) / double(D));
      cos[t * half + i] = float(std::cos(angle));
      sin[t * half + i] = float(std::sin(angle));
    }
}

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* x = inp + h * D;
    float* y = out + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      y[i] = a * cos[i] - b * sin[i];
      y[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* dy = dout + h * D;
    float* dx = dinp + h * D;
    for (int64_t i = 0; i < half; ++i) {
      dx[i] += dy[i] * cos[i] + dy[i + half] * sin[i];
      dx[i + half] += dy[i + half] * cos[i] - dy[i] * sin[i];
    }
  }
}

void softmax_forward(float* out, const float* inp, int64_t N, int64_t C, bool causal) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;
    float* y = out + n * C;
    const int64_t len = causal ? (n % C) + 1 : C;
    float mx = x[0];
    for (int64_t c = 1; c < len; ++c) mx = std::max(mx, x[c]);
    float z = 0;
    for (int64_t c = 0; c < len; ++c) y[c] = x[c] - mx;
    exp_floats(y, y, len);
    for (int64_t c = 0; c < len; ++c) z += y[c];
    const float inv = 1.f / z;
    for (int64_t c = 0; c < len; ++c) y[c] *= inv;
    for (int64_t c = len; c < C; ++c) y[c] = 0.f;
  }
}

void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* y = out + n * C;
    const float* dy = dout + n * C;
    float dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += dy[c] * y[c];
    float* dx = dinp + n * C;
    for (int64_t c = 0; c < C; ++c) dx[c] += y[c] * (dy[c] - dot);
  }
}

void cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets,
                           int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits + n * V;
    float* p = probs + n * V;
    float mx = x[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, x[v]);
    double z = 0;
    for (int64_t v = 0; v < V; ++v) p[v] = x[v] - mx;
    exp_floats(p, p, V);
    for (int64_t v = 0; v < V; ++v) z += p[v];
    const float inv = float(1.0 / z);
    for (int64_t v = 0; v < V; ++v) p[v] *= inv;
    losses[n] = float(std::log(z)) + mx - x[targets[n]];
  }
}

void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                            int64_t N, int64_t V) {
  const float s = dloss / float(N);
#pragma omp parallel for schedule(static) if (N * V > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    float* d = dlogits + n * V;
    const float* p = probs + n * V;
    for (int64_t v = 0; v < V; ++v) d[v] += s * p[v];
    d[targets[n]] -= s;
  }
}

void bias_backward(float* db, const float* dout, int64_t N, int64_t C) {
  // Channels in blocks so each thread sums whole columns, rows in order.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t bl = 0; bl < blocks; ++bl) {
    const int64_t c0 = bl * kBlock, c1 = std::min(C, c0 + kBlock);
    float acc[kBlock] = {};
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += dout[n * C + c];
    for (int64_t c = c0; c < c1; ++c) db[c] += acc[c - c0];
  }
}

}  // namespace moe
