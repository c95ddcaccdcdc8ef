#include "moe/kernels/nn.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/kernels/expf.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, float eps) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* x = inp + n * C;
    float m = 0;
    for (int64_t c = 0; c < C; ++c) m += x[c];
    m /= float(C);
    float v = 0;
    for (int64_t c = 0; c < C; ++c) v += (x[c] - m) * (x[c] - m);
    v /= float(C);
    const float s = 1.f / std::sqrt(v + eps);
    float* y = out + n * C;
    for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - m) * s * w[c] + b[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C) {
  if (dinp) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
    for (int64_t n = 0; n < N; ++n) {
      const float* x = inp + n * C;
      const float* dy = dout + n * C;
      const float m = mean[n], s = rstd[n];
      float mean_dxhat = 0, mean_dxhat_xhat = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - m) * s, dxhat = dy[c] * w[c];
        mean_dxhat += dxhat;
        mean_dxhat_xhat += dxhat * xhat;
      }
      mean_dxhat /= float(C);
      mean_dxhat_xhat /= float(C);
      float* dx = dinp + n * C;
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - m) * s;
        dx[c] += (dy[c] * w[c] - mean_dxhat - xhat * mean_dxhat_xhat) * s;
      }
    }
  }
  if (dw || db) {
#pragma omp parallel for schedule(static) if (N * C > kParallelMinWork)
    for (int64_t c = 0; c < C; ++c) {
      float sw = 0, sb = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float dy = dout[n * C + c];
        sw += dy * (inp[n * C + c] - mean[n]) * rstd[n];
        sb += dy;
      }
      if (dw) dw[c] += sw;
      if (db) db[c] += sb;
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
