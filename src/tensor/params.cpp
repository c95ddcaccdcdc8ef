#include "moe/tensor/params.hpp"

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <new>

#include "moe/tensor/profile.hpp"

namespace moe {

namespace {
// Each parameter starts on a 64-byte boundary so kernels may assume aligned rows.
constexpr int64_t kAlignFloats = 16;
}

int ParamStore::add(const std::string& name, const Shape& shape, bool decay) {
  MOE_CHECK(!finalized_, "ParamStore::add", "store already finalized, cannot add '" + name + "'");
  MOE_CHECK(find(name) < 0, "ParamStore::add", "duplicate parameter name '" + name + "'");
  ParamInfo p{name, shape, total_, decay};
  total_ += (shape.numel() + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
  params_.push_back(std::move(p));
  return int(params_.size()) - 1;
}

void ParamStore::finalize() {
  MOE_CHECK(!finalized_, "ParamStore::finalize", "called twice");
  data_.reserve(size_t(total_));
#ifdef __linux__
  // Huge pages where the kernel gives them on request (transparent_hugepage "madvise"): the
  // decoder streams the weights, 36 MB for makemoe.json, a few hundred KB a product, and with
  // 4 KB pages it faults 9000 of them in and walks the page tables at every one.
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data_.data()), end = begin + sizeof(float) * size_t(total_);
  const uintptr_t first = (begin + kHuge - 1) / kHuge * kHuge, last = end / kHuge * kHuge;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: failure is fine
#endif
  data_.assign(size_t(total_), 0.0f);
  alloc_grads(total_);
  finalized_ = true;
}

Tensor ParamStore::get(int id) const {
  MOE_CHECK(finalized_, "ParamStore::get", "finalize() the store before using parameters");
  MOE_CHECK(id >= 0 && id < count(), "ParamStore::get", "no parameter with id " + std::to_string(id));
  const ParamInfo& p = params_[size_t(id)];
  Tensor t;
  t.shape = p.shape;
  t.data = const_cast<float*>(data_.data()) + p.offset;
  t.grad = grad_.get() + (grad_offset_.empty() ? p.offset : grad_offset_[size_t(id)]);
  return t;
}

int ParamStore::find(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return int(i);
  return -1;
}

int64_t ParamStore::parameter_count() const {
  int64_t n = 0;
  for (const ParamInfo& p : params_) n += p.shape.numel();
  return n;
}

void ParamStore::alloc_grads(int64_t n) {
  grad_.reset();
  grad_.reset(static_cast<float*>(std::calloc(size_t(std::max<int64_t>(n, 1)), sizeof(float))));
  if (!grad_) throw std::bad_alloc();
  grad_numel_ = n;
}

void ParamStore::share_grads(const std::vector<int>& first_ids) {
  MOE_CHECK(finalized_, "ParamStore::share_grads", "finalize() the store first");
  MOE_CHECK(!first_ids.empty() && first_ids[0] == 0, "ParamStore::share_grads", "the first group must start at id 0");
  std::vector<int64_t> offsets(params_.size());
  int64_t largest = 0;
  for (size_t k = 0; k < first_ids.size(); ++k) {
    const int first = first_ids[k], end = k + 1 < first_ids.size() ? first_ids[k + 1] : count();
    MOE_CHECK(first < end && end <= count(), "ParamStore::share_grads", "group first ids must ascend below the count");
    const int64_t base = params_[size_t(first)].offset;
    for (int id = first; id < end; ++id) offsets[size_t(id)] = params_[size_t(id)].offset - base;
    largest = std::max(largest, (end < count() ? params_[size_t(end)].offset : total_) - base);
  }
  grad_offset_ = std::move(offsets);
  alloc_grads(largest);
}

void ParamStore::zero_grad() {
  PartScope part(Part::Zeroing);
  float* g = grad_.get();
  const int64_t n = grad_numel_;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] = 0.f;
}

}  // namespace moe
