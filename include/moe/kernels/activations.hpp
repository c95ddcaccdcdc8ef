// Scalar activation functions, shared by the autograd ops (src/ops/elementwise_ops.cpp,
// linear_act) and the graph-free decoder (src/model/decode.cpp), so both compute the same bits.
#pragma once

#include <cmath>

namespace moe {

// The activations that can follow a linear layer in one pass (linear_act, the decoder).
enum class Activation { kRelu, kGelu, kSilu };

namespace act {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline float relu(float v) { return v > 0.f ? v : 0.f; }
inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * kInvSqrt2)); }  // exact erf form
inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }
// torch.nn.functional.softplus with beta 1, threshold 20: linear above the threshold.
constexpr float kSoftplusThreshold = 20.f;
inline float softplus(float v) { return v > kSoftplusThreshold ? v : std::log1p(std::exp(v)); }

// Their derivatives at v.
inline float relu_grad(float v) { return v > 0.f ? 1.f : 0.f; }
inline float gelu_grad(float v) {
  return 0.5f * (1.f + std::erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
}
inline float silu_grad(float v) {
  const float s = 1.f / (1.f + std::exp(-v));
  return s * (1.f + v * (1.f - s));
}
inline float softplus_grad(float v) { return v > kSoftplusThreshold ? 1.f : 1.f / (1.f + std::exp(-v)); }

// fn(f, df) with the activation `kind` and its derivative as callables: one instantiation of
// fn per activation, so the loops inside it are compiled for each.
template <class Fn>
void dispatch(Activation kind, Fn&& fn) {
  switch (kind) {
    case Activation::kRelu: return fn([](float v) { return relu(v); }, [](float v) { return relu_grad(v); });
    case Activation::kGelu: return fn([](float v) { return gelu(v); }, [](float v) { return gelu_grad(v); });
    case Activation::kSilu: return fn([](float v) { return silu(v); }, [](float v) { return silu_grad(v); });
  }
}

}  // namespace act
}  // namespace moe
