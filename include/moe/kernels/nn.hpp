// Raw kernels over float*, llm.c style: outputs first, then inputs, then sizes; backward
// kernels ADD into the input gradients. N rows of C channels unless stated otherwise.
#pragma once

#include <cstdint>

namespace moe {

// out = (inp - mean) * rstd * w + b per row; mean, rstd saved (N) for the backward.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, float eps);
// dinp, dw, db may be null (skipped). Rows in parallel; dw/db reduced over rows per channel.
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C);

// Row softmax over C columns; with `causal`, rows are grouped in blocks of C (T x T score
// matrices) and row t keeps columns 0..t, the rest exactly 0.
void softmax_forward(float* out, const float* inp, int64_t N, int64_t C, bool causal);
// dinp += out ⊙ (dout - Σ dout ⊙ out) per row.
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);

// Per row: loss[n] = logsumexp(logits[n]) - logits[n][target[n]]; probs saved for backward.
void cross_entropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets,
                           int64_t N, int64_t V);
// dlogits += (probs - onehot(target)) * dloss_mean / N.
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets, float dloss,
                            int64_t N, int64_t V);

// db[c] += Σ_n dout[n][c], channels split between threads, rows summed in order.
void bias_backward(float* db, const float* dout, int64_t N, int64_t C);

}  // namespace moe
