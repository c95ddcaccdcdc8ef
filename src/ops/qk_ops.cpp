// The queries and keys of a fused projection: QK-norm (RMSNorm per head) and RoPE.
#include <cstring>

#include "moe/kernels/nn.hpp"
#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// Checks qkv [B, T, (H + 2·H_kv)·D]; returns D.
int64_t head_size_of(const char* op, const Tensor& qkv, int64_t H, int64_t H_kv) {
  MOE_CHECK(H >= 1 && H_kv >= 1 && H % H_kv == 0, op,
            "H=" + std::to_string(H) + " must be a multiple of H_kv=" + std::to_string(H_kv));
  MOE_CHECK(qkv.ndim() == 3 && qkv.size(2) % (H + 2 * H_kv) == 0, op,
            "qkv must be [B, T, (H + 2·H_kv)·D] for H=" + std::to_string(H) + ", H_kv=" + std::to_string(H_kv) +
                ", got " + qkv.shape.str());
  return qkv.size(2) / (H + 2 * H_kv);
}

// dst += src over the value columns [(H + H_kv)·D, W) of each of the N rows.
void add_value_columns(float* dst, const float* src, int64_t N, int64_t W, int64_t from) {
#pragma omp parallel for schedule(static) if (N * W > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = from; c < W; ++c) dst[n * W + c] += src[n * W + c];
}

}  // namespace

Tensor qk_rmsnorm(Graph& g, const Tensor& qkv, const Tensor& wq, const Tensor& wk, int64_t H, int64_t H_kv,
                  float eps) {
  const int64_t D = head_size_of("qk_rmsnorm", qkv, H, H_kv);
  MOE_CHECK(wq.ndim() == 1 && wq.size(0) == D && wk.shape == wq.shape, "qk_rmsnorm",
            "gains " + wq.shape.str() + " and " + wk.shape.str() + " must be [" + std::to_string(D) + "]");
  const int64_t N = qkv.size(0) * qkv.size(1), W = qkv.size(2), C = H * D, v0 = (H + H_kv) * D;
  Tensor y = g.output(qkv.shape, qkv, wq, wk);
  float* rstd = g.arena().alloc_floats(N * (H + H_kv));  // [N·H] queries, then [N·H_kv] keys
  rmsnorm_forward(y.data, rstd, qkv.data, wq.data, N * H, D, eps, H, W);
  rmsnorm_forward(y.data + C, rstd + N * H, qkv.data + C, wk.data, N * H_kv, D, eps, H_kv, W);
#pragma omp parallel for schedule(static) if (N * W > kParallelMinWork)
  for (int64_t n = 0; n < N; ++n) std::memcpy(y.data + n * W + v0, qkv.data + n * W + v0, sizeof(float) * size_t(W - v0));
  if (y.requires_grad())
    g.record([=] {
      float* dx = qkv.grad;
      rmsnorm_backward(dx, wq.grad, y.grad, qkv.data, wq.data, rstd, N * H, D, H, W);
      rmsnorm_backward(dx ? dx + C : nullptr, wk.grad, y.grad + C, qkv.data + C, wk.data, rstd + N * H, N * H_kv, D,
                       H_kv, W);
      if (dx) add_value_columns(dx, y.grad, N, W, v0);
    });
  return y;
}

Tensor rope(Graph& g, const Tensor& qkv, int64_t H, int64_t H_kv, double theta) {
  const int64_t D = head_size_of("rope", qkv, H, H_kv);
  MOE_CHECK(D % 2 == 0, "rope", "the head size must be even, got " + std::to_string(D));
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2), half = D / 2, v0 = (H + H_kv) * D;
  Tensor y = g.output(qkv.shape, qkv);
  float* cos = g.arena().alloc_floats(T * half);  // [T, D/2] each
  float* sin = g.arena().alloc_floats(T * half);
  rope_tables(cos, sin, 0, T, D, theta);
#pragma omp parallel for schedule(static) if (B * T * W > kParallelMinWork)
  for (int64_t n = 0; n < B * T; ++n) {
    const int64_t t = n % T;
    rope_forward(y.data + n * W, qkv.data + n * W, cos + t * half, sin + t * half, H + H_kv, D);
    std::memcpy(y.data + n * W + v0, qkv.data + n * W + v0, sizeof(float) * size_t(W - v0));
  }
  if (y.requires_grad() && qkv.grad)
    g.record([=] {
#pragma omp parallel for schedule(static) if (B * T * W > kParallelMinWork)
      for (int64_t n = 0; n < B * T; ++n) {
        const int64_t t = n % T;
        rope_backward(qkv.grad + n * W, y.grad + n * W, cos + t * half, sin + t * half, H + H_kv, D);
        for (int64_t c = v0; c < W; ++c) qkv.grad[n * W + c] += y.grad[n * W + c];
      }
    });
  return y;
}

}  // namespace moe
