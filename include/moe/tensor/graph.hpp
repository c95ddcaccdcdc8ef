// Graph: the define-by-run autograd tape.
//
// Every op is a free function `Tensor op(Graph& g, inputs..., options...)` that
//   1. checks shapes (throwing ShapeError naming the op),
//   2. allocates its output with g.output(shape, inputs...) (which also decides whether the
//      output tracks a gradient: grad mode on and any input tracking one),
//   3. runs its forward kernel,
//   4. if the output tracks a gradient, records a backward closure with g.record([=] { ... }).
// Backward closures ADD into input gradients (inputs whose grad is null are skipped).
// Closures live in the arena, so they must be trivially destructible: capture Tensors,
// ints, floats and arena pointers by value, never std::vector or std::string.
//
// A training step: g.clear(); build the forward; g.backward(loss); optimizer step.
// Model::forward puts each block in a gradient scope, so that activation gradients take one
// block's memory (see begin_grad_scope).
// Parameter gradients live in the ParamStore and accumulate until zeroed explicitly.
#pragma once

#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/tensor/arena.hpp"
#include "moe/tensor/profile.hpp"
#include "moe/tensor/tensor.hpp"

namespace moe {

class Graph {
 public:
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Whether ops record backward closures and allocate gradients. See NoGradGuard.
  bool grad_enabled() const { return grad_enabled_; }
  void set_grad_enabled(bool on) { grad_enabled_ = on; }
  // Whether the linear ops (linear, linear_act, grouped_linear, grouped_mlp) run their
  // products in bf16 (moe/kernels/gemm_bf16.hpp) rather than fp32: training.precision "bf16",
  // set by Model::forward for training forwards (see Bf16Guard). An op decides when it runs,
  // and its backward pass follows.
  bool bf16_products() const { return bf16_products_; }
  void set_bf16_products(bool on) { bf16_products_ = on; }

  // A fresh tensor in the arena: data uninitialised, grad (when requires_grad) zero from the
  // start of backward on.
  Tensor new_tensor(const Shape& s, bool requires_grad);
  Tensor zeros(const Shape& s, bool requires_grad);
  // An op's output: tracks a gradient iff grad mode is on and any input tracks one.
  template <class... Ts>
  Tensor output(const Shape& s, const Ts&... inputs) {
    bool any = (false || ... || inputs.requires_grad());
    return new_tensor(s, grad_enabled_ && any);
  }
  // An op's output written over the data of its input x (same shape), with a gradient of its
  // own as output() gives. Only for an x whose data no backward pass reads (a linear's output
  // read by nothing but this op, say): its value is gone once the op has run.
  template <class... Ts>
  Tensor output_over(const Tensor& x, const Ts&... inputs) {
    const bool any = (x.requires_grad() || ... || inputs.requires_grad());
    Tensor t;
    t.shape = x.shape;
    t.data = x.data;
    if (grad_enabled_ && any) t.grad = grad_floats(x.numel());
    return t;
  }
  // The same for an output internal to one op, whose gradient that op's backward closure
  // writes whole (assigning) before anything reads it, like a fused MLP's hidden layer: the
  // gradient is not zeroed. Inside a scope it comes from the scope's unzeroed region.
  template <class... Ts>
  Tensor output_assigned_grad(const Shape& s, const Ts&... inputs) {
    bool any = (false || ... || inputs.requires_grad());
    Tensor t = new_tensor(s, false);
    if (grad_enabled_ && any)
      t.grad = (in_scope() ? scope_scratch_ : grad_arena_).alloc_floats(s.numel());
    return t;
  }
  // An op's output whose data lives, inside a scope, in the scope's scratch memory, which
  // every scope reuses: it is overwritten by the next block's forward, so an op that makes
  // one returns a Regen that makes it again (see ops.hpp), to be recorded after the last op
  // that reads it. Outside a scope (or under KeepGrads), in the arena as output() makes it.
  template <class... Ts>
  Tensor scratch_output(const Shape& s, const Ts&... inputs) {
    const bool any = (false || ... || inputs.requires_grad());
    Tensor t;
    t.shape = s;
    t.data = scratch_floats(s.numel());
    if (grad_enabled_ && any) t.grad = grad_floats(s.numel());
    return t;
  }
  // Whether a scope is open and not under KeepGrads: gradients and scratch_output's data go to
  // the scope's memory (else to the graph's own).
  bool in_scope() const { return scope_open_ && !keep_; }
  // Whether a block in a scope makes its activations again in the backward pass (Remake)
  // rather than keeping them: on unless training.keep_activations.
  void set_remake(bool on) { remake_ = on; }
  bool remake() const { return remake_; }
  // n floats of scratch_output's memory, for data an op keeps elsewhere in a form of its own.
  float* scratch_floats(int64_t n) { return (in_scope() ? scope_scratch_ : arena_).alloc_floats(n); }
  // A constant (no gradient) copy of host data in the arena, e.g. fixed noise or masks.
  Tensor constant(const Shape& s, const float* src);

  template <class F>
  void record(F&& f) {
    using Fn = std::decay_t<F>;
    static_assert(std::is_trivially_destructible_v<Fn>,
                  "backward closures live in the arena: capture only trivially destructible values");
    if (!grad_enabled_) return;
    tape_.push_back(Node{[](void* p) { (*static_cast<Fn*>(p))(); }, arena_.copy_of(std::forward<F>(f)), current_part()});
  }

