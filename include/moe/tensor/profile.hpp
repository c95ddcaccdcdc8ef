// The step profiler: where a training step's time goes, by part (GEMM, attention, routing...).
//
// Each op opens a PartScope naming its part; Graph::record tags the op's backward closure
// with the part open when it is recorded, and the backward pass opens that part around the
// closure. Times are exclusive (a scope nested in another charges its time to itself only), so
// the parts add up to the time between profile_start() and profile_stop(): what no scope covers
// is Part::Other (graph bookkeeping, data sampling, statistics).
// Off (the default), a PartScope costs two stores: it only keeps the current tag for record().
// The profiler is for one thread (ops are called from outside parallel regions).
#pragma once

#include <cstdint>

namespace moe {

enum class Part : uint8_t {
  Other,          // nothing tagged: graph bookkeeping, data, statistics
  GemmDense,      // linear layers (qkv, projection, head, dense feed-forward), bmm
  GemmExpert,     // the experts' grouped matrix products
  Attention,      // the fused causal attention, q/k norms, rotary embeddings
  Routing,        // router logits' noise, top-k, gates, balancing losses
  GatherScatter,  // embedding, rows to and from the experts, head layout
  Softmax,
  Norm,           // layernorm, rmsnorm
  Elementwise,    // activations, dropout, sums, scaling
  Loss,           // cross-entropy
  Optimizer,      // AdamW (and the gradient norm)
  Zeroing,        // clearing gradient memory
  Count
};
enum class Phase : uint8_t { Forward, Backward, Count };

const char* part_name(Part p);

namespace detail {
extern bool g_profiling;
extern Part g_part;
void profile_switch(Part from);  // charges the time since the last switch to `from`
}  // namespace detail

inline bool profiling() { return detail::g_profiling; }
inline Part current_part() { return detail::g_part; }

// Opens part p until the end of the scope.
class PartScope {
 public:
  explicit PartScope(Part p) : prev_(detail::g_part) {
    if (detail::g_profiling) detail::profile_switch(prev_);
    detail::g_part = p;
  }
  ~PartScope() {
    if (detail::g_profiling) detail::profile_switch(detail::g_part);
    detail::g_part = prev_;
  }
  PartScope(const PartScope&) = delete;
  PartScope& operator=(const PartScope&) = delete;

 private:
  Part prev_;
};

// The phase time is charged to until the end of the scope (Graph::backward_from opens Backward).
class PhaseScope {
 public:
  explicit PhaseScope(Phase p);
  ~PhaseScope();
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  Phase prev_;
};

// Accumulated milliseconds by phase and part.
struct StepProfile {
  double ms[int(Phase::Count)][int(Part::Count)] = {};
  double part_ms(Part p) const { return ms[0][int(p)] + ms[1][int(p)]; }
  double total_ms() const;
};

// Starts accumulating (from zero), stops, continues after a stop (adding to what is there),
// and reads what has accumulated.
void profile_start();
void profile_stop();
void profile_continue();
const StepProfile& profile_result();

}  // namespace moe
