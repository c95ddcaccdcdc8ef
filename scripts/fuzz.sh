#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/) with clang into build-fuzz/ and runs each for
# SECONDS (default 20), one after another, starting from the seed corpus in
# tests/fuzz/corpus/<target>/. Exits non-zero on the first crash, sanitizer report, leak,
# timeout or out-of-memory; the reproducer is left in build-fuzz/findings/<target>/.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: config checkpoint tokenizer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-20}
# libFuzzer reads -max_total_time=0 as "forever".
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: SECONDS must be a positive integer, got '$secs'" >&2; exit 2; }
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config checkpoint tokenizer)
MOE_EXTRA_PKGS="clang libclang-rt-dev" bash "$root/scripts/setup.sh"
build="$root/build-fuzz"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
  -DMOE_FUZZ=ON -DMOE_BUILD_TESTS=OFF > /dev/null
cmake --build "$build" -j "$(nproc)" --target "${targets[@]/#/fuzz_}" > "$build/build.log" 2>&1 || { tail -n 60 "$build/build.log"; exit 1; }
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for t in "${targets[@]}"; do
  # The seeds stay untouched: new inputs go to a scratch corpus under build-fuzz/.
  corpus="$build/corpus/$t"
  findings="$build/findings/$t"
  mkdir -p "$corpus" "$findings"
  echo "fuzz: $t for ${secs}s"
  # -rss_limit_mb/-malloc_limit_mb: a reader that allocates what an input's header claims is a finding.
  if ! "$build/fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -max_len=65536 -print_final_stats=1 -artifact_prefix="$findings/" \
      "$corpus" "$root/tests/fuzz/corpus/$t" > "$build/fuzz_$t.log" 2>&1; then
    tail -n 60 "$build/fuzz_$t.log"
    echo "fuzz: $t FAILED; reproducer(s) in $findings/ (run: $build/fuzz_$t FILE)" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$build/fuzz_$t.log" | tr '\n' ' '
  echo
done
echo "fuzz: all targets ran ${secs}s without a finding"
