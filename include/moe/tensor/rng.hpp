// Rng: a counter-based generator (Philox4x32-10).
//
// Number i of a stream is a pure function of (seed, stream, counter + i), so a parallel fill
// gives the same numbers for any thread count, and the whole state is two integers that a
// checkpoint saves and restores. Separate streams (init, router noise, dropout, data) are
// independent and do not shift one another.
#pragma once

#include <cstdint>

namespace moe {

namespace detail {
struct UniformSink;  // where a uniform fill puts its numbers: floats or a keep-mask (rng.cpp)
}  // namespace detail

struct RngState {
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint64_t counter = 0;
};

class Rng {
 public:
  Rng() = default;
  explicit Rng(uint64_t seed, uint64_t stream = 0) : s_{seed, stream, 0} {}
  explicit Rng(const RngState& s) : s_(s) {}

  // Four 32-bit words from one Philox block.
  static void philox(uint64_t key, uint64_t ctr_hi, uint64_t ctr_lo, uint32_t out[4]);

  uint32_t next_u32();
  uint64_t next_u64();
  float uniform();                       // [0, 1)
  float normal();                        // N(0, 1)
  uint64_t below(uint64_t n);            // uniform integer in [0, n), n > 0
  // out[i] uses counter + i; the counter advances by n. Parallel over i. (With a shard set,
  // see below, the first number and the advance come from it instead.)
  void fill_uniform(float* out, int64_t n, float lo = 0.f, float hi = 1.f);  // lo + (hi - lo)·u, one fma
  void fill_normal(float* out, int64_t n, float mean = 0.f, float stddev = 1.f);
  // keep[i] = 1 when the uniform fill_uniform(out, n) would give as out[i] is at least p, else
  // 0 (a dropout mask), without storing the uniforms.
  void fill_keep_mask(uint8_t* keep, int64_t n, float p);
  // The same mask over `mats` T x T matrices (n = mats·T·T), but only where a causal mask lets
  // a weight through, column s <= row t: each matrix's lower triangle, row after row, in
  // T(T+1)/2 bytes (row t from byte t(t+1)/2). The bytes are those fill_keep_mask gives there
  // and the counter advances as much; the numbers above the diagonal are not computed.
  void fill_keep_mask_causal(uint8_t* keep, int64_t mats, int64_t T, float p);

  // Data parallelism: every fill of n numbers is this process's part `index` of a fill of
  // count·n numbers that `count` processes share (numbers counter + index·n + i, and the
  // counter advances by count·n on every process). A fill over a batch-major tensor thus
  // draws exactly what one process with the whole batch would draw for these rows.
  void set_shard(uint64_t index, uint64_t count);
  // Numbers offset, offset + 1, ... of the next `total` this stream draws, as a generator of
  // their own (no shard, no segments); this one moves past all `total`. For row blocks whose
  // size differs between processes, like the tokens routed to an expert: each process takes
  // its rows' window of the numbers one process with the whole batch would draw.
  Rng take_window(uint64_t offset, uint64_t total);
  // Batched forwards: until reset by set_segments(1, 0), every fill of n numbers is `count`
  // fills of n / count numbers, the j-th from counter + j·stride, and the counter advances by
  // n / count. Forwards of `count` batches made one thus draw what each would have drawn
  // alone, when the batches' draws start `stride` numbers apart. Throws if count does not
  // divide n.
  void set_segments(uint64_t count, uint64_t stride);
  // Advances the counter past n numbers that another process draws.
  void skip(uint64_t n) { s_.counter += n; }

  const RngState& state() const { return s_; }
  void set_state(const RngState& s) { s_ = s; }

 private:
  uint64_t take_fill(int64_t n);  // the first counter of a fill; advances the state
  RngState s_;
  uint64_t shard_index_ = 0, shard_count_ = 1;  // not saved: set by whoever runs the processes
  uint64_t segments_ = 1, segment_stride_ = 0;
  template <class FillAt>
  void fill_segments(int64_t n, FillAt fill_at);  // fill_at(offset in the fill, count, first counter)
  void fill_uniforms(const detail::UniformSink& sink, int64_t n);  // fill_uniform and fill_keep_mask
};

// Whether uniform fills compute sixteen Philox blocks at a time with AVX-512 (else eight with
// AVX2, in an x86-64-v3 build): by default, when the CPU has AVX-512 F, VL, BW and DQ. The
// numbers are the same either way; tests switch it to check that. set_rng_avx512(true)
// throws on a CPU (or build) without it.
bool rng_avx512();
void set_rng_avx512(bool on);

}  // namespace moe
