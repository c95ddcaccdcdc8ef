#include "moe/tensor/graph.hpp"

#include <cstring>

namespace moe {

Tensor Graph::new_tensor(const Shape& s, bool requires_grad) {
  Tensor t;
  t.shape = s;
  t.data = arena_.alloc_floats(s.numel());
  if (requires_grad) t.grad = grad_floats(s.numel());
  return t;
}

Tensor Graph::zeros(const Shape& s, bool requires_grad) {
  Tensor t = new_tensor(s, requires_grad);
  std::memset(t.data, 0, sizeof(float) * size_t(s.numel()));
  return t;
}

Tensor Graph::constant(const Shape& s, const float* src) {
  Tensor t = new_tensor(s, false);
  std::memcpy(t.data, src, sizeof(float) * size_t(s.numel()));
  return t;
}

void Graph::backward(const Tensor& loss) {
  MOE_CHECK(loss.numel() == 1, "backward", "loss must be a scalar, got " + loss.shape.str());
  MOE_CHECK(loss.requires_grad(), "backward", "loss does not track a gradient (no-grad mode, or no parameter in it)");
  const float one = 1.0f;
  backward_from({Seed{loss, &one}});
}

void Graph::backward_from(const Tensor& out, const float* dout) {
  MOE_CHECK(out.requires_grad(), "backward_from", "output does not track a gradient");
  backward_from({Seed{out, dout}});
}

void Graph::backward_from(std::initializer_list<Seed> seeds) {
  PhaseScope phase(Phase::Backward);
  {
    PartScope zeroing(Part::Zeroing);
    grad_arena_.zero_used();
  }
  for (const Seed& s : seeds)
    if (s.out.requires_grad() && s.grad)
      for (int64_t i = 0; i < s.out.numel(); ++i) s.out.grad[i] += s.grad[i];
  if (profiling()) {
    for (size_t i = tape_.size(); i-- > 0;) {
      PartScope part(tape_[i].part);
      tape_[i].run(tape_[i].closure);
    }
    return;
  }
  for (size_t i = tape_.size(); i-- > 0;) tape_[i].run(tape_[i].closure);
}

void Graph::clear() {
  tape_.clear();
  arena_.reset();
  grad_arena_.reset();
  scope_arena_.reset();
  scope_scratch_.reset();
  scope_open_ = false;
}

void Graph::release() {
  clear();
  for (Arena* a : {&arena_, &grad_arena_, &scope_arena_, &scope_scratch_}) a->release();
}

void Graph::begin_grad_scope() {
  if (!grad_enabled_ || !scopes_on_) return;
  MOE_CHECK(!scope_open_, "Graph::begin_grad_scope", "a gradient scope is already open");
  scope_arena_.reset();
  scope_scratch_.reset();
  scope_open_ = true;
}

void Graph::end_grad_scope() {
  if (!scope_open_) return;
  scope_open_ = false;
  PartScope zeroing(Part::Zeroing);
  record([arena = &scope_arena_, end = scope_arena_.mark()] { arena->zero_to(end); });
}

}  // namespace moe
