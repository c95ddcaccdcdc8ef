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

// RMSNorm: out = inp * rstd * w per row, rstd = 1 / sqrt(mean(inp²) + eps) saved (N) for the
// backward; no bias. Row n of inp and out starts at (n / G) * ld + (n % G) * C: G rows of C side
// by side in each line of ld floats (ld = 0: rows of their own, one after the other; the q or k
// heads of a fused projection: G heads of C = head size in lines of ld = the projection's width).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N, int64_t C, float eps,
                     int64_t G = 1, int64_t ld = 0);
// dinp += rstd·(dy·w - xhat·mean(dy·w·xhat)), xhat = inp·rstd; dw[c] += Σ_n dy·xhat. dinp or dw
// may be null (skipped). Rows in parallel for dinp; columns in parallel for dw, rows summed in order.
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd,
                      int64_t N, int64_t C, int64_t G = 1, int64_t ld = 0);

// Rotary position embedding, rotate-half pairing (GPT-NeoX, Hugging Face Llama): channel i of a
// head of D pairs with channel i + D/2, both turned by the angle pos·theta^(-2i/D):
//   x'[i] = x[i]·cos - x[i + D/2]·sin,  x'[i + D/2] = x[i + D/2]·cos + x[i]·sin.
// cos, sin [n, D/2] for positions first, first + 1, ...; angles in double, rounded to float.
void rope_tables(float* cos, float* sin, int64_t first, int64_t n, int64_t D, double theta);
// out = the rotation of inp for `heads` heads of D side by side (one row of a fused projection:
// the q heads then the k heads), by cos, sin [D/2] of the row's position; out may be inp.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t heads, int64_t D);
// dinp += the inverse rotation of dout (the rotation is orthogonal: its transpose).
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t heads, int64_t D);

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
