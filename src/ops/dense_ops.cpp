// Dense algebra ops: linear, bmm, add, add_bias, mul, scale, embedding, layernorm, rmsnorm.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/gemm_bf16.hpp"
#include "moe/kernels/nn.hpp"
#include "moe/kernels/bits.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// Checks linear's operands; returns the output shape [..., out].
Shape linear_shape(const char* op, const Tensor& x, const Tensor& w, const Tensor& b) {
  MOE_CHECK(w.ndim() == 2, op, "weight must be [out, in], got " + w.shape.str());
  MOE_CHECK(x.ndim() >= 1 && x.cols() == w.size(1), op,
            "input " + x.shape.str() + " does not match weight " + w.shape.str() + " (last dim must be " +
                std::to_string(w.size(1)) + ")");
  if (b.data)
    MOE_CHECK(b.ndim() == 1 && b.size(0) == w.size(0), op, "bias " + b.shape.str() + " must be [" + std::to_string(w.size(0)) + "]");
  Shape os = x.shape;
  os.dims[size_t(os.ndim - 1)] = w.size(0);
  return os;
}

// y = x·Wᵀ + b (then relu when asked): each element is the bias (or 0) plus the GEMM's sums,
// as if y started as the bias rows. bf16: the products in bf16 (Graph::bf16_products).
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, float* y, bool relu, bool bf16) {
  const int64_t N = x.rows(), I = w.size(1), O = w.size(0);
  if (bf16)
    gemm_bf16_bias(false, true, N, O, I, x.data, I, w.data, I, b.data, y, O, relu);  // (N, O)
  else
    gemm_bias(false, true, N, O, I, x.data, I, w.data, I, b.data, y, O, relu);  // (N, O)
}

// dW += dyᵀ·x, db += Σ_rows dy, dx += dy·W (dx = dy·W when dx_beta is 0), for the inputs
// that track a gradient. dx last: it may take x's memory (grouped_mlp's hidden layer).
// On two threads the two products (the same FLOPs) run side by side, one a thread, in one
// parallel region: each packs its operands once, where splitting each product had both threads
// pack the same panels, and the team meets once instead of twice. Each element is summed as
// before (a product on one thread is the same sums), so the bits do not change. Not when dx
// takes x's memory, which dW reads. bf16: the products in bf16 (Graph::bf16_products).
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& b, const float* dy, float dx_beta, bool bf16) {
  const int64_t N = x.rows(), I = w.size(1), O = w.size(0);
  const auto dw = [&] {
    if (w.grad) {
      if (bf16)
        gemm_bf16(true, false, O, I, N, dy, O, x.data, I, 1.f, w.grad, I);
      else
        gemm(true, false, O, I, N, 1.f, dy, O, x.data, I, 1.f, w.grad, I);
    }
    if (b.data && b.grad) bias_backward(b.grad, dy, N, O);
  };
  const auto dx = [&] {
    if (!x.grad) return;
    if (bf16)
      gemm_bf16(false, false, N, I, O, dy, O, w.data, I, dx_beta, x.grad, I);
    else
      gemm(false, false, N, I, O, 1.f, dy, O, w.data, I, dx_beta, x.grad, I);
  };
  const bool side_by_side = w.grad && x.grad && x.grad != x.data && !omp_in_parallel() &&
                            omp_get_max_threads() == 2 && N * I * O >= 32768;
  if (!side_by_side) {
    dw();
    dx();
    return;
  }
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 1) {
      dw();
      dx();
    } else if (omp_get_thread_num() == 0) {
      dw();
    } else {
      dx();
    }
  }
}

}  // namespace

namespace {

// One grouped product: its operands, the groups and the order they run in, all in the arena,
// so that the backward closure can copy it.
struct Grouped {
  Tensor x, y;
  const int32_t* off;    // G + 1 row offsets
  const int32_t* order;  // the groups, largest first
  int64_t G, I, O;
  const Tensor *ws, *bs;
  float* pre;  // the pre-activation (y.data when it is not kept)
  bool keep_pre, has_act;
  bool bf16 = false;  // the products in bf16 (the graph's bf16_products when the op ran)
  // x's gradient is assigned, not added to: x is the op's own (output_assigned_grad), and
  // this product's backward the only writer of its gradient.
  bool assign_dx = false;
  Activation kind;
  // relu's derivative from these bits (positive_bits of y), when y's memory holds its gradient
  // by the time the backward needs it.
  const uint16_t* relu_bits = nullptr;

