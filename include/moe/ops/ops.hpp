// Autograd ops: the thin layer over the raw kernels in moe/kernels/.
//
// Conventions (see moe/tensor/graph.hpp): each op checks shapes and throws ShapeError
// naming itself; allocates its output with g.output(); runs the forward kernel; and, when
// the output tracks a gradient, records a closure that ADDS into the inputs' gradients.
// Shape letters: B batch, T time, C channels, H heads, D head size, N rows (B*T tokens),
// E experts, K top-k, V vocabulary.
#pragma once

#include <cstdint>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/bits.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/rng.hpp"
#include "moe/tensor/tensor.hpp"

namespace moe {

// An output made again in the backward pass: ops given a Regen* put their output in the
// scope's scratch memory (Graph::scratch_output), which the next block overwrites, and set
// *regen to a closure that recomputes it, bit for bit, where it was. The caller records it
// (g.record(regen)) after the last op whose backward reads the output, so that the backward
// pass runs it before theirs; the op's own backward never reads its output.
struct Regen {
  void (*run)(const void*) = nullptr;
  const void* state = nullptr;
  Part part = Part::Other;  // the op's, for the step profiler
  void operator()() const {
    if (!run) return;
    PartScope scope(part);
    run(state);
  }
};
// A Regen running a copy of f, kept in g's arena (so f must be trivially destructible).
template <class F>
Regen make_regen(Graph& g, const F& f) {
  return Regen{[](const void* p) { (*static_cast<const F*>(p))(); }, g.arena().copy_of(f), current_part()};
}

// ---- dense algebra (src/ops/dense_ops.cpp) ----

// y = x·Wᵀ + b. x [..., in], w [out, in] (as torch.nn.Linear), b [out] or b.data == nullptr
// for no bias. y [..., out]. linear and linear_act are grouped_linear with one group. With
// regen, y is regenerated (see Regen) from x, which must hold its forward values again by then.
Tensor linear(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, Regen* regen = nullptr);
// act(x·Wᵀ + b) in one op: the GEMM, then bias and activation in one pass over the output;
// the backward turns dy into d(pre-activation) in place and runs linear's three products.
// The same values as linear followed by relu/gelu/silu, with one tensor and two passes
// fewer.
Tensor linear_act(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, Activation kind);
// The linears of G experts in one op: rows offsets[e]..offsets[e+1] of x [S, in] go through
// w[e] [out, in] and b[e] (b[e].data null: no bias), then `act` when given (as linear_act),
// into the same rows of y [S, out]. Several experts run on separate threads, largest first,
// each product on one thread: gemm gives a row the same bits whatever the thread count, so
// every row gets the bits it gets alone. offsets, w and b are copied.
Tensor grouped_linear(Graph& g, const Tensor& x, const int32_t* offsets, int64_t G, const Tensor* w, const Tensor* b,
                      const Activation* act = nullptr, Regen* regen = nullptr);
// grouped_linear(grouped_linear(x, w1, b1, act), w2, b2): the same bits, but each group runs
// both products back to back on one thread (and the backward both of theirs), so that its
// hidden rows are still in cache for the second.
Tensor grouped_mlp(Graph& g, const Tensor& x, const int32_t* offsets, int64_t G, const Tensor* w1, const Tensor* b1,
                   Activation act, const Tensor* w2, const Tensor* b2);
// Batched matmul over the leading dimensions (all but the last two, equal for a and b):
// y = op(a)·op(b) with op = transpose when the flag is set. a [..., M, K] (or [..., K, M]
// when trans_a), b [..., K, N] (or [..., N, K] when trans_b); y [..., M, N].
Tensor bmm(Graph& g, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b);
// y = a + b, same shapes.
Tensor add(Graph& g, const Tensor& a, const Tensor& b);
// The same, written over b's data (Graph::output_over): for a b whose data no backward reads.
// With regen, the sum is made again (see Regen) over b's data, which must hold b's forward
// values again by then (b's own Regen run first).
Tensor add_into(Graph& g, const Tensor& a, const Tensor& b, Regen* regen = nullptr);
// y = x + bias, bias [C] broadcast over the rows of x [..., C].
Tensor add_bias(Graph& g, const Tensor& x, const Tensor& bias);
// y = a ⊙ b, same shapes.
Tensor mul(Graph& g, const Tensor& a, const Tensor& b);
// y = s · x.
Tensor scale(Graph& g, const Tensor& x, float s);
// y[n] = table[ids[n]]: ids N ints in [0, V), table [V, C]; y [shape of ids..., C] given as
// out_shape (for example {B, T, C}). Throws on an id out of range.
Tensor embedding(Graph& g, const int32_t* ids, const Tensor& table, const Shape& out_shape);
// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) · w + b (biased var).
// With regen, the output is regenerated (see Regen).
Tensor layernorm(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, float eps = 1e-5f,
                 Regen* regen = nullptr);
// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · w, no bias. With regen, the
// output is regenerated (see Regen).
Tensor rmsnorm(Graph& g, const Tensor& x, const Tensor& w, float eps = 1e-5f, Regen* regen = nullptr);

// ---- elementwise (src/ops/elementwise_ops.cpp) ----
Tensor relu(Graph& g, const Tensor& x);
Tensor gelu(Graph& g, const Tensor& x);      // exact erf form, as torch's default
Tensor silu(Graph& g, const Tensor& x);      // x · sigmoid(x)
Tensor softplus(Graph& g, const Tensor& x);  // log(1 + exp(x)), torch's threshold 20
// Inverted dropout: zero with probability p, scale the kept by 1/(1-p). Identity when p == 0
// or when `training` is false. The mask comes from rng (the counter advances by numel).
// in_place writes y over x's data (Graph::output_over): for an x whose data no backward reads.
// With regen, y is made again (see Regen) from x's data, which must hold x's forward values
// again by then (x's own Regen run first, when in place); without dropout it does nothing.
Tensor dropout(Graph& g, const Tensor& x, float p, bool training, Rng& rng, bool in_place = false,
               Regen* regen = nullptr);
// x + dropout(o) in one op, written over o's data (o: an output no backward reads, as
// dropout's in_place), with one mask draw and one pass each way: the same values, gradients
// and rng draws as add_into(x, dropout(o, in_place)), and without dropout add_into(x, o). With
// regen, as dropout's (o's own Regen first).
Tensor dropout_add_into(Graph& g, const Tensor& x, const Tensor& o, float p, bool training, Rng& rng,
                        Regen* regen = nullptr);
// Dropout's masks are drawn as bytes, 1 where kept and 0 where dropped (Rng::fill_keep_mask;
// the ops that fuse dropout, causal_attention, draw theirs the same way), and kept as bits
// (kernels/bits.hpp). An element kept is multiplied by dropout_scale(p), a dropped one by 0.
// keep_bits makes one: fill(bytes) draws the n bytes into scratch the arena takes back, and
// the bits stay in the arena, with `room` words after them for readers that load whole words.
template <class Fill>
uint16_t* keep_bits(Graph& g, int64_t n, int64_t room, Fill&& fill) {
  auto* bits = static_cast<uint16_t*>(g.arena().alloc_bytes(sizeof(uint16_t) * size_t(bit_words(n) + room)));
  const Arena::Mark drawn = g.arena().mark();
  auto* bytes = static_cast<uint8_t*>(g.arena().alloc_bytes(size_t(n)));
  fill(bytes);
  bits_from_bytes(bits, bytes, n);
  g.arena().rewind(drawn);
  return bits;
}
inline float dropout_scale(float p) { return 1.f / (1.f - p); }
// The factor of one element: what a float mask would hold.
inline float dropout_factor(uint8_t kept, float scale) { return kept ? scale : 0.f; }
// Scalar (shape {1}) sum and mean of all elements.
Tensor sum(Graph& g, const Tensor& x);
Tensor mean(Graph& g, const Tensor& x);

// ---- layout (src/ops/layout_ops.cpp) ----
// [B, T, H*D] -> [B, H, T, D]: splits the channels into heads.
Tensor split_heads(Graph& g, const Tensor& x, int64_t H);
// [B, H, T, D] -> [B, T, H*D]: the inverse.
Tensor merge_heads(Graph& g, const Tensor& x);
// Columns [begin, begin + width) of the last dimension, copied: [..., C] -> [..., width].
// Used to split a fused qkv projection into q, k and v.
Tensor slice_cols(Graph& g, const Tensor& x, int64_t begin, int64_t width);

// ---- fused attention (src/ops/attention_ops.cpp) ----
// Causal multi-head self-attention from a fused projection qkv [B, T, C + 2·H_kv·D] (columns:
// q [C = H·D], k and v [H_kv·D] each; head h at columns h*D..(h+1)*D of q, and its key and value
// head h / (H / H_kv) likewise in k and v: grouped-query attention when H_kv < H, the usual
// 3C columns when H_kv == H): per (batch, head), scores q·kᵀ·scale,
// causal softmax, dropout with probability p on the weights when training (one rng draw
// per weight, in [B, H, T, T] order), and the weighted sum of v. Output [B, T, C], heads
// side by side. One kernel forward and one backward, parallel over (batch, head). With regen,
// the output is regenerated (see Regen) from the weights the op keeps and qkv's v columns.
Tensor causal_attention(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, float scale, float p, bool training,
                        Rng& rng, Regen* regen = nullptr);
// The same attention by the tiled kernel (moe/kernels/flash_attention.hpp, model.attention_kernel =
// "tiled"): the same dropout draws, no T×T weights kept (each row's log-sum-exp instead); equal to
// causal_attention within float rounding. With regen, the output is computed again from qkv.
Tensor tiled_causal_attention(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, float scale, float p,
                              bool training, Rng& rng, Regen* regen = nullptr);

// ---- the queries and keys of a fused projection (src/ops/qk_ops.cpp) ----
// qkv [B, T, (H + 2·H_kv)·D]: per row the H query heads, the H_kv key heads, then the H_kv value
// heads, D channels each. Both ops return a new tensor of that shape whose value columns are
// a copy of qkv's.
// QK-norm: RMSNorm over each query head with gain wq [D], each key head with gain wk [D].
Tensor qk_rmsnorm(Graph& g, const Tensor& qkv, const Tensor& wq, const Tensor& wk, int64_t H, int64_t H_kv,
                  float eps = 1e-5f);
// RoPE: the query and key heads of row (b, t) rotated by position t (rope_forward in
// moe/kernels/nn.hpp: the rotate-half pairing, frequencies theta^(-2i/D)). Linear in qkv:
// the backward is the inverse rotation.
Tensor rope(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, double theta);

// ---- softmax and loss (src/ops/softmax_ops.cpp) ----
// Softmax over the last dimension.
Tensor softmax(Graph& g, const Tensor& x);
// x [..., T, T] scores; entries with column > row are masked (-inf) before the softmax
// over the last dimension, so masked outputs are exactly 0.
Tensor causal_softmax(Graph& g, const Tensor& x);
// Mean over the N rows of -log softmax(logits)[target]. logits [..., V] with N rows,
// targets N ints in [0, V). Output shape {1}. row_losses, if given, receives the N rows'
// losses (in the graph's arena, valid until it is cleared).
Tensor cross_entropy(Graph& g, const Tensor& logits, const int32_t* targets, const float** row_losses = nullptr);
// The mean cross_entropy reports for n rows' losses: summed in double, in row order.
float mean_loss(const float* row_losses, int64_t n);

// ---- sparse MoE routing (src/ops/moe_ops.cpp) ----
struct TopK {
  Tensor weights;        // [N, K]: softmax over the K kept logits of each row (sum to 1)
  int32_t* index;        // N*K expert ids, arena-owned; per row in descending logit order
};
// For each row of logits [N, E], keep the K largest (ties: the lower expert id first) and
// softmax over them. Gradient flows from weights into the kept logits only. With
// select_bias [E], the K are chosen by logits + bias; the weights still use the logits.
TopK topk_softmax(Graph& g, const Tensor& logits, int64_t K, const float* select_bias = nullptr);
// The ids (N*K, arena-owned) of the K largest of scores [N, E] + bias per row; no gradient.
int32_t* topk_indices(Graph& g, const Tensor& scores, int64_t K, const float* select_bias = nullptr);
// y[n, k] = x[n, index[n*K + k]]: x [N, E] -> y [N, K].
Tensor gather_cols(Graph& g, const Tensor& x, const int32_t* index, int64_t K);
// Each row divided by its sum: x [N, K] (positive entries) -> y [N, K].
Tensor normalize_rows(Graph& g, const Tensor& x);
// log Σ_j exp(x[n, j]) per row: x [N, E] -> y [N].
Tensor logsumexp(Graph& g, const Tensor& x);

// ---- router balancing losses (src/ops/moe_ops.cpp), scalars of shape {1} ----
// Switch Transformer load-balancing loss E · Σ_i f_i · P_i: P_i the mean over the N rows of
// softmax(logits)[:, i], f_i = slots[i] / Σ slots the fraction of routed slots expert i got
// (a count, so no gradient flows through it). logits [N, E], slots E counts.
Tensor switch_aux_loss(Graph& g, const Tensor& logits, const int32_t* slots);
// ST-MoE router z-loss: mean over rows of logsumexp(logits)².
Tensor router_z_loss(Graph& g, const Tensor& logits);
// y[i] = x[rows[i]] for i < n: x [N, C] -> y [n, C]. rows arena- or caller-owned, must
// outlive backward.
Tensor gather_rows(Graph& g, const Tensor& x, const int32_t* rows, int64_t n);
// gather_rows over G groups, group e at rows[offsets[e]..offsets[e+1]): what G separate
// gather_rows give, the backward included (it adds the groups' gradients in reverse group
// order, as the separate ops' backward passes would; rows in a group in index order). The
// backward splits the columns between the threads. offsets is copied.
// With regen, the output is regenerated (see Regen) from x, which must hold its forward
// values again by then.
Tensor gather_row_groups(Graph& g, const Tensor& x, const int32_t* rows, const int32_t* offsets, int64_t G,
                         Regen* regen = nullptr);
// In place: acc[rows[i]] += gates_flat[gate_pos[i]] · h[i] for i < n, where h [n, C],
// acc [N, C] and gates any tensor read as flat. Gradients flow into h and gates; acc's
// gradient passes through unchanged (it is an accumulator made by g.zeros()). Rows may
// repeat; gate positions must be distinct (each routed slot owns its gate), because the
// backward writes gate gradients in parallel.
void index_add_weighted(Graph& g, Tensor& acc, const Tensor& h, const int32_t* rows,
                        const Tensor& gates, const int32_t* gate_pos, int64_t n);

// ---- across processes (src/ops/dist_ops.cpp), collective: every rank must call it ----
// Rows to other ranks (MPI_Alltoallv): x [n, C] holds send_rows[r] rows for rank r, in rank
// order; y [Σ recv_rows, C] the rows from every rank, in rank order. The backward sends the
// gradients back the same way. send_rows and recv_rows (dist::size() counts each) are copied.
Tensor exchange_rows(Graph& g, const Tensor& x, const int64_t* send_rows, const int64_t* recv_rows);

}  // namespace moe
