// Runs the moe binary through the shell and captures its exit code and output.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace moe_test {

struct Run {
  int code;         // the exit status; 128 + signal when a signal ended it; -1 if unknown
  std::string out;  // stdout and stderr together
};

// Runs `cmd` with /bin/sh, stderr merged into stdout.
inline Run run_shell(const std::string& cmd) {
  Run r{-1, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  return r;
}

// The moe binary with `args`; `prefix` is shell text run before it (for example "ulimit -f 64;").
inline Run run_moe(const std::string& args, const std::string& prefix = "") {
  return run_shell(prefix + " " + std::string(MOE_BINARY) + " " + args);
}

}  // namespace moe_test
