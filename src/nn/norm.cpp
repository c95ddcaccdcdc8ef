#include "moe/nn/norm.hpp"

#include <stdexcept>

#include "moe/kernels/nn.hpp"
#include "moe/ops/ops.hpp"

namespace moe {

Norm Norm::make(ParamBuilder& pb, const std::string& name, int64_t C, NormKind kind) {
  Norm n;
  n.kind = kind;
  n.C = C;
  n.weight = pb.add(name + ".weight", {C}, false, {ParamRole::kNormWeight});
  if (kind == NormKind::kLayerNorm) n.bias = pb.add(name + ".bias", {C}, false, {ParamRole::kNormBias});
  return n;
}

Tensor Norm::forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen) const {
  switch (kind) {
    case NormKind::kLayerNorm: return layernorm(g, x, ps.get(weight), ps.get(bias), kEps, regen);
    case NormKind::kRmsNorm: return rmsnorm(g, x, ps.get(weight), kEps, regen);
  }
  throw std::logic_error("Norm::forward: unknown model.norm");
}

void Norm::decode(const ParamStore& ps, KVCache::Work& w, const float* x, int64_t n) const {
  switch (kind) {
    case NormKind::kLayerNorm:
      layernorm_forward(w.normed.data(), w.mean.data(), w.rstd.data(), x, ps.get(weight).data, ps.get(bias).data, n,
                        C, kEps);
      return;
    case NormKind::kRmsNorm:
      rmsnorm_forward(w.normed.data(), w.rstd.data(), x, ps.get(weight).data, n, C, kEps);
      return;
  }
}

}  // namespace moe
