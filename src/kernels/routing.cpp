#include "moe/kernels/routing.hpp"

#include <cmath>

namespace moe {

void topk_softmax_forward(float* weights, int32_t* index, const float* logits, int64_t N, int64_t E, int64_t K) {
#pragma omp parallel for schedule(static) if (N * E > 16384)
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits + n * E;
    int32_t* idx = index + n * K;
    // Selection by insertion: K and E are small. Strictly greater wins, so ties keep the lower id.
    int64_t filled = 0;
    for (int32_t e = 0; e < E; ++e) {
      int64_t pos = filled;
      while (pos > 0 && x[e] > x[idx[pos - 1]]) --pos;
      if (pos >= K) continue;
      for (int64_t j = std::min(filled, K - 1); j > pos; --j) idx[j] = idx[j - 1];
      idx[pos] = e;
      if (filled < K) ++filled;
    }
    float* w = weights + n * K;
    const float mx = x[idx[0]];
    float z = 0;
    for (int64_t k = 0; k < K; ++k) z += (w[k] = std::exp(x[idx[k]] - mx));
    for (int64_t k = 0; k < K; ++k) w[k] /= z;
  }
}

void topk_softmax_backward(float* dlogits, const float* dweights, const float* weights, const int32_t* index,
                           int64_t N, int64_t E, int64_t K) {
#pragma omp parallel for schedule(static) if (N * E > 16384)
  for (int64_t n = 0; n < N; ++n) {
    const float* w = weights + n * K;
    const float* dw = dweights + n * K;
    float dot = 0;
    for (int64_t k = 0; k < K; ++k) dot += dw[k] * w[k];
    for (int64_t k = 0; k < K; ++k) dlogits[n * E + index[n * K + k]] += w[k] * (dw[k] - dot);
  }
}

void group_by_expert(const int32_t* index, int64_t N, int64_t K, int64_t E, int32_t* offsets, int32_t* token,
                     int32_t* gate_pos) {
  for (int64_t e = 0; e <= E; ++e) offsets[e] = 0;
  for (int64_t i = 0; i < N * K; ++i) ++offsets[index[i] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  // Fill in row order using a running cursor per expert (offsets[e] restored after).
  for (int64_t i = 0; i < N * K; ++i) {
    const int32_t e = index[i];
    const int32_t s = offsets[e]++;
    token[s] = int32_t(i / K);
    gate_pos[s] = int32_t(i);
  }
  for (int64_t e = E; e > 0; --e) offsets[e] = offsets[e - 1];
  offsets[0] = 0;
}

}  // namespace moe
