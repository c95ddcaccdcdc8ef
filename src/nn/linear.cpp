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

void Linear::to_decode_layout(ParamStore& ps, std::vector<float>& scratch) {
  if (in_out) return;
  float* w = ps.get(weight).data;
  if (int64_t(scratch.size()) < in * out) scratch.resize(size_t(in * out));
  std::copy(w, w + in * out, scratch.data());
  constexpr int64_t kTile = 16;  // tiles of 16 x 16, so that both sides go a cache line at a time
  for (int64_t o0 = 0; o0 < out; o0 += kTile)
    for (int64_t i0 = 0; i0 < in; i0 += kTile)
      for (int64_t i = i0; i < std::min(in, i0 + kTile); ++i)
        for (int64_t o = o0; o < std::min(out, o0 + kTile); ++o) w[i * out + o] = scratch[size_t(o * in + i)];
  in_out = true;
}

}  // namespace moe
