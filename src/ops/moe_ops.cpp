// Sparse MoE routing ops: top-k softmax, row gather, weighted scatter-add.
#include <cstring>

#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

TopK topk_softmax(Graph& g, const Tensor& logits, int64_t K) {
  check(logits.ndim() == 2, "topk_softmax", "logits must be [N, E], got " + logits.shape.str());
  const int64_t N = logits.size(0), E = logits.size(1);
  check(K >= 1 && K <= E, "topk_softmax", "K=" + std::to_string(K) + " must be in [1, E=" + std::to_string(E) + "]");
  TopK out;
  out.weights = g.output({N, K}, logits);
  out.index = g.arena().alloc_ints(N * K);
  topk_softmax_forward(out.weights.data, out.index, logits.data, N, E, K);
  if (out.weights.requires_grad()) {
    const Tensor w = out.weights;
    const int32_t* index = out.index;
    g.record([=] { topk_softmax_backward(logits.grad, w.grad, w.data, index, N, E, K); });
  }
  return out;
}

Tensor gather_rows(Graph& g, const Tensor& x, const int32_t* rows, int64_t n) {
  check(x.ndim() == 2, "gather_rows", "input must be [N, C], got " + x.shape.str());
  const int64_t N = x.size(0), C = x.size(1);
  for (int64_t i = 0; i < n; ++i)
    check(rows[i] >= 0 && rows[i] < N, "gather_rows", "row " + std::to_string(rows[i]) + " outside [0, " + std::to_string(N) + ")");
  Tensor y = g.output({n, C}, x);
#pragma omp parallel for schedule(static) if (n * C > 65536)
  for (int64_t i = 0; i < n; ++i) std::memcpy(y.data + i * C, x.data + int64_t(rows[i]) * C, sizeof(float) * size_t(C));
  if (y.requires_grad())
    g.record([=] {
      // Serial: several i may share a row; adds happen in index order.
      for (int64_t i = 0; i < n; ++i) {
        float* d = x.grad + int64_t(rows[i]) * C;
        const float* s = y.grad + i * C;
        for (int64_t c = 0; c < C; ++c) d[c] += s[c];
      }
    });
  return y;
}

void index_add_weighted(Graph& g, Tensor& acc, const Tensor& h, const int32_t* rows, const Tensor& gates,
                        const int32_t* gate_pos, int64_t n) {
  check(acc.ndim() == 2 && h.ndim() == 2 && h.size(0) == n && h.size(1) == acc.size(1), "index_add_weighted",
        "acc " + acc.shape.str() + " and h " + h.shape.str() + " must be [N, C] and [n=" + std::to_string(n) + ", C]");
  const int64_t N = acc.size(0), C = acc.size(1);
  for (int64_t i = 0; i < n; ++i) {
    check(rows[i] >= 0 && rows[i] < N, "index_add_weighted", "row " + std::to_string(rows[i]) + " outside [0, " + std::to_string(N) + ")");
    check(gate_pos[i] >= 0 && gate_pos[i] < gates.numel(), "index_add_weighted", "gate position " + std::to_string(gate_pos[i]) + " outside the gates");
  }
  // Serial in slot order: a row may be hit by several slots, always in the same order.
  for (int64_t i = 0; i < n; ++i) {
    const float w = gates.data[gate_pos[i]];
    float* d = acc.data + int64_t(rows[i]) * C;
    const float* s = h.data + i * C;
    for (int64_t c = 0; c < C; ++c) d[c] += w * s[c];
  }
  if (g.grad_enabled() && (h.requires_grad() || gates.requires_grad())) {
    check(acc.requires_grad(), "index_add_weighted", "the accumulator must track a gradient (make it with g.zeros(shape, true))");
    const Tensor a = acc;
    g.record([=] {
#pragma omp parallel for schedule(static) if (n * C > 65536)
      for (int64_t i = 0; i < n; ++i) {
        const float* dy = a.grad + int64_t(rows[i]) * C;
        if (h.grad) {
          const float w = gates.data[gate_pos[i]];
          for (int64_t c = 0; c < C; ++c) h.grad[i * C + c] += w * dy[c];
        }
        if (gates.grad) {
          float dot = 0;
          for (int64_t c = 0; c < C; ++c) dot += dy[c] * h.data[i * C + c];
          gates.grad[gate_pos[i]] += dot;  // each gate position belongs to one slot only
        }
      }
    });
  }
}

}  // namespace moe
