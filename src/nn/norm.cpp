#include "moe/nn/norm.hpp"

#include "moe/kernels/nn.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

LayerNorm LayerNorm::make(ParamBuilder& pb, const std::string& name, int64_t C) {
  LayerNorm n;
  n.C = C;
  n.weight = pb.add(name + ".weight", {C}, false, {ParamRole::kNormWeight});
  n.bias = pb.add(name + ".bias", {C}, false, {ParamRole::kNormBias});
  return n;
}

Tensor LayerNorm::forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen) const {
  return layernorm(g, x, ps.get(weight), ps.get(bias), kEps, regen);
}

void LayerNorm::decode(const ParamStore& ps, KVCache::Work& w, const float* x, int64_t n) const {
  layernorm_forward(w.normed.data(), w.mean.data(), w.rstd.data(), x, ps.get(weight).data, ps.get(bias).data, n, C,
                    kEps);
}

}  // namespace moe
