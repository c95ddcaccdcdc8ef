// ParamStore: named parameters in one contiguous block, their gradients in another.
//
// Modules register parameters by PyTorch-style dotted name and shape, keep the returned id,
// and fetch the Tensor view (data and grad) with get(id) after finalize(). One block for
// weights and one for gradients means AdamW is one loop, a checkpoint one write and, under
// MPI, the gradient all-reduce one call.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
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
  // The gradient block: the gradient of the float at offset i of data() is grad()[i], unless
  // the gradients are shared (below).
  float* grad() { return grad_.get(); }
  const float* grad() const { return grad_.get(); }
  void zero_grad();

  // Gives the gradients of every group one shared region, for a trainer that updates each
  // group as soon as the backward pass completes its gradients and zeroes them there (the
  // gradients of one group, then, are all that exist at any time). Groups are runs of
  // parameters in registration order, group k from id first_ids[k] (the first is 0) to the
  // next group's. After this, parameter id's gradient is at grad() + offset(id) - offset of
  // its group's first, the gradients are zero, and grad() holds the largest group.
  void share_grads(const std::vector<int>& first_ids);
  bool grads_shared() const { return !grad_offset_.empty(); }
  int64_t grad_numel() const { return grad_numel_; }  // numel(), or the largest group

 private:
  std::vector<ParamInfo> params_;
  std::vector<float> data_;
  // Zero floats from calloc: fresh pages of the system, which take no memory until written.
  // Where the gradients are shared, most of the first block never is.
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> grad_;
  int64_t grad_numel_ = 0;
  void alloc_grads(int64_t n);
  std::vector<int64_t> grad_offset_;  // per id, when shared: its gradient's offset in grad_
  int64_t total_ = 0;
  bool finalized_ = false;
};

}  // namespace moe
