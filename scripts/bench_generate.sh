#!/usr/bin/env bash
# End-to-end speed and memory of `moe generate`: the whole process (start, checkpoint load,
# generation, exit) timed by /usr/bin/time -v, ROUNDS times; prints each run's wall and CPU
# seconds, characters per (wall) second and peak resident memory, then the best and the
# median. On a busy machine the CPU seconds compare better than the wall seconds. With a second
# binary, the two run in turn (A B A B ...), so that a shared machine's drift hits both, and
# must print the same text. A run with --profile then prints moe's own breakdown (load,
# checksum, per layer attention, router, experts...). With perf installed, a last run is profiled and the functions
# that took at least 1% of its samples are listed (where the time goes: the products in
# gemv/gemm, attention, the router's kernels, loading, the kernel's share).
# Usage: scripts/bench_generate.sh MOE_BINARY CHECKPOINT [CHARS=5000] [ROUNDS=3] [OTHER_MOE_BINARY]
# More `moe generate` options in GENERATE_ARGS (e.g. GENERATE_ARGS="--context-keep 32").
# A makemoe.json checkpoint for it: a copy of configs/makemoe.json with training.max_steps 300,
# `moe train --config COPY --out DIR` (the speed does not depend on how long it trained).
set -euo pipefail
bins=("$1")
ckpt=$2
chars=${3:-5000}
rounds=${4:-3}
[ $# -ge 5 ] && bins+=("$5")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A rates rss
for r in $(seq "$rounds"); do
  for i in "${!bins[@]}"; do
    b=${bins[$i]}
    /usr/bin/time -v "$b" generate --checkpoint "$ckpt" --max-new-tokens "$chars" --seed 1 ${GENERATE_ARGS:-} > "$work/out$i" 2> "$work/time"
    wall=$(grep "Elapsed (wall clock)" "$work/time" | awk '{print $NF}' | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }')
    kb=$(grep "Maximum resident set size" "$work/time" | awk '{print $NF}')
    cpu=$(grep -E "(User|System) time" "$work/time" | awk '{ s += $NF } END { print s }')
    rate=$(awk -v c="$chars" -v w="$wall" 'BEGIN { printf "%.0f", c / w }')
    printf '%-40s run %d: %6.2f s wall (%6.2f s CPU)  %6s chars/s  %6.1f MB peak RSS\n' "$b" "$r" "$wall" "$cpu" "$rate" \
      "$(awk -v k="$kb" 'BEGIN { print k / 1024 }')"
    rates[$i]+="$rate "
    rss[$i]+="$kb "
  done
  if [ ${#bins[@]} -eq 2 ] && ! cmp -s "$work/out0" "$work/out1"; then
    echo "the two binaries printed different text" >&2
    exit 1
  fi
done
for i in "${!bins[@]}"; do
  echo "${bins[$i]}: chars/s best $(echo ${rates[$i]} | tr ' ' '\n' | sort -n | tail -1)," \
    "median $(echo ${rates[$i]} | tr ' ' '\n' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }');" \
    "peak RSS median $(echo ${rss[$i]} | tr ' ' '\n' | sort -n | awk '{ a[NR] = $1 } END { printf "%.1f MB", a[int((NR + 1) / 2)] / 1024 }')"
done
echo "where the time goes (${bins[0]} generate --profile):"
"${bins[0]}" generate --checkpoint "$ckpt" --max-new-tokens "$chars" --seed 1 --profile ${GENERATE_ARGS:-} 2>&1 > /dev/null
if command -v perf > /dev/null; then
  echo "where the time goes (${bins[0]}, perf, functions with >= 1% of the samples):"
  perf record -q -o "$work/perf.data" "${bins[0]}" generate --checkpoint "$ckpt" --max-new-tokens "$chars" --seed 1 ${GENERATE_ARGS:-} \
    > /dev/null 2>&1
  perf report -i "$work/perf.data" --no-children --percent-limit 1 --stdio 2> /dev/null | grep -E '^ +[0-9]' |
    awk '{ $2 = ""; $3 = ""; print }'
fi
