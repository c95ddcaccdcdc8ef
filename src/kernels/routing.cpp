#include "moe/kernels/routing.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// Selection by insertion (K and E are small): puts id into idx[0..filled), at most K ids by
// descending score. Strictly greater wins, so ties keep the lower id.
template <class Score>
void insert_top(int32_t* idx, int64_t& filled, int64_t K, int32_t id, const Score& score) {
  const float v = score(id);
  int64_t pos = filled;
  while (pos > 0 && v > score(idx[pos - 1])) --pos;
  if (pos >= K) return;
  for (int64_t j = std::min(filled, K - 1); j > pos; --j) idx[j] = idx[j - 1];
  idx[pos] = id;
  if (filled < K) ++filled;
}

}  // namespace

void topk_select(int32_t* index, const float* scores, const float* bias, int64_t N, int64_t E, int64_t K) {
  parallel_for(N, N * E > kParallelMinWork, [&](int64_t n) {
    const float* x = scores + n * E;
    auto score = [&](int32_t e) { return bias ? x[e] + bias[e] : x[e]; };
    int32_t* idx = index + n * K;
    int64_t filled = 0;
    for (int32_t e = 0; e < E; ++e) insert_top(idx, filled, K, e, score);
  });
}

void topk_select_grouped(int32_t* index, const float* scores, const float* bias, int64_t N, int64_t E, int64_t K,
                         int64_t G, int64_t open) {
  if (G == 1) return topk_select(index, scores, bias, N, E, K);
  const int64_t per = E / G;
  parallel_for(N, N * E > kParallelMinWork, [&](int64_t n) {
    const float* x = scores + n * E;
    auto score = [&](int32_t e) { return bias ? x[e] + bias[e] : x[e]; };
    float group_score[64];
    int32_t best[64];  // the open groups, by descending score
    for (int64_t g = 0; g < G; ++g) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        const float v = score(e);
        if (v > b1) b2 = b1, b1 = v;
        else if (v > b2) b2 = v;
      }
      group_score[g] = per == 1 ? b1 : b1 + b2;
    }
    int64_t filled = 0;
    for (int32_t g = 0; g < G; ++g) insert_top(best, filled, open, g, [&](int32_t h) { return group_score[h]; });
    uint64_t is_open = 0;
    for (int64_t j = 0; j < open; ++j) is_open |= uint64_t(1) << best[j];
    int32_t* idx = index + n * K;
    filled = 0;
    for (int32_t e = 0; e < E; ++e)
      if (is_open >> (e / per) & 1) insert_top(idx, filled, K, e, score);
  });
}

void topk_softmax_forward(float* weights, const int32_t* index, const float* logits, int64_t N, int64_t E,
                          int64_t K) {
  parallel_for(N, N * E > kParallelMinWork, [&](int64_t n) {
    const float* x = logits + n * E;
    const int32_t* idx = index + n * K;
    float* w = weights + n * K;
    float mx = x[idx[0]];
    for (int64_t k = 1; k < K; ++k) mx = std::max(mx, x[idx[k]]);
    float z = 0;
    for (int64_t k = 0; k < K; ++k) z += (w[k] = std::exp(x[idx[k]] - mx));
    for (int64_t k = 0; k < K; ++k) w[k] /= z;
  });
}

void topk_softmax_backward(float* dlogits, const float* dweights, const float* weights, const int32_t* index,
                           int64_t N, int64_t E, int64_t K) {
#pragma omp parallel for schedule(static) if (N * E > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* w = weights + n * K;
    const float* dw = dweights + n * K;
    float dot = 0;
    for (int64_t k = 0; k < K; ++k) dot += dw[k] * w[k];
    for (int64_t k = 0; k < K; ++k) dlogits[n * E + index[n * K + k]] += w[k] * (dw[k] - dot);
  }
}

void gather_cols_forward(float* y, const float* x, const int32_t* index, int64_t N, int64_t E, int64_t K) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) y[n * K + k] = x[n * E + index[n * K + k]];
}

void normalize_rows_forward(float* y, const float* x, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    float s = 0;
    for (int64_t k = 0; k < K; ++k) s += x[n * K + k];
    for (int64_t k = 0; k < K; ++k) y[n * K + k] = x[n * K + k] / s;
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

int64_t apply_capacity(int32_t* offsets, int32_t* token, int32_t* gate_pos, const float* gates, int64_t E,
                       int64_t capacity) {
  int64_t dropped = 0, out = 0;
  thread_local std::vector<int32_t> order, keep_token, keep_pos;  // reused: no allocation per step
  for (int64_t e = 0; e < E; ++e) {
    const int32_t begin = offsets[e], end = offsets[e + 1], n = end - begin;
    offsets[e] = int32_t(out);
    if (n <= capacity) {
      for (int32_t s = begin; s < end; ++s, ++out) token[out] = token[s], gate_pos[out] = gate_pos[s];
      continue;
    }
    // The `capacity` largest gates, ties to the earlier slot; then back to row order.
    order.resize(size_t(n));
    std::iota(order.begin(), order.end(), begin);
    // Ties broken by slot: the order stable_sort would give, without its temporary buffer.
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      const float ga = gates[gate_pos[a]], gb = gates[gate_pos[b]];
      return ga > gb || (ga == gb && a < b);
    });
    order.resize(size_t(capacity));
    std::sort(order.begin(), order.end());
    keep_token.clear();
    keep_pos.clear();
    for (int32_t s : order) keep_token.push_back(token[s]), keep_pos.push_back(gate_pos[s]);
    for (size_t i = 0; i < order.size(); ++i, ++out) token[out] = keep_token[i], gate_pos[out] = keep_pos[i];
    dropped += n - capacity;
  }
  offsets[E] = int32_t(out);
  return dropped;
}

RowsByTarget rows_by_target(int32_t* start, int32_t* src, const int32_t* rows, const int32_t* off, int64_t G,
                            int64_t N) {
  std::fill(start, start + N + 1, 0);
  for (int64_t i = 0; i < off[G]; ++i) ++start[rows[i] + 1];
  for (int64_t t = 0; t < N; ++t) start[t + 1] += start[t];
  // Filled through start[t] as a cursor (left at t's end), then moved back one row.
  for (int64_t e = G; e-- > 0;)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) src[start[rows[i]]++] = int32_t(i);
  for (int64_t t = N; t > 0; --t) start[t] = start[t - 1];
  start[0] = 0;
  return {start, src, N};
}

void scatter_add_weighted(float* acc, const float* h, const int32_t* rows, const float* gates,
                          const int32_t* gate_pos, int64_t n, int64_t C, const RowsByTarget* by) {
  // Every element of a row takes its slots in slot order, whichever thread adds them.
  if (by && n * C > kParallelMinWork) {
    parallel_for(by->N, true, [&](int64_t t) {
      float* d = acc + t * C;
      for (int32_t k = by->start[t]; k < by->start[t + 1]; ++k) {
        const int64_t i = by->src[k];
        const float w = gates[gate_pos[i]];
        const float* s = h + i * C;
        for (int64_t c = 0; c < C; ++c) d[c] += w * s[c];
      }
    });
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float w = gates[gate_pos[i]];
    float* d = acc + int64_t(rows[i]) * C;
    const float* s = h + i * C;
    for (int64_t c = 0; c < C; ++c) d[c] += w * s[c];
  }
}

}  // namespace moe
