#include "moe/nn/linear.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

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
  MOE_CHECK(!in_out, "Linear::forward", "the weight is in the decode layout [in, out] (Model::use_decode_layout)");
  return linear(g, x, ps.get(weight), bias_tensor(ps), regen);
}

void Linear::decode(const ParamStore& ps, const float* x, int64_t n, float* y, bool sparse_x) const {
  const float* w = ps.get(weight).data;  // [out, in], or [in, out]
  const float* b = bias >= 0 ? ps.get(bias).data : nullptr;
  const int64_t ldw = in_out ? out : in;
  if (n > 1) {
    gemm_bias(false, !in_out, n, out, in, x, in, w, ldw, b, y, out);
    return;
  }
  if (b) std::memcpy(y, b, sizeof(float) * size_t(out));
  if (sparse_x && in_out)
    gemv_skip_zeros(out, in, 1.f, x, w, ldw, b ? 1.f : 0.f, y);
  else
    gemv(!in_out, out, in, 1.f, x, w, ldw, b ? 1.f : 0.f, y);
}

void Linear::to_decode_layout(ParamStore& ps) {
  if (in_out) return;
  float* w = ps.get(weight).data;
  std::vector<float> t(static_cast<size_t>(in * out));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) t[size_t(i * out + o)] = w[o * in + i];
  std::copy(t.begin(), t.end(), w);
  in_out = true;
}

}  // namespace moe
