// Sparse MoE routing ops: top-k softmax, row gather, weighted scatter-add.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/kernels/routing.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

void check_topk(const char* op, const Tensor& scores, int64_t K) {
  MOE_CHECK(scores.ndim() == 2, op, "scores must be [N, E], got " + scores.shape.str());
  MOE_CHECK(K >= 1 && K <= scores.size(1), op,
        "K=" + std::to_string(K) + " must be in [1, E=" + std::to_string(scores.size(1)) + "]");
}

}  // namespace

TopK topk_softmax(Graph& g, const Tensor& logits, int64_t K, const float* select_bias) {
  PartScope part(Part::Routing);
  check_topk("topk_softmax", logits, K);
  TopK out;
  out.index = topk_indices(g, logits, K, select_bias);
  const int64_t N = logits.size(0), E = logits.size(1);
  out.weights = g.output({N, K}, logits);
  topk_softmax_forward(out.weights.data, out.index, logits.data, N, E, K);
  if (out.weights.requires_grad()) {
    const Tensor w = out.weights;
    const int32_t* index = out.index;
    g.record([=] { topk_softmax_backward(logits.grad, w.grad, w.data, index, N, E, K); });
  }
  return out;
}

int32_t* topk_indices(Graph& g, const Tensor& scores, int64_t K, const float* select_bias) {
  PartScope part(Part::Routing);
  check_topk("topk_indices", scores, K);
  const int64_t N = scores.size(0), E = scores.size(1);
  int32_t* index = g.arena().alloc_ints(N * K);
  topk_select(index, scores.data, select_bias, N, E, K);
  return index;
}

Tensor gather_cols(Graph& g, const Tensor& x, const int32_t* index, int64_t K) {
  PartScope part(Part::Routing);
  MOE_CHECK(x.ndim() == 2, "gather_cols", "input must be [N, E], got " + x.shape.str());
  const int64_t N = x.size(0), E = x.size(1);
  for (int64_t i = 0; i < N * K; ++i)
    MOE_CHECK(index[i] >= 0 && index[i] < E, "gather_cols", "column " + std::to_string(index[i]) + " outside [0, " + std::to_string(E) + ")");
  Tensor y = g.output({N, K}, x);
  gather_cols_forward(y.data, x.data, index, N, E, K);
  if (y.requires_grad())
    g.record([=] {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) x.grad[n * E + index[n * K + k]] += y.grad[n * K + k];
    });
  return y;
}

Tensor normalize_rows(Graph& g, const Tensor& x) {
  PartScope part(Part::Routing);
  MOE_CHECK(x.ndim() == 2, "normalize_rows", "input must be [N, K], got " + x.shape.str());
  const int64_t N = x.size(0), K = x.size(1);
  Tensor y = g.output({N, K}, x);
  normalize_rows_forward(y.data, x.data, N, K);
  if (y.requires_grad())
    g.record([=] {
      // y = x / s: dx_j = (dy_j - Σ_k dy_k y_k) / s.
      for (int64_t n = 0; n < N; ++n) {
        float s = 0, dot = 0;
        for (int64_t k = 0; k < K; ++k) s += x.data[n * K + k], dot += y.grad[n * K + k] * y.data[n * K + k];
        for (int64_t k = 0; k < K; ++k) x.grad[n * K + k] += (y.grad[n * K + k] - dot) / s;
      }
    });
  return y;
}

Tensor logsumexp(Graph& g, const Tensor& x) {
  PartScope part(Part::Routing);
  MOE_CHECK(x.ndim() == 2, "logsumexp", "input must be [N, E], got " + x.shape.str());
  const int64_t N = x.size(0), E = x.size(1);
  Tensor y = g.output({N}, x);
  for (int64_t n = 0; n < N; ++n) {
    const float* r = x.data + n * E;
    const float mx = *std::max_element(r, r + E);
    double z = 0;
    for (int64_t e = 0; e < E; ++e) z += std::exp(double(r[e] - mx));
    y.data[n] = mx + float(std::log(z));
  }
  if (y.requires_grad())
    g.record([=] {
      // d lse / dx_j = softmax(x)_j = exp(x_j - lse).
      for (int64_t n = 0; n < N; ++n)
        for (int64_t e = 0; e < E; ++e) x.grad[n * E + e] += y.grad[n] * std::exp(x.data[n * E + e] - y.data[n]);
    });
  return y;
}

namespace {

// y[i] = x[rows[i]] for i < n, rows of C floats.
struct GatherRun {
  float* y;
  const float* x;
  const int32_t* rows;
  int64_t n, C;
  void operator()() const {
#pragma omp parallel for schedule(static) if (n * C > kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) std::memcpy(y + i * C, x + int64_t(rows[i]) * C, sizeof(float) * size_t(C));
  }
};

}  // namespace

