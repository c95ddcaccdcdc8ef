#include "gradcheck.hpp"

#include <cmath>
#include <cstring>
#include <sstream>

#include "moe/tensor/rng.hpp"

namespace moe::test {

std::vector<float> random_vector(int64_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v(static_cast<size_t>(n));
  Rng rng(seed, 99);
  rng.fill_uniform(v.data(), n, lo, hi);
  return v;
}

namespace {

struct Eval {
  double loss = 0;
  std::vector<int32_t> discrete;
};

Eval evaluate(const std::vector<std::vector<float>>& inputs, const std::vector<Shape>& shapes,
              const OpFn& fn, const std::vector<float>& R) {
  Graph g;
  g.set_grad_enabled(false);
  std::vector<Tensor> ts;
  for (size_t i = 0; i < inputs.size(); ++i) ts.push_back(g.constant(shapes[i], inputs[i].data()));
  Probe p = fn(g, ts);
  Eval e;
  for (int64_t j = 0; j < p.out.numel(); ++j) e.loss += double(p.out.data[j]) * double(R[size_t(j)]);
  e.discrete = std::move(p.discrete);
  return e;
}

}  // namespace

GradCheckReport gradcheck(const std::vector<std::vector<float>>& inputs,
                          const std::vector<Shape>& shapes, const OpFn& fn,
                          const GradCheckOptions& opt) {
  GradCheckReport rep;
  // Analytic gradients.
  Graph g;
  std::vector<Tensor> ts;
  for (size_t i = 0; i < inputs.size(); ++i) {
    MOE_CHECK(shapes[i].numel() == int64_t(inputs[i].size()), "gradcheck", "input size/shape mismatch");
    Tensor t = g.new_tensor(shapes[i], true);
    std::memcpy(t.data, inputs[i].data(), sizeof(float) * inputs[i].size());
    ts.push_back(t);
  }
  Probe p = fn(g, ts);
  MOE_CHECK(p.out.requires_grad(), "gradcheck", "op output does not track a gradient");
  std::vector<float> R = random_vector(p.out.numel(), opt.seed, -1.f, 1.f);
  g.backward_from(p.out, R.data());
  const std::vector<int32_t> base_discrete = p.discrete;

  std::vector<std::vector<float>> x = inputs;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!opt.check_input.empty() && !opt.check_input[i]) continue;
    for (size_t j = 0; j < x[i].size(); ++j) {
      const float orig = x[i][j];
      x[i][j] = orig + float(opt.eps);
      Eval plus = evaluate(x, shapes, fn, R);
      x[i][j] = orig - float(opt.eps);
      Eval minus = evaluate(x, shapes, fn, R);
      x[i][j] = orig;
      if (plus.discrete != base_discrete || minus.discrete != base_discrete) {
        ++rep.skipped;
        continue;
      }
      // The step actually taken in float, so rounding of x ± eps does not bias the estimate.
      const double h = double(orig + float(opt.eps)) - double(orig - float(opt.eps));
      const double numeric = (plus.loss - minus.loss) / h;
      const double analytic = ts[i].grad[j];
      const double err = std::fabs(numeric - analytic);
      rep.max_abs_err = std::max(rep.max_abs_err, err);
      ++rep.checked;
      if (err > opt.atol + opt.rtol * std::fabs(numeric)) {
        if (rep.failures++ == 0) {
          std::ostringstream os;
          os << "input " << i << " [" << j << "]: analytic " << analytic << " numeric " << numeric;
          rep.first_failure = os.str();
        }
      }
    }
  }
  return rep;
}

}  // namespace moe::test