  // Rows [off[e], off[e+1]) of t, as a tensor of its own.
  Tensor rows_of(const Tensor& t, int64_t e, int64_t width) const {
    Tensor r;
    r.shape = Shape({off[e + 1] - off[e], width});
    r.data = t.data + off[e] * width;
    r.grad = t.grad ? t.grad + off[e] * width : nullptr;
    return r;
  }

  void forward(int64_t e) const {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) return;
    // relu goes in the product's last write (its output is kept, not the pre-activation).
    const bool fused = has_act && kind == Activation::kRelu;
    linear_forward(rows_of(x, e, I), ws[e], bs[e], pre + off[e] * O, fused, bf16);
    if (has_act && !fused)
      act::dispatch(kind, [&](auto f, auto) {
        const int64_t begin = off[e] * O, end = off[e + 1] * O;
#pragma omp parallel for schedule(static) if (n * O > kParallelMinWork)
        for (int64_t j = begin; j < end; ++j) y.data[j] = f(pre[j]);
      });
  }

  void backward(int64_t e) const {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) return;
    // d pre = dy · f'(pre), in y.grad itself: nothing reads y's gradient after this op.
    float* d = y.grad + off[e] * O;
    const float* a = (keep_pre ? pre : y.data) + off[e] * O;
    if (relu_bits)  // rows start on whole words: O is a multiple of 16 there
      scale_by_bits(d, d, relu_bits + off[e] * O / 16, 1.f, n * O);
    else if (has_act)
      act::dispatch(kind, [&](auto, auto df) {
#pragma omp parallel for schedule(static) if (n * O > kParallelMinWork)
        for (int64_t j = 0; j < n * O; ++j) d[j] *= df(a[j]);
      });
    linear_backward(rows_of(x, e, I), ws[e], bs[e], d, assign_dx ? 0.f : 1.f, bf16);
  }

  // body(e) for every group, on separate threads when there are several; one group (linear,
  // linear_act) keeps the team for its product and activation.
  template <class Body>
  void for_groups(int64_t widest, Body&& body) const {
    if (G == 1) {
      body(int64_t(0));
      return;
    }
#pragma omp parallel
    {
      gemm_reserve_thread(widest);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < G; ++i) body(int64_t(order[i]));
    }
  }
};

// Where a grouped product's y lives: an op's output; an output_assigned_grad (the next product
// of the same op assigns its gradient); a scratch_output (regenerated); or the caller's
// memory, its gradient, when tracked, too (grouped_mlp's hidden layer).
enum class YMemory { kOutput, kAssignedGrad, kScratch, kShared };

