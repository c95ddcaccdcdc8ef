#include "moe/tensor/profile.hpp"

#include <chrono>

namespace moe {

namespace {
using Clock = std::chrono::steady_clock;
StepProfile g_profile;
Clock::time_point g_last;
Phase g_phase = Phase::Forward;
}  // namespace

namespace detail {
bool g_profiling = false;
Part g_part = Part::Other;

void profile_switch(Part from) {
  const Clock::time_point now = Clock::now();
  g_profile.ms[int(g_phase)][int(from)] += std::chrono::duration<double, std::milli>(now - g_last).count();
  g_last = now;
}
}  // namespace detail

const char* part_name(Part p) {
  switch (p) {
    case Part::Other: return "other";
    case Part::GemmDense: return "gemm_dense";
    case Part::GemmExpert: return "gemm_expert";
    case Part::Attention: return "attention";
    case Part::Routing: return "routing";
    case Part::GatherScatter: return "gather_scatter";
    case Part::Softmax: return "softmax";
    case Part::Norm: return "norm";
    case Part::Elementwise: return "elementwise";
    case Part::Loss: return "loss";
    case Part::Optimizer: return "optimizer";
    case Part::Zeroing: return "zeroing";
    case Part::Count: break;
  }
  return "?";
}

PhaseScope::PhaseScope(Phase p) : prev_(g_phase) {
  if (detail::g_profiling) detail::profile_switch(detail::g_part);
  g_phase = p;
}

PhaseScope::~PhaseScope() {
  if (detail::g_profiling) detail::profile_switch(detail::g_part);
  g_phase = prev_;
}

double StepProfile::total_ms() const {
  double s = 0;
  for (int p = 0; p < int(Part::Count); ++p) s += part_ms(Part(p));
  return s;
}

void profile_start() {
  g_profile = StepProfile{};
  g_phase = Phase::Forward;
  detail::g_part = Part::Other;
  profile_continue();
}

void profile_continue() {
  g_last = Clock::now();
  detail::g_profiling = true;
}

void profile_stop() {
  if (detail::g_profiling) detail::profile_switch(detail::g_part);
  detail::g_profiling = false;
}

const StepProfile& profile_result() { return g_profile; }

}  // namespace moe
