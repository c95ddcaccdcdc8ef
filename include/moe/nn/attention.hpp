// Causal multi-head self-attention: a fused qkv projection (no bias; rows [q; k; v], H query
// heads of D = C / H, then H_kv key and H_kv value heads: head h at rows h*D..(h+1)*D of q, its
// key and value head h / (H / H_kv) likewise in k and v), optionally RMSNorm on each query and
// key head (model.qk_norm) and then RoPE on them (model.position = "rope"),
// softmax(q·kᵀ·scale) with dropout on the weights, the weighted sum of v, and the output
// projection. H_kv = model.n_kv_head (0: H): grouped-query attention when below H, multi-query
// at 1.
//
// RoPE uses the rotate-half pairing (GPT-NeoX, Hugging Face Llama; moe/kernels/nn.hpp): channel
// i of a head pairs with channel i + D/2. The PyTorch twin (scripts/torch_twin.py) does the same.
#pragma once

#include <string>

#include "moe/io/config.hpp"
#include "moe/nn/linear.hpp"
#include "moe/nn/remake.hpp"

namespace moe {

struct Attention {
  Linear qkv;                    // C -> C + 2·H_kv·D
  int q_norm = -1, k_norm = -1;  // [D] each: the QK-norm gains (model.qk_norm), else -1
  Linear proj;                   // C -> C
  int64_t C = 0, H = 0, H_kv = 0, D = 0;
  float scale = 0;
  bool use_rope = false;  // model.position = "rope"
  bool tiled = false;     // model.attention_kernel = "tiled"
  double rope_theta = 0;

  // Sizes and options from cfg.model (n_embed, n_head, n_kv_head, attn_scale, position,
  // rope_theta, qk_norm, attention_kernel).
  static Attention make(ParamBuilder& pb, const std::string& prefix, const Config& cfg);
  // h (B, T, C) -> the output projection (B, T, C), before the residual's dropout. Dropout p on
  // the weights; what the block makes again comes from mem.
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& h, float p, bool training, Rng& rng, Remake& mem) const;
  // The n rows of w.normed at positions cache.len.. into w.sub, their keys and values into layer
  // `layer` of the cache. Keys are cached after RoPE; with rope the cache is a ring of block_size
  // positions (position p in slot p % block_size), each query seeing the last block_size keys.
  // Layer 0 fills w.rope_cos and w.rope_sin for the n positions; the other layers read them.
  void decode(const ParamStore& ps, KVCache& cache, int64_t layer, int64_t n) const;
};

}  // namespace moe
