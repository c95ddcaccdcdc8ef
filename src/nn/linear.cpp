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

void Linear::decode(const ParamStore& ps, const KVCache::Work& w, const float* x, int64_t n, float* y) const {
  const bool has_bias = bias >= 0;
  if (has_bias) {
    const float* b = ps.get(bias).data;
    for (int64_t i = 0; i < n; ++i) std::memcpy(y + i * out, b, sizeof(float) * size_t(out));
  }
  const float* wt = w.weights_t.data() + w.weight_t_offset[size_t(weight)];  // [in, out]
  if (n == 1)
    gemv(false, out, in, 1.f, x, wt, out, has_bias ? 1.f : 0.f, y);
  else
    gemm(false, false, n, out, in, 1.f, x, in, wt, out, has_bias ? 1.f : 0.f, y, out);
}

}  // namespace moe
