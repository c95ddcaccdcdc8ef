#include "moe/testing/fault_injection.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>

namespace moe::testing {

void FaultInjection::after_tensor_write() {
  static const long kill_after = [] {
    const char* v = std::getenv("MOE_TEST_KILL_AFTER_WRITES");
    return v ? std::atol(v) : 0L;
  }();
  static std::atomic<long> writes{0};
  if (kill_after > 0 && ++writes >= kill_after) ::kill(::getpid(), SIGKILL);
}

}  // namespace moe::testing
