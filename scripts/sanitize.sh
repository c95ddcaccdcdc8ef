#!/usr/bin/env bash
# Builds moe, its library and the test suite with AddressSanitizer + UndefinedBehaviorSanitizer
# (g++, -DMOE_SANITIZE=ON, -O1) into build-san/ and runs the whole ctest suite, including the
# CLI test that trains, samples and evaluates a tiny model with the binary. Any sanitizer
# report aborts the process that made it, so the test fails and this script exits non-zero.
# Usage: scripts/sanitize.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
build="$root/build-san"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=g++ -DMOE_SANITIZE=ON -DMOE_MPI=OFF > /dev/null
cmake --build "$build" -j "$(nproc)" > "$build/build.log" 2>&1 || { tail -n 60 "$build/build.log"; exit 1; }
# halt_on_error / -fno-sanitize-recover: the first report aborts the process. ASan/LSan reports
# also go to files under build-san/sanitizer-reports/, because a CLI call the tests expect to
# fail (bad prompt, missing file) would pass on a sanitizer abort too; those tests also check
# the error text, which an abort would not print. (GCC's libubsan ignores log_path when it
# aborts, so UBSan reports go to stderr only.)
# detect_leaks: LeakSanitizer checks every process at exit (libgomp's thread pool is not reported).
reports="$build/sanitizer-reports"
rm -rf "$reports" && mkdir -p "$reports"
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1:log_path=$reports/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}
status=0
(cd "$build" && ctest --output-on-failure -j "$(nproc)") || status=$?
if compgen -G "$reports/*" > /dev/null; then
  echo "sanitize: sanitizer reports:" >&2
  cat "$reports"/* >&2
  exit 1
fi
exit $status
