// Elementwise ops: relu, gelu, silu, softplus, dropout, and the reductions sum and mean.
#include <algorithm>
#include <cmath>

#include "moe/kernels/activations.hpp"
#include "moe/kernels/bits.hpp"
#include "moe/kernels/log1pf.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// y = f(x) elementwise; backward dx += dy · f'(x) (f' from x and y). One mechanism for all.
// fs, when given, computes f over a run of values at once (y = fs(x, y, n)), with f's bits.
template <class F, class DF>
Tensor unary(Graph& g, const Tensor& x, F f, DF df, void (*fs)(const float*, float*, int64_t) = nullptr) {
  PartScope part(Part::Elementwise);
  Tensor y = g.output(x.shape, x);
  const int64_t n = x.numel();
  if (fs) {
    constexpr int64_t kRun = 1024;
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
    for (int64_t i = 0; i < n; i += kRun) fs(x.data + i, y.data + i, std::min(kRun, n - i));
  } else {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
    for (int64_t i = 0; i < n; ++i) y.data[i] = f(x.data[i]);
  }
  if (y.requires_grad())
    g.record([=] {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
      for (int64_t i = 0; i < n; ++i) x.grad[i] += y.grad[i] * df(x.data[i], y.data[i]);
    });
  return y;
}

}  // namespace

Tensor relu(Graph& g, const Tensor& x) {
  return unary(g, x, [](float v) { return act::relu(v); }, [](float v, float) { return act::relu_grad(v); });
}

Tensor gelu(Graph& g, const Tensor& x) {
  return unary(g, x, [](float v) { return act::gelu(v); }, [](float v, float) { return act::gelu_grad(v); });
}

Tensor silu(Graph& g, const Tensor& x) {
  return unary(g, x, [](float v) { return act::silu(v); }, [](float v, float) { return act::silu_grad(v); });
}

Tensor softplus(Graph& g, const Tensor& x) {
  return unary(g, x, [](float v) { return act::softplus(v); },
               [](float v, float) { return act::softplus_grad(v); }, softplus_floats);
}

namespace {

// Runs of a mask's entries for the threads: whole words.
constexpr int64_t kMaskRun = 4096;

// y = x · the mask's factors (y may be x), plus sum[i] where sum is given (dropout_add_into):
// a run of the mask at a time, the sum while the run is in cache (the product rounded before
// the sum, as in two ops).
struct DropoutRun {
  float* y;
  const float* x;
  const uint16_t* mask;
  int64_t n;
  float scale;
  const float* sum = nullptr;
  void operator()() const {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
    for (int64_t i = 0; i < n; i += kMaskRun) {
      const int64_t m = std::min(kMaskRun, n - i);
      scale_by_bits(y + i, x + i, mask + i / 16, scale, m);
      if (sum)
        for (int64_t j = i; j < i + m; ++j) y[j] = sum[j] + y[j];
    }
  }
};

// Dropout's mask drawn from rng over x, then y = x · its factors (+ sum): the forward run,
// its Regen and the backward (x's gradient += dy · the factors, sum's += dy), for dropout and
// dropout_add_into. make_y() gives y's memory, after the mask is drawn.
template <class MakeY>
Tensor masked(Graph& g, const Tensor& x, const Tensor* sum, float p, Rng& rng, Regen* regen, MakeY make_y) {
  const int64_t n = x.numel();
  const uint16_t* mask = keep_bits(g, n, 0, [&](uint8_t* bytes) { rng.fill_keep_mask(bytes, n, p); });
  const float scale = dropout_scale(p);
  Tensor y = make_y();
  const DropoutRun run{y.data, x.data, mask, n, scale, sum ? sum->data : nullptr};
  run();
  if (regen) *regen = make_regen(g, run);
  if (y.requires_grad()) {
    float* const dsum = sum ? sum->grad : nullptr;
    g.record([=] {
#pragma omp parallel for schedule(static) if (n > kParallelMinWork)
      for (int64_t i = 0; i < n; i += kMaskRun) {
        const int64_t m = std::min(kMaskRun, n - i);
        if (dsum)
          for (int64_t j = i; j < i + m; ++j) dsum[j] += y.grad[j];
        if (x.grad) add_scaled_by_bits(x.grad + i, y.grad + i, mask + i / 16, scale, m);
      }
    });
  }
  return y;
}

}  // namespace

Tensor dropout(Graph& g, const Tensor& x, float p, bool training, Rng& rng, bool in_place, Regen* regen) {
  PartScope part(Part::Elementwise);
  MOE_CHECK(p >= 0.f && p < 1.f, "dropout", "probability must be in [0, 1), got " + std::to_string(p));
  if (regen) *regen = Regen{};
  if (!training || p == 0.f) return x;
  return masked(g, x, nullptr, p, rng, regen, [&] {
    return in_place ? g.output_over(x) : regen ? g.scratch_output(x.shape, x) : g.output(x.shape, x);
  });
}

Tensor dropout_add_into(Graph& g, const Tensor& x, const Tensor& o, float p, bool training, Rng& rng, Regen* regen) {
  PartScope part(Part::Elementwise);
  MOE_CHECK(p >= 0.f && p < 1.f, "dropout_add_into", "probability must be in [0, 1), got " + std::to_string(p));
  check_same_shape("dropout_add_into", x, o);
  if (!training || p == 0.f) return add_into(g, x, o, regen);
  return masked(g, o, &x, p, rng, regen, [&] { return g.output_over(o, x); });
}

Tensor sum(Graph& g, const Tensor& x) {
  PartScope part(Part::Elementwise);
  Tensor y = g.output({1}, x);
  double s = 0;
  for (int64_t i = 0; i < x.numel(); ++i) s += x.data[i];
  y.data[0] = float(s);
  if (y.requires_grad())
    g.record([=] {
      for (int64_t i = 0; i < x.numel(); ++i) x.grad[i] += y.grad[0];
    });
  return y;
}

Tensor mean(Graph& g, const Tensor& x) {
  PartScope part(Part::Elementwise);
  MOE_CHECK(x.numel() > 0, "mean", "empty tensor");
  return scale(g, sum(g, x), 1.f / float(x.numel()));
}

}  // namespace moe
