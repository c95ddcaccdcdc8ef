// Layout ops: split_heads, merge_heads, slice_cols (copies, so later kernels see contiguous data).
#include <cstring>

#include "moe/ops/ops.hpp"
#include "moe/tensor/parallel.hpp"

namespace moe {

namespace {

// Copies [B, T, H, D] <-> [B, H, T, D]; `to_heads` picks the direction. dst += when accumulate.
void permute_bthd(float* dst, const float* src, int64_t B, int64_t T, int64_t H, int64_t D, bool to_heads,
                  bool accumulate) {
#pragma omp parallel for collapse(2) schedule(static) if (B * T * H * D > kParallelMinWork)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t bthd = ((b * T + t) * H + h) * D, bhtd = ((b * H + h) * T + t) * D;
        float* d = dst + (to_heads ? bhtd : bthd);
        const float* s = src + (to_heads ? bthd : bhtd);
        if (accumulate)
          for (int64_t i = 0; i < D; ++i) d[i] += s[i];
        else
          std::memcpy(d, s, sizeof(float) * size_t(D));
      }
}

}  // namespace

Tensor split_heads(Graph& g, const Tensor& x, int64_t H) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(x.ndim() == 3, "split_heads", "input must be [B, T, C], got " + x.shape.str());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  MOE_CHECK(H > 0 && C % H == 0, "split_heads", "C=" + std::to_string(C) + " is not divisible by H=" + std::to_string(H));
  const int64_t D = C / H;
  Tensor y = g.output({B, H, T, D}, x);
  permute_bthd(y.data, x.data, B, T, H, D, true, false);
  if (y.requires_grad()) g.record([=] { permute_bthd(x.grad, y.grad, B, T, H, D, false, true); });
  return y;
}

Tensor merge_heads(Graph& g, const Tensor& x) {
  PartScope part(Part::GatherScatter);
  MOE_CHECK(x.ndim() == 4, "merge_heads", "input must be [B, H, T, D], got " + x.shape.str());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  Tensor y = g.output({B, T, H * D}, x);
  permute_bthd(y.data, x.data, B, T, H, D, false, false);
  if (y.requires_grad()) g.record([=] { permute_bthd(x.grad, y.grad, B, T, H, D, true, true); });
  return y;
}

Tensor slice_cols(Graph& g, const Tensor& x, int64_t begin, int64_t width) {
  PartScope part(Part::GatherScatter);
  const int64_t C = x.cols(), N = x.rows();
  MOE_CHECK(begin >= 0 && width > 0 && begin + width <= C, "slice_cols",
        "columns [" + std::to_string(begin) + ", " + std::to_string(begin + width) + ") outside " + x.shape.str());
  Shape os = x.shape;
  os.dims[size_t(os.ndim - 1)] = width;
  Tensor y = g.output(os, x);
  for (int64_t n = 0; n < N; ++n) std::memcpy(y.data + n * width, x.data + n * C + begin, sizeof(float) * size_t(width));
  if (y.requires_grad())
    g.record([=] {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < width; ++c) x.grad[n * C + begin + c] += y.grad[n * width + c];
    });
  return y;
}

}  // namespace moe