Tensor gather_row_groups(Graph& g, const Tensor& x, const int32_t* rows, const int32_t* offsets, int64_t G,
                         Regen* regen) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(x.ndim() == 2 && G >= 1 && offsets[0] == 0, "gather_rows",
            "input must be [N, C] and offsets start at 0, got " + x.shape.str());
  const int64_t N = x.size(0), C = x.size(1), n = offsets[G];
  for (int64_t i = 0; i < n; ++i)
    MOE_CHECK(rows[i] >= 0 && rows[i] < N, "gather_rows", "row " + std::to_string(rows[i]) + " outside [0, " + std::to_string(N) + ")");
  Tensor y = regen ? g.scratch_output({n, C}, x) : g.output({n, C}, x);
  const GatherRun run{y.data, x.data, rows, n, C};
  run();
  if (regen) *regen = make_regen(g, run);
  if (y.requires_grad()) {
    auto* off = g.arena().alloc_ints(G + 1);
    std::copy(offsets, offsets + G + 1, off);
    int32_t* start = g.arena().alloc_ints(N + 1);
    int32_t* src = g.arena().alloc_ints(n);
    g.record([=] {
      // Each row of x's gradient takes its rows of y's, the last group first, as separate
      // gathers' backward passes run; a thread owns whole rows, so every element is summed in
      // that order for any thread count.
      const RowsByTarget by = rows_by_target(start, src, rows, off, G, N);
      parallel_for(N, n * C > kParallelMinWork, [&](int64_t t) {
        float* d = x.grad + t * C;
        for (int32_t k = by.start[t]; k < by.start[t + 1]; ++k) {
          const float* s = y.grad + int64_t(by.src[k]) * C;
          for (int64_t c = 0; c < C; ++c) d[c] += s[c];
        }
      });
    });
  }
  return y;
}

Tensor gather_rows(Graph& g, const Tensor& x, const int32_t* rows, int64_t n) {
  PartScope part(Part::GatherScatter);
  const int32_t one_group[2] = {0, int32_t(n)};
  return gather_row_groups(g, x, rows, one_group, 1);
}

void index_add_weighted(Graph& g, Tensor& acc, const Tensor& h, const int32_t* rows, const Tensor& gates,
                        const int32_t* gate_pos, int64_t n) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(acc.ndim() == 2 && h.ndim() == 2 && h.size(0) == n && h.size(1) == acc.size(1), "index_add_weighted",
        "acc " + acc.shape.str() + " and h " + h.shape.str() + " must be [N, C] and [n=" + std::to_string(n) + ", C]");
  const int64_t N = acc.size(0), C = acc.size(1);
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(rows[i] >= 0 && rows[i] < N, "index_add_weighted", "row " + std::to_string(rows[i]) + " outside [0, " + std::to_string(N) + ")");
    MOE_CHECK(gate_pos[i] >= 0 && gate_pos[i] < gates.numel(), "index_add_weighted", "gate position " + std::to_string(gate_pos[i]) + " outside the gates");
  }
  const int32_t one_group[2] = {0, int32_t(n)};
  const RowsByTarget by = rows_by_target(g.arena().alloc_ints(N + 1), g.arena().alloc_ints(n), rows, one_group, 1, N);
  scatter_add_weighted(acc.data, h.data, rows, gates.data, gate_pos, n, C, &by);
  if (g.grad_enabled() && (h.requires_grad() || gates.requires_grad())) {
    MOE_CHECK(acc.requires_grad(), "index_add_weighted", "the accumulator must track a gradient (make it with g.zeros(shape, true))");
    const Tensor a = acc;
    g.record([=] {
#pragma omp parallel for schedule(static) if (n * C > kParallelMinWork)
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

Tensor switch_aux_loss(Graph& g, const Tensor& logits, const int32_t* slots) {
  PartScope part(Part::Routing);
  MOE_CHECK(logits.ndim() == 2, "switch_aux_loss", "logits must be [N, E], got " + logits.shape.str());
  const int64_t N = logits.size(0), E = logits.size(1);
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) total += slots[e];
  // E · Σ_i f_i P_i = Σ_{n,i} softmax(logits)[n, i] · E f_i / N.
  Tensor w = g.new_tensor({N, E}, false);
  for (int64_t e = 0; e < E; ++e) {
    const float fe = total ? float(slots[e]) / float(total) : 0.f;
    for (int64_t n = 0; n < N; ++n) w.data[n * E + e] = float(E) * fe / float(N);
  }
  return sum(g, mul(g, softmax(g, logits), w));
}

Tensor router_z_loss(Graph& g, const Tensor& logits) {
  PartScope part(Part::Routing);
  Tensor lse = logsumexp(g, logits);
  return mean(g, mul(g, lse, lse));
}

}  // namespace moe
