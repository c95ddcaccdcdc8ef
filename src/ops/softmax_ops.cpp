// Softmax, causal softmax and cross-entropy.
#include <cstring>

#include "moe/kernels/nn.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

namespace {

Tensor softmax_impl(Graph& g, const Tensor& x, bool causal, const char* name) {
  PartScope part(Part::Softmax);
  MOE_CHECK(x.ndim() >= 1 && x.numel() > 0, name, "empty input " + x.shape.str());
  if (causal) MOE_CHECK(x.ndim() >= 2 && x.size(-1) == x.size(-2), name, "scores must be [..., T, T], got " + x.shape.str());
  const int64_t N = x.rows(), C = x.cols();
  Tensor y = g.output(x.shape, x);
  softmax_forward(y.data, x.data, N, C, causal);
  // Masked outputs are exactly 0, so the plain softmax backward gives them 0 gradient too.
  if (y.requires_grad()) g.record([=] { softmax_backward(x.grad, y.grad, y.data, N, C); });
  return y;
}

}  // namespace

Tensor softmax(Graph& g, const Tensor& x) { return softmax_impl(g, x, false, "softmax"); }

Tensor causal_softmax(Graph& g, const Tensor& x) { return softmax_impl(g, x, true, "causal_softmax"); }

float mean_loss(const float* row_losses, int64_t n) {
  double total = 0;  // in row order: the same for any thread count
  for (int64_t i = 0; i < n; ++i) total += row_losses[i];
  return float(total / double(n));
}

Tensor cross_entropy(Graph& g, const Tensor& logits, const int32_t* targets, const float** row_losses) {
  PartScope part(Part::Loss);
  const int64_t N = logits.rows(), V = logits.cols();
  MOE_CHECK(N > 0 && V > 0, "cross_entropy", "empty logits " + logits.shape.str());
  for (int64_t n = 0; n < N; ++n)
    MOE_CHECK(targets[n] >= 0 && targets[n] < V, "cross_entropy",
          "target " + std::to_string(targets[n]) + " at row " + std::to_string(n) + " is outside [0, " + std::to_string(V) + ")");
  Tensor y = g.output({1}, logits);
  float* probs = g.arena().alloc_floats(N * V);
  float* losses = g.arena().alloc_floats(N);
  cross_entropy_forward(losses, probs, logits.data, targets, N, V);
  y.data[0] = mean_loss(losses, N);
  if (row_losses) *row_losses = losses;
  if (y.requires_grad()) {
    int32_t* saved = g.arena().alloc_ints(N);
    std::memcpy(saved, targets, sizeof(int32_t) * size_t(N));
    g.record([=] { cross_entropy_backward(logits.grad, probs, saved, y.grad[0], N, V); });
  }
  return y;
}

}  // namespace moe
