// Routing kernels for sparse MoE layers.
#pragma once

#include <cstdint>

namespace moe {

// Per row of scores [N, E]: the ids of the K largest of scores + bias (bias [E], may be null),
// in descending order, into index [N, K]. Ties: the lower expert id first.
void topk_select(int32_t* index, const float* scores, const float* bias, int64_t N, int64_t E, int64_t K);
// Group-limited topk_select (DeepSeek-V3): the E experts form G groups of E / G in id order; a
// group's score is the sum of its two best scores + bias (its one, in groups of one); per row
// only the `open` groups of best score (ties: the lower group) are open, and the K largest of
// their experts are chosen. G == 1 is topk_select. G <= 64.
void topk_select_grouped(int32_t* index, const float* scores, const float* bias, int64_t N, int64_t E, int64_t K,
                         int64_t G, int64_t open);
// weights [N, K] = per row, softmax over the logits at the K ids in index.
void topk_softmax_forward(float* weights, const int32_t* index, const float* logits, int64_t N, int64_t E, int64_t K);
// dlogits[n, index[n,k]] += softmax backward of the kept weights.
void topk_softmax_backward(float* dlogits, const float* dweights, const float* weights, const int32_t* index,
                           int64_t N, int64_t E, int64_t K);

// y [N, K] = per row n, x[n, index[n, k]]: x [N, E].
void gather_cols_forward(float* y, const float* x, const int32_t* index, int64_t N, int64_t E, int64_t K);
// y [N, K] = each row of x [N, K] divided by its sum (y may be x).
void normalize_rows_forward(float* y, const float* x, int64_t N, int64_t K);

// From top-k ids (N*K) build per-expert lists with a counting sort: offsets[E+1], and for
// slot s in [offsets[e], offsets[e+1]): token[s] (row of x) and gate_pos[s] (= n*K + k, the
// flat position in the [N, K] weights). Tokens appear in increasing row order per expert.
void group_by_expert(const int32_t* index, int64_t N, int64_t K, int64_t E, int32_t* offsets, int32_t* token,
                     int32_t* gate_pos);

// Expert capacity on grouped slots (as group_by_expert leaves them): an expert with more than
// `capacity` slots keeps the `capacity` with the largest gate weight (gates read at gate_pos;
// ties: the lower slot), still in increasing row order; the lists are compacted in place and
// offsets updated. Returns the number of dropped slots.
int64_t apply_capacity(int32_t* offsets, int32_t* token, int32_t* gate_pos, const float* gates, int64_t E,
                       int64_t capacity);

// The sources of each target row, for sums over rows that run in parallel by target: a thread
// owns whole rows of the result (each a contiguous run of memory) and adds a row's sources in
// the order a serial loop would. Sources are the i < off[G] with rows[i] == t, visited group by
// group from the last group to the first (G = 1, off = {0, n}: i ascending), i ascending within
// a group. start: N + 1 entries (t's sources are src[start[t] .. start[t + 1])); src: off[G].
struct RowsByTarget {
  const int32_t* start = nullptr;
  const int32_t* src = nullptr;
  int64_t N = 0;
};
RowsByTarget rows_by_target(int32_t* start, int32_t* src, const int32_t* rows, const int32_t* off, int64_t G,
                            int64_t N);

// acc[rows[i]] += gates[gate_pos[i]] · h[i] for i < n: h [n, C], acc [N, C]. A row hit by
// several slots takes them in slot order. Given `by` (rows_by_target of these rows, one group),
// distinct rows go in parallel when the sum is large enough; without it, one thread.
void scatter_add_weighted(float* acc, const float* h, const int32_t* rows, const float* gates,
                          const int32_t* gate_pos, int64_t n, int64_t C, const RowsByTarget* by = nullptr);

}  // namespace moe