// Checks a grouped product's operands and sets it up: y, the pre-activation, and copies of
// offsets, weights and biases; `order` is shared by the products of one op when given.
Grouped make_grouped(Graph& g, const char* op, const Tensor& x, const int32_t* offsets, int64_t G, const Tensor* w,
                     const Tensor* b, const Activation* act, const int32_t* order = nullptr,
                     YMemory where = YMemory::kOutput, float* y_data = nullptr) {
  MOE_CHECK(G >= 1 && x.ndim() == 2 && offsets[0] == 0 && offsets[G] == x.rows(), op,
            "offsets must split the " + std::to_string(x.rows()) + " rows of " + x.shape.str() + " into groups");
  for (int64_t e = 0; e < G; ++e) {
    MOE_CHECK(offsets[e + 1] >= offsets[e], op, "offsets must not decrease");
    linear_shape(op, x, w[e], b[e]);
    MOE_CHECK(w[e].shape == w[0].shape, op, "the experts' weights differ in shape");
  }
  Grouped p;
  p.x = x;
  p.G = G;
  const int64_t S = x.rows();
  p.O = w[0].size(0);
  p.I = w[0].size(1);
  const Shape ys({S, p.O});
  if (where == YMemory::kShared) {
    p.y.shape = ys;
    p.y.data = y_data;
    const bool grad = g.grad_enabled() && (x.requires_grad() || w[0].requires_grad() || b[0].requires_grad());
    p.y.grad = grad ? y_data : nullptr;
  } else if (where == YMemory::kAssignedGrad) {
    p.y = b[0].data ? g.output_assigned_grad(ys, x, w[0], b[0]) : g.output_assigned_grad(ys, x, w[0]);
  } else if (where == YMemory::kScratch) {
    p.y = b[0].data ? g.scratch_output(ys, x, w[0], b[0]) : g.scratch_output(ys, x, w[0]);
  } else {
    p.y = b[0].data ? g.output(ys, x, w[0], b[0]) : g.output(ys, x, w[0]);
  }
  // The pre-activation, kept for the backward pass unless the derivative can be read off the
  // output (relu: y > 0 exactly where pre > 0), or there is no activation or backward pass.
  p.keep_pre = p.y.requires_grad() && act && *act != Activation::kRelu;
  p.pre = p.keep_pre ? g.arena().alloc_floats(S * p.O) : p.y.data;
  p.has_act = act != nullptr;
  p.bf16 = g.bf16_products();
  p.kind = act ? *act : Activation::kRelu;
  auto* off = g.arena().alloc_ints(G + 1);
  std::copy(offsets, offsets + G + 1, off);
  p.off = off;
  Tensor* ws = g.arena().alloc_objects<Tensor>(2 * G);
  std::copy(w, w + G, ws);
  std::copy(b, b + G, ws + G);
  p.ws = ws;
  p.bs = ws + G;
  if (!order) {
    auto* o = g.arena().alloc_ints(G);
    for (int64_t e = 0; e < G; ++e) {  // insertion sort, stable: std::stable_sort allocates
      int64_t j = e;
      for (; j > 0 && off[o[j - 1] + 1] - off[o[j - 1]] < off[e + 1] - off[e]; --j) o[j] = o[j - 1];
      o[j] = int32_t(e);
    }
    order = o;
  }
  p.order = order;
  return p;
}

// A grouped product's forward, all groups (for its Regen).
struct GroupedForward {
  Grouped p;
  int64_t widest;
  void operator()() const {
    p.for_groups(widest, [&](int64_t e) { p.forward(e); });
  }
};

}  // namespace

Tensor grouped_linear(Graph& g, const Tensor& x, const int32_t* offsets, int64_t G, const Tensor* w, const Tensor* b,
                      const Activation* act, Regen* regen) {
  const Grouped p = make_grouped(g, "grouped_linear", x, offsets, G, w, b, act, nullptr,
                                 regen ? YMemory::kScratch : YMemory::kOutput);
  const int64_t widest = std::max(p.I, p.O);
  const GroupedForward run{p, widest};
  run();
  if (regen) *regen = make_regen(g, run);
  if (p.y.requires_grad())
    g.record([=] { p.for_groups(widest, [&](int64_t e) { p.backward(e); }); });
  return p.y;
}

