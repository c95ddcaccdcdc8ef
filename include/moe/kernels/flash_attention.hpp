// Tiled causal attention (model.attention_kernel = "tiled"): the online softmax of FlashAttention
// (Dao et al. 2022; FlashAttention-2's loop order) over blocks of kTile queries and kTile keys, on
// the CPU. The forward keeps no T×T weights, only each row's log-sum-exp; the backward makes
// each block's weights again from it. Same layout and options as causal_attention (ops.hpp):
// qkv [B, T, (H + 2·H_kv)·D], grouped-query heads, scale, and dropout on the weights from the same
// keep bits (row t of (batch, head) bh from bit bh·T(T+1)/2 + t(t+1)/2), so the two kernels agree
// within float rounding (the sums run in another order), not bit for bit.
//
// Threads take whole (batch, key/value head) pairs, each writing only its own rows of y, lse and
// the gradient: 1 and 2 threads give the same bits.
#pragma once

#include <cstdint>

namespace moe {

struct FlashAttentionShape {
  int64_t B, T, H, H_kv, D;
  float scale;
};

// The per-thread work buffer of either pass, in floats.
int64_t flash_attention_work_floats(const FlashAttentionShape& s);

// y [B, T, H·D] = the attention of qkv; lse [B·H·T] the log of each row's softmax denominator
// (after the scale). mask: keep bits as above (null: no dropout), a kept weight times keep.
// work: omp_get_max_threads() slots of flash_attention_work_floats floats.
void flash_attention_forward(const float* qkv, const FlashAttentionShape& s, const uint16_t* mask, float keep,
                             float* y, float* lse, float* work);

// dqkv += the gradient of Σ dy·y with respect to qkv, from the forward's y and lse.
void flash_attention_backward(const float* qkv, const float* y, const float* dy, const float* lse,
                              const FlashAttentionShape& s, const uint16_t* mask, float keep, float* dqkv, float* work);

}  // namespace moe
