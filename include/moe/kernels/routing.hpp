// Routing kernels for sparse MoE layers.
#pragma once

#include <cstdint>

namespace moe {

// Per row of logits [N, E]: the K largest (ties: lower expert id first), in descending order,
// into index [N, K]; weights [N, K] = softmax over those K logits.
void topk_softmax_forward(float* weights, int32_t* index, const float* logits, int64_t N, int64_t E, int64_t K);
// dlogits[n, index[n,k]] += softmax backward of the kept weights.
void topk_softmax_backward(float* dlogits, const float* dweights, const float* weights, const int32_t* index,
                           int64_t N, int64_t E, int64_t K);

// From top-k ids (N*K) build per-expert lists with a counting sort: offsets[E+1], and for
// slot s in [offsets[e], offsets[e+1]): token[s] (row of x) and gate_pos[s] (= n*K + k, the
// flat position in the [N, K] weights). Tokens appear in increasing row order per expert.
void group_by_expert(const int32_t* index, int64_t N, int64_t K, int64_t E, int32_t* offsets, int32_t* token,
                     int32_t* gate_pos);

}  // namespace moe
