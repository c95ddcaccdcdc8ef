// The one seam through which tests make moe fail on purpose. It is compiled into every build,
// because the tests inject faults into the moe binary itself, and it stays inert unless its
// environment variable is set: production code only calls it at the points named below, and
// nothing else in moe reads these variables.
//
//   MOE_TEST_KILL_AFTER_WRITES=N   the process kills itself with SIGKILL (as kill -9 would)
//                                  after its N-th tensor write, in the middle of a checkpoint
//                                  save (tests/test_cli_errors.cpp: "kill -9 at any moment").
#pragma once

namespace moe::testing {

struct FaultInjection {
  // save_safetensors calls this after writing each tensor's bytes.
  static void after_tensor_write();
};

}  // namespace moe::testing
