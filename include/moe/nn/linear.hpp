// Linear: y = x·Wᵀ + b (W [out, in], as torch.nn.Linear), and the registration of a module's
// parameters (ParamBuilder), which every module uses.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/nn/forward.hpp"
#include "moe/tensor/graph.hpp"
#include "moe/tensor/params.hpp"

namespace moe {

struct Regen;  // moe/ops/ops.hpp

// How Model::init fills a parameter, recorded when it is registered.
enum class ParamRole { kEmbedding, kNormWeight, kNormBias, kLinearWeight, kLinearBias };
struct ParamRoleInfo {
  ParamRole role;
  int64_t fan_in = 0, fan_out = 0;  // for Linear weights and biases
};

// Registers parameters in a store under PyTorch-style dotted names, with their roles.
class ParamBuilder {
 public:
  ParamBuilder(ParamStore& store, std::vector<ParamRoleInfo>& roles) : store_(store), roles_(roles) {}
  int add(const std::string& name, const Shape& shape, bool decay, ParamRoleInfo role) {
    const int id = store_.add(name, shape, decay);
    roles_.push_back(role);
    return id;
  }

 private:
  ParamStore& store_;
  std::vector<ParamRoleInfo>& roles_;
};

struct Linear {
  int weight = -1;  // [out, in], or [in, out] when in_out
  int bias = -1;    // [out], or -1 for none
  int64_t in = 0, out = 0;
  // The weight is stored transposed, [in, out] (to_decode_layout): decode only.
  bool in_out = false;

  static Linear make(ParamBuilder& pb, const std::string& name, int64_t in, int64_t out, bool bias);
  // A Linear whose weight is parameter `weight` of another module, [out, in] (tied weights):
  // only its bias, when it has one, is registered (as name + ".bias").
  static Linear tied(ParamBuilder& pb, const std::string& name, int weight, int64_t in, int64_t out, bool bias);
  // The bias tensor, or an empty one.
  Tensor bias_tensor(const ParamStore& ps) const { return bias >= 0 ? ps.get(bias) : Tensor{}; }
  // x [..., in] -> [..., out]. With regen, the output is made again in the backward pass (Regen).
  Tensor forward(Graph& g, const ParamStore& ps, const Tensor& x, Regen* regen = nullptr) const;
  // y [n, out] for the n rows of x [n, in]: forward's GEMM (bias rows, then the products), or
  // for one row the one-row loop, on the weight as it is stored (no copy). sparse_x: x is
  // mostly zeros (a relu's output), and one row in the decode layout reads only the rows of
  // the weight its nonzeros multiply (gemv_skip_zeros: the same bits).
  void decode(const ParamStore& ps, const float* x, int64_t n, float* y, bool sparse_x = false) const;
  // Transposes the weight in place to [in, out], the decode layout: a one-row product then
  // streams the weight's rows in order (gemv's accumulated rows), and a few rows' GEMM reads
  // it without packing; the same bits either way. Forward refuses a Linear in that layout.
  // Not for a tied weight (it is another module's too). scratch: memory for a copy, reused.
  void to_decode_layout(ParamStore& ps, std::vector<float>& scratch);
};

}  // namespace moe