Tensor grouped_mlp(Graph& g, const Tensor& x, const int32_t* offsets, int64_t G, const Tensor* w1, const Tensor* b1,
                   Activation act, const Tensor* w2, const Tensor* b2) {
  // The hidden layer's gradient: each expert's rows written whole by p2's backward (dh = dy·W2
  // assigned), then read by p1's, so never zeroed.
  // A relu hidden layer (of a width of whole 16-entry words) is kept packed, by its positive
  // entries (kernels/bits.hpp), and lives in the scope's scratch memory, its gradient too: the
  // backward pass unpacks an expert's rows there, p2's weight gradient reads them, then dh
  // takes their place.
  const bool relu_rows = act == Activation::kRelu && w1[0].size(0) % 16 == 0;
  float* h = relu_rows ? g.scratch_floats(x.rows() * w1[0].size(0)) : nullptr;
  Grouped p1 = make_grouped(g, "grouped_mlp", x, offsets, G, w1, b1, &act, nullptr,
                            relu_rows ? YMemory::kShared : YMemory::kAssignedGrad, h);
  Grouped p2 = make_grouped(g, "grouped_mlp", p1.y, offsets, G, w2, b2, nullptr, p1.order);
  p2.assign_dx = true;
  const int64_t widest = std::max({p1.I, p1.O, p2.O}), F = p1.O;
  const bool packed = relu_rows && p2.y.requires_grad();
  uint16_t* bits = nullptr;
  float* values = nullptr;  // each expert's from start[e], 16 floats of room after them
  int64_t* start = nullptr;
  if (packed) {
    const int64_t n = x.rows() * F;
    bits = static_cast<uint16_t*>(g.arena().alloc_bytes(sizeof(uint16_t) * size_t(bit_words(n))));
    // Room for every value, but only the part filled is ever touched (and so resident).
    values = g.arena().alloc_floats(n + 16 * G);
    start = static_cast<int64_t*>(g.arena().alloc_bytes(sizeof(int64_t) * size_t(G)));
    p1.relu_bits = bits;
  }
  std::atomic<int64_t> filled{0};
  const int32_t* off = p1.off;
  p1.for_groups(widest, [&](int64_t e) {
    p1.forward(e);
    p2.forward(e);
    if (!packed) return;
    const int64_t begin = off[e] * F, n = (off[e + 1] - off[e]) * F;
    const int64_t count = positive_bits(bits + begin / 16, h + begin, n);
    start[e] = filled.fetch_add(count + 16);
    pack_positive(values + start[e], bits + begin / 16, h + begin, n);
  });
  if (p2.y.requires_grad())
    g.record([=] {
      p1.for_groups(widest, [&](int64_t e) {
        const int64_t begin = off[e] * F;
        if (packed) unpack_positive(h + begin, bits + begin / 16, values + start[e], (off[e + 1] - off[e]) * F);
        p2.backward(e);
        p1.backward(e);
      });
    });
  return p2.y;
}

namespace {

// linear and linear_act: grouped_linear with one group, on x seen as [rows, in].
Tensor one_group_linear(Graph& g, const char* op, const Tensor& x, const Tensor& w, const Tensor& b,
                        const Activation* act, Regen* regen = nullptr) {
  const Shape os = linear_shape(op, x, w, b);
  // The offsets are copied by make_grouped (a Regen runs after this frame is gone).
  const int32_t rows[2] = {0, int32_t(x.rows())};
  return grouped_linear(g, x.view({x.rows(), x.cols()}), rows, 1, &w, &b, act, regen).view(os);
}

}  // namespace

Tensor linear(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, Regen* regen) {
  PartScope part(Part::GemmDense);
  return one_group_linear(g, "linear", x, w, b, nullptr, regen);
}

Tensor linear_act(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, Activation kind) {
  PartScope part(Part::GemmDense);
  return one_group_linear(g, "linear_act", x, w, b, &kind);
}

Tensor bmm(Graph& g, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  PartScope part(Part::GemmDense);
  MOE_CHECK(a.ndim() >= 2 && a.ndim() == b.ndim(), "bmm", "operands " + a.shape.str() + " and " + b.shape.str() + " need the same rank >= 2");
  int64_t batch = 1;
  for (int i = 0; i < a.ndim() - 2; ++i) {
    MOE_CHECK(a.size(i) == b.size(i), "bmm", "batch dimensions differ: " + a.shape.str() + " vs " + b.shape.str());
    batch *= a.size(i);
  }
  const int64_t ar = a.size(-2), ac = a.size(-1), br = b.size(-2), bc = b.size(-1);
  const int64_t M = trans_a ? ac : ar, K = trans_a ? ar : ac;
  const int64_t Kb = trans_b ? bc : br, N = trans_b ? br : bc;
  MOE_CHECK(K == Kb, "bmm", "inner dimensions differ: " + a.shape.str() + (trans_a ? "ᵀ" : "") + " · " + b.shape.str() + (trans_b ? "ᵀ" : ""));
  Shape os = a.shape;
  os.dims[size_t(os.ndim - 2)] = M;
  os.dims[size_t(os.ndim - 1)] = N;
  Tensor y = g.output(os, a, b);
#pragma omp parallel for schedule(static) if (batch > 1)
  for (int64_t i = 0; i < batch; ++i)
    gemm(trans_a, trans_b, M, N, K, 1.f, a.data + i * ar * ac, ac, b.data + i * br * bc, bc, 0.f, y.data + i * M * N, N);
  if (y.requires_grad()) {
    g.record([=] {
#pragma omp parallel for schedule(static) if (batch > 1)
      for (int64_t i = 0; i < batch; ++i) {
        const float* A = a.data + i * ar * ac;
        const float* B = b.data + i * br * bc;
        const float* dY = y.grad + i * M * N;
        // Y = op(A)·op(B): d op(A) = dY·op(B)ᵀ, d op(B) = op(A)ᵀ·dY; transposes fold into flags.
        if (a.grad) {
          float* dA = a.grad + i * ar * ac;
          if (!trans_a) gemm(false, !trans_b, M, K, N, 1.f, dY, N, B, bc, 1.f, dA, ac);
          else gemm(trans_b, true, K, M, N, 1.f, B, bc, dY, N, 1.f, dA, ac);
        }
        if (b.grad) {
          float* dB = b.grad + i * br * bc;
          if (!trans_b) gemm(!trans_a, false, K, N, M, 1.f, A, ac, dY, N, 1.f, dB, bc);
          else gemm(true, trans_a, N, K, M, 1.f, dY, N, A, ac, 1.f, dB, bc);
        }
      }
    });
  }
  return y;
}

