#include "moe/tensor/tensor.hpp"

#include <sstream>

namespace moe {

Shape::Shape(std::initializer_list<int64_t> d) {
  MOE_CHECK(d.size() <= size_t(kMaxDims), "Shape", "at most 4 dimensions, got " + std::to_string(d.size()));
  for (int64_t v : d) {
    MOE_CHECK(v >= 0, "Shape", "negative dimension " + std::to_string(v));
    dims[size_t(ndim++)] = v;
  }
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= dims[size_t(i)];
  return n;
}

int64_t Shape::operator[](int i) const {
  int j = i < 0 ? ndim + i : i;
  MOE_CHECK(j >= 0 && j < ndim, "Shape", "dimension " + std::to_string(i) + " out of range for " + str());
  return dims[size_t(j)];
}

std::string Shape::str() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << dims[size_t(i)];
  os << ']';
  return os.str();
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (dims[size_t(i)] != o.dims[size_t(i)]) return false;
  return true;
}

Tensor Tensor::view(Shape s) const {
  MOE_CHECK(s.numel() == numel(), "view", "cannot view " + shape.str() + " as " + s.str());
  Tensor t = *this;
  t.shape = s;
  return t;
}

void fail(const char* op, const std::string& message) { throw ShapeError(std::string(op) + ": " + message); }

void check_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  MOE_CHECK(a.shape == b.shape, op, "shapes differ: " + a.shape.str() + " vs " + b.shape.str());
}

}  // namespace moe