  // Zeroes every tensor's gradient (all at once, in parallel: they live together in their own
  // arena), seeds d(loss)/d(loss) = 1 and runs the tape in reverse. loss must be a scalar
  // tracking a gradient. The tape is kept (call clear() to start the next step). Parameter
  // gradients, in the ParamStore, accumulate.
  void backward(const Tensor& loss);
  // Zeroes the gradients, sets out.grad to dout (out.numel() floats), then runs the tape in reverse. For tests
  // and for composing a fused op's gradient against its reference.
  void backward_from(const Tensor& out, const float* dout);
  // The same for several outputs: each seed's grad (numel floats) is added to its tensor's
  // gradient. Seeds whose tensor tracks no gradient or whose grad is null are skipped.
  struct Seed {
    Tensor out;
    const float* grad = nullptr;
  };
  void backward_from(std::initializer_list<Seed> seeds);

  // Drops the tape and every arena allocation (keeping the memory).
  void clear();
  // clear(), then every arena gives its pages back to the system (Arena::release).
  void release();

  // Gradient scopes, for the blocks of a training forward. The gradient of a tensor made
  // inside a scope is written and read only by the closures recorded inside it, which the
  // backward pass runs one after the other; so every scope's gradients share one region, and
  // end_grad_scope() records the closure that zeroes it when the backward pass enters the
  // scope. A tensor that outlives its scope (the block's output, a loss term added at the
  // end) is made under a KeepGrads. Not nested; nothing happens in no-grad mode or after
  // set_grad_scopes(false), which gives every gradient its own memory again (tests).
  void begin_grad_scope();
  void end_grad_scope();
  void set_grad_scopes(bool on) { scopes_on_ = on; }
  bool grad_scopes() const { return scopes_on_; }
  // Memory for gradients, zeroed by backward() as the tensors' (for KeepGradsIn).
  float* grad_memory(int64_t n) { return grad_arena_.alloc_floats(n); }
  class KeepGrads {
   public:
    explicit KeepGrads(Graph& g) : g_(g), old_(g.keep_) { g.keep_ = true; }
    ~KeepGrads() { g_.keep_ = old_; }
    KeepGrads(const KeepGrads&) = delete;
    KeepGrads& operator=(const KeepGrads&) = delete;

   private:
    Graph& g_;
    bool old_;
  };

  // The same, the gradients taken in order from `memory` (the caller's, `floats` of them),
  // which the caller zeroes when it must: for outputs whose gradients can share memory, as
  // the outputs of blocks l and l + 2 (block l's is written by block l + 1's backward and read
  // by block l's; block l + 2's is read before that). With memory null, KeepGrads.
  class KeepGradsIn {
   public:
    KeepGradsIn(Graph& g, float* memory, int64_t floats) : keep_(g), g_(g) {
      g.keep_in_ = memory, g.keep_in_left_ = floats;
    }
    ~KeepGradsIn() { g_.keep_in_ = nullptr, g_.keep_in_left_ = 0; }
    KeepGradsIn(const KeepGradsIn&) = delete;
    KeepGradsIn& operator=(const KeepGradsIn&) = delete;

   private:
    KeepGrads keep_;
    Graph& g_;
  };

  Arena& arena() { return arena_; }
  const Arena& arena() const { return arena_; }
  // Gradient memory: of tensors outside any scope, and the region the scopes share.
  const Arena& grad_arena() const { return grad_arena_; }
  const Arena& scope_grad_arena() const { return scope_arena_; }
  const Arena& scope_scratch_arena() const { return scope_scratch_; }
  size_t tape_size() const { return tape_.size(); }

 private:
  // A gradient's memory: the scope's when one is open, unless under KeepGrads (or KeepGradsIn).
  float* grad_floats(int64_t n) {
    if (keep_in_) {
      MOE_CHECK(n <= keep_in_left_, "Graph::KeepGradsIn", "the memory given holds fewer floats than asked");
      float* p = keep_in_;
      keep_in_ += n, keep_in_left_ -= n;
      return p;
    }
    return (in_scope() ? scope_arena_ : grad_arena_).alloc_floats(n);
  }
  struct Node {
    void (*run)(void*);
    void* closure;
    Part part;  // the PartScope open when it was recorded, for the step profiler
  };
  Arena arena_;       // tensors' data, closures, scratch
  Arena grad_arena_;  // tensors' gradients, zeroed by backward()
  Arena scope_arena_; // gradients made inside a scope, zeroed by the scope's closure
  Arena scope_scratch_;  // assigned gradients made inside a scope (output_assigned_grad)
  bool scopes_on_ = true, scope_open_ = false, keep_ = false, remake_ = true;
  float* keep_in_ = nullptr;  // KeepGradsIn's memory, and how many floats are left of it
  int64_t keep_in_left_ = 0;
  std::vector<Node> tape_;
  bool grad_enabled_ = true;
  bool bf16_products_ = false;
};

// Sets bf16_products in its scope, restoring the old value after.
class Bf16Guard {
 public:
  Bf16Guard(Graph& g, bool on) : g_(g), old_(g.bf16_products()) { g.set_bf16_products(on); }
  ~Bf16Guard() { g_.set_bf16_products(old_); }
  Bf16Guard(const Bf16Guard&) = delete;
  Bf16Guard& operator=(const Bf16Guard&) = delete;

 private:
  Graph& g_;
  bool old_;
};

// Disables recording in its scope (evaluation, generation), restoring the old mode after.
class NoGradGuard {
 public:
  explicit NoGradGuard(Graph& g) : g_(g), old_(g.grad_enabled()) { g.set_grad_enabled(false); }
  ~NoGradGuard() { g_.set_grad_enabled(old_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  Graph& g_;
  bool old_;
};

}  // namespace moe