namespace {

// y = a + b (y may be b).
struct AddRun {
  float* y;
  const float *a, *b;
  int64_t n;
  void operator()() const {
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
  }
};

// y = a + b into y (which may be b), and the backward.
Tensor add_to(Graph& g, const Tensor& a, const Tensor& b, const Tensor& y, Regen* regen = nullptr) {
  PartScope part(Part::Elementwise);
  const int64_t n = a.numel();
  const AddRun run{y.data, a.data, b.data, n};
  run();
  if (regen) *regen = make_regen(g, run);
  if (y.requires_grad())
    g.record([=] {
      float* da = a.grad;
      float* db = b.grad;
      if (da && db && da != db) {  // both in one pass over dy
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
        for (int64_t i = 0; i < n; ++i) {
          da[i] += y.grad[i];
          db[i] += y.grad[i];
        }
        return;
      }
      for (const Tensor* t : {&a, &b})
        if (t->grad) {
          float* d = t->grad;
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
          for (int64_t i = 0; i < n; ++i) d[i] += y.grad[i];
        }
    });
  return y;
}

}  // namespace

Tensor add(Graph& g, const Tensor& a, const Tensor& b) {
  check_same_shape("add", a, b);
  return add_to(g, a, b, g.output(a.shape, a, b));
}

Tensor add_into(Graph& g, const Tensor& a, const Tensor& b, Regen* regen) {
  check_same_shape("add_into", a, b);
  return add_to(g, a, b, g.output_over(b, a), regen);
}

Tensor add_bias(Graph& g, const Tensor& x, const Tensor& bias) {
  PartScope part(Part::Elementwise);
  MOE_CHECK(bias.ndim() == 1 && bias.size(0) == x.cols(), "add_bias", "bias " + bias.shape.str() + " does not match " + x.shape.str());
  Tensor y = g.output(x.shape, x, bias);
  const int64_t N = x.rows(), C = x.cols();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) y.data[n * C + c] = x.data[n * C + c] + bias.data[c];
  if (y.requires_grad())
    g.record([=] {
      if (x.grad)
        for (int64_t i = 0; i < N * C; ++i) x.grad[i] += y.grad[i];
      if (bias.grad) bias_backward(bias.grad, y.grad, N, C);
    });
  return y;
}

Tensor mul(Graph& g, const Tensor& a, const Tensor& b) {
  PartScope part(Part::Elementwise);
  check_same_shape("mul", a, b);
  Tensor y = g.output(a.shape, a, b);
  const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) y.data[i] = a.data[i] * b.data[i];
  if (y.requires_grad())
    g.record([=] {
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
      for (int64_t i = 0; i < n; ++i) {
        if (a.grad) a.grad[i] += y.grad[i] * b.data[i];
        if (b.grad) b.grad[i] += y.grad[i] * a.data[i];
      }
    });
  return y;
}

Tensor scale(Graph& g, const Tensor& x, float s) {
  PartScope part(Part::Elementwise);
  Tensor y = g.output(x.shape, x);
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
  for (int64_t i = 0; i < n; ++i) y.data[i] = s * x.data[i];
  if (y.requires_grad())
    g.record([=] {
#pragma omp parallel for simd schedule(static) if (n > kParallelMinWork)
      for (int64_t i = 0; i < n; ++i) x.grad[i] += s * y.grad[i];
    });
  return y;
}

