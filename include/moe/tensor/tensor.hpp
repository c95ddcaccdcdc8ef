// Tensor: a non-owning, contiguous, row-major float32 view with up to 4 dimensions.
//
// Memory is owned elsewhere: parameters by a ParamStore (one contiguous block for all
// weights and one for all gradients), activations by the Graph's Arena (reset each step,
// reused across steps). A Tensor is therefore cheap to copy and trivially destructible,
// which lets backward closures capture Tensors by value.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace moe {

constexpr int kMaxDims = 4;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d);

  int64_t numel() const;
  // i may be negative: -1 is the last dimension.
  int64_t operator[](int i) const;
  std::string str() const;  // "[2, 3, 4]"
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
};

struct Tensor {
  float* data = nullptr;  // numel() floats
  float* grad = nullptr;  // numel() floats, or null when no gradient is tracked
  Shape shape;

  int64_t numel() const { return shape.numel(); }
  int ndim() const { return shape.ndim; }
  int64_t size(int i) const { return shape[i]; }
  bool requires_grad() const { return grad != nullptr; }
  // Product of all dimensions but the last: the number of rows of a row-major matrix.
  int64_t rows() const { return shape.ndim == 0 ? 1 : numel() / shape[-1]; }
  int64_t cols() const { return shape.ndim == 0 ? 1 : shape[-1]; }
  // Same data, new shape of the same numel (no autograd node needed: grad is shared).
  Tensor view(Shape s) const;
};

// Thrown on every shape mismatch or invalid argument; the message names the op.
struct ShapeError : std::exception {
  std::string msg;
  explicit ShapeError(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

// Throws ShapeError("op: message").
[[noreturn]] void fail(const char* op, const std::string& message);
// MOE_CHECK(cond, op, message): throws ShapeError("op: message") when cond is false. The
// message is built only then: checks sit on hot paths (every op, every routed row).
#define MOE_CHECK(cond, op, message)       \
  do {                                     \
    if (!(cond)) ::moe::fail(op, message); \
  } while (false)
// Throws unless a.shape == b.shape, naming the op and both shapes.
void check_same_shape(const char* op, const Tensor& a, const Tensor& b);

}  // namespace moe
