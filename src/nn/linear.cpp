#include "moe/nn/linear.hpp"

#include <cstring>

#include "moe/kernels/gemm.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

Linear Linear::make(ParamBuilder& pb, const std::string& name, int64_t in, int64_t out, bool with_bias) {
  Linear lp;
  lp.in = in;
  lp.out = out;
  lp.weight = pb.add(name + ".weight", {out, in}, true, {ParamRole::kLinearWeight, in, out});
  if (with_bias) lp.bias = pb.add(name + ".bias", {out}, false, {ParamRole::kLinearBias, in, out});
  return lp;
}

Linear Linear::tied(ParamBuilder& pb, const std::string& name, int weight, int64_t in, int64_t out, bool with_bias) {
  Linear lp;
  lp.in = in;
  lp.out = out;
  lp.weight = weight;
  if (with_bias) lp.bias = pb.add(name + ".bias", {out}, false, {ParamRole::kLinearBias, in, out});
  return lp;
}

Tensor Linear::forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen) const {
  return linear(g, x, ps.get(weight), bias_tensor(ps), regen);
}

void Linear::decode(const ParamStore& ps, const float* x, int64_t n, float* y) const {
  const float* w = ps.get(weight).data;  // [out, in]
  const float* b = bias >= 0 ? ps.get(bias).data : nullptr;
  if (n > 1) {
    gemm_bias(false, true, n, out, in, x, in, w, in, b, y, out);
    return;
  }
  if (b) std::memcpy(y, b, sizeof(float) * size_t(out));
  gemv(true, out, in, 1.f, x, w, in, b ? 1.f : 0.f, y);
}

}  // namespace moe
