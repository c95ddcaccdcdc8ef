// Finite-difference gradient checks for autograd ops.
//
// The op under test maps inputs to an output `out`; the checked scalar is
// L = Σ out ⊙ R for a fixed random R, so every output element matters. The analytic
// gradient comes from one backward pass seeded with R; the numeric one from central
// differences (L(x+eps) - L(x-eps)) / 2eps, with L accumulated in double. A coordinate
// whose discrete decisions (for example top-k selections) change under ±eps is skipped.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "moe/tensor/graph.hpp"

namespace moe::test {

struct Probe {
  Tensor out;
  std::vector<int32_t> discrete;  // decisions that must not flip, e.g. top-k indices
};

// Builds the op on the given inputs (which live in g). Called many times: must be
// deterministic (reseed any Rng inside).
using OpFn = std::function<Probe(Graph& g, const std::vector<Tensor>& inputs)>;

struct GradCheckOptions {
  double eps = 1e-2;
  double atol = 1e-3;
  double rtol = 1e-2;
  uint64_t seed = 1234;
  std::vector<bool> check_input;  // empty: check every input
};

struct GradCheckReport {
  double max_abs_err = 0;
  int64_t checked = 0;
  int64_t skipped = 0;
  int64_t failures = 0;
  std::string first_failure;  // "input 1 [7]: analytic 0.5 numeric 0.25"
};

GradCheckReport gradcheck(const std::vector<std::vector<float>>& inputs,
                          const std::vector<Shape>& shapes, const OpFn& fn,
                          const GradCheckOptions& opt = {});

// Uniform random values in [lo, hi) from a fixed seed.
std::vector<float> random_vector(int64_t n, uint64_t seed, float lo = -1.f, float hi = 1.f);

}  // namespace moe::test

// Catch2 assertion: runs gradcheck and fails with the report.
#define REQUIRE_GRADCHECK(inputs, shapes, fn, ...)                                        \
  do {                                                                                    \
    auto _r = ::moe::test::gradcheck(inputs, shapes, fn, ##__VA_ARGS__);                  \
    INFO("checked " << _r.checked << " skipped " << _r.skipped << " max abs err "         \
                    << _r.max_abs_err << "; first failure: " << _r.first_failure);         \
    REQUIRE(_r.checked > 0);                                                              \
    REQUIRE(_r.failures == 0);                                                            \
  } while (0)