Tensor embedding(Graph& g, const int32_t* ids, const Tensor& table, const Shape& out_shape) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(table.ndim() == 2, "embedding", "table must be [V, C], got " + table.shape.str());
  const int64_t V = table.size(0), C = table.size(1);
  MOE_CHECK(out_shape.ndim >= 1 && out_shape[-1] == C, "embedding", "output shape " + out_shape.str() + " must end in C=" + std::to_string(C));
  const int64_t N = out_shape.numel() / C;
  for (int64_t n = 0; n < N; ++n)
    MOE_CHECK(ids[n] >= 0 && ids[n] < V, "embedding", "id " + std::to_string(ids[n]) + " at position " + std::to_string(n) + " is outside the vocabulary [0, " + std::to_string(V) + ")");
  Tensor y = g.output(out_shape, table);
  for (int64_t n = 0; n < N; ++n) std::memcpy(y.data + n * C, table.data + int64_t(ids[n]) * C, sizeof(float) * size_t(C));
  if (y.requires_grad()) {
    int32_t* saved = g.arena().alloc_ints(N);
    std::memcpy(saved, ids, sizeof(int32_t) * size_t(N));
    g.record([=] {
      // Serial in row order: rows sharing an id add in a fixed order.
      for (int64_t n = 0; n < N; ++n) {
        float* dst = table.grad + int64_t(saved[n]) * C;
        const float* src = y.grad + n * C;
        for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
      }
    });
  }
  return y;
}

namespace {

// What layernorm's Regen recomputes: the output, and the statistics (the same values again).
struct LayernormRun {
  float *y, *mean, *rstd;
  const float *x, *w, *b;
  int64_t N, C;
  float eps;
  void operator()() const { layernorm_forward(y, mean, rstd, x, w, b, N, C, eps); }
};

// What rmsnorm's Regen recomputes: the output, and the statistics (the same values again).
struct RmsnormRun {
  float *y, *rstd;
  const float *x, *w;
  int64_t N, C;
  float eps;
  void operator()() const { rmsnorm_forward(y, rstd, x, w, N, C, eps); }
};

}  // namespace

Tensor layernorm(Graph& g, const Tensor& x, const Tensor& w, const Tensor& b, float eps, Regen* regen) {
  PartScope part(Part::Norm);
  const int64_t C = x.cols(), N = x.rows();
  MOE_CHECK(w.ndim() == 1 && w.size(0) == C && b.shape == w.shape, "layernorm",
        "weight " + w.shape.str() + " and bias " + b.shape.str() + " must be [" + std::to_string(C) + "] for input " + x.shape.str());
  Tensor y = regen ? g.scratch_output(x.shape, x, w, b) : g.output(x.shape, x, w, b);
  float* mean = g.arena().alloc_floats(N);
  float* rstd = g.arena().alloc_floats(N);
  const LayernormRun run{y.data, mean, rstd, x.data, w.data, b.data, N, C, eps};
  run();
  if (regen) *regen = make_regen(g, run);
  if (y.requires_grad())
    g.record([=] { layernorm_backward(x.grad, w.grad, b.grad, y.grad, x.data, w.data, mean, rstd, N, C); });
  return y;
}

Tensor rmsnorm(Graph& g, const Tensor& x, const Tensor& w, float eps, Regen* regen) {
  PartScope part(Part::Norm);
  const int64_t C = x.cols(), N = x.rows();
  MOE_CHECK(w.ndim() == 1 && w.size(0) == C, "rmsnorm",
            "weight " + w.shape.str() + " must be [" + std::to_string(C) + "] for input " + x.shape.str());
  Tensor y = regen ? g.scratch_output(x.shape, x, w) : g.output(x.shape, x, w);
  float* rstd = g.arena().alloc_floats(N);
  const RmsnormRun run{y.data, rstd, x.data, w.data, N, C, eps};
  run();
  if (regen) *regen = make_regen(g, run);
  if (y.requires_grad()) g.record([=] { rmsnorm_backward(x.grad, w.grad, y.grad, x.data, w.data, rstd, N, C); });
  return y;
}

}  // namespace moe
