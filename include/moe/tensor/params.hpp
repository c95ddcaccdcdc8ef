// ParamStore: named parameters in one contiguous block, their gradients in another.
//
// Modules register parameters by PyTorch-style dotted name and shape, keep the returned id,
// and fetch the Tensor view (data and grad) with get(id) after finalize(). One block for
// weights and one for gradients means AdamW is one loop, a checkpoint one write and, under
// MPI, the gradient all-reduce one call.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/tensor/tensor.hpp"

namespace moe {

struct ParamInfo {
  std::string name;  // e.g. "blocks.0.attn.qkv.weight"
  Shape shape;
  int64_t offset = 0;  // into data() / grad(), in floats
  // Whether weight decay applies when the optimizer is told to exempt biases, norms and
  // embeddings (set by the module that registers it).
  bool decay = true;
};

class ParamStore {
 public:
  // Registers a parameter; returns its id. Only before finalize().
  int add(const std::string& name, const Shape& shape, bool decay = true);
  // Allocates the blocks (data zero, grad zero). After this, get() works and add() throws.
  void finalize();
  bool finalized() const { return finalized_; }

  Tensor get(int id) const;
  int find(const std::string& name) const;  // -1 when absent
  const ParamInfo& info(int id) const { return params_[size_t(id)]; }
  const std::vector<ParamInfo>& infos() const { return params_; }
  int count() const { return int(params_.size()); }
  // Floats in each block, including the alignment padding between parameters.
  int64_t numel() const { return total_; }
  // Number of parameter values (no padding): the model's parameter count.
  int64_t parameter_count() const;

  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  float* grad() { return grad_.data(); }
  const float* grad() const { return grad_.data(); }
  void zero_grad();

 private:
  std::vector<ParamInfo> params_;
  std::vector<float> data_, grad_;
  int64_t total_ = 0;
  bool finalized_ = false;
};

}  // namespace moe
