// AdamW inside the backward pass, group by group (see GroupUpdate).
#pragma once

#include <cstdint>
#include <vector>

#include "moe/model/model.hpp"  // GradientsReady
#include "moe/optim/adamw.hpp"
#include "moe/tensor/params.hpp"

namespace moe {

// AdamW applied to each group of parameters (Model::grad_groups) as soon as the backward pass
// completes its gradients, which all groups hold in one shared region (ParamStore::
// share_grads): the gradients take one group's memory, and are updated while still in cache.
// For a step without clipping in one process. The gradient norm, when asked for, has the bits
// of sum_of_squares over the whole unshared block: each of its chunks is summed once all of
// its gradients exist, the part from groups updated earlier kept aside until then.
class GroupUpdate final : public GradientsReady {
 public:
  GroupUpdate(AdamW& adamw, ParamStore& params);
  void begin(float lr, bool norm);  // before the forward
  void from(int first_param) override;
  // After the backward: updates the first group; returns the gradient norm, or NaN when begin
  // was not asked for it. Every gradient is zero again.
  double finish();

 private:
  void complete(int64_t begin);  // the floats [begin, end_) have their final gradients
  AdamW& adamw_;
  ParamStore& params_;
  int64_t end_ = 0;  // floats from here on are updated
  bool norm_ = false;
  std::vector<double> partial_;  // per chunk of kSquaresChunk floats
  std::vector<float> carry_;     // gradients of [end_, the end of its chunk)
};

}  // namespace moe
