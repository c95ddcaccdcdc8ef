#!/usr/bin/env bash
# 1 -> 2 processes on one machine: `moe train` steps of a config with one thread per process,
# as one process, as 2 data-parallel ranks and as 2 expert-parallel ranks, plus one process
# with 2 OpenMP threads for comparison. Prints the median step time, the tokens per second of
# the global batch, the speed-up over one process and the time rank 0 waits for the gradient
# sums after its backward pass (with and without overlapping them with the backward pass).
#   bash scripts/bench_mpi.sh [CONFIG] [STEPS]      (default configs/makemoe.json, 30 steps)
# Needs moe built with MPI (bash scripts/setup.sh --mpi; bash scripts/build.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-$root/configs/makemoe.json}
steps=${2:-30}
moe=${MOE_BINARY:-$root/build/moe}
work=$(mktemp -d /tmp/moe_bench_mpi.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # containers run as root

batch=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["training"]["batch_size"])' "$config")
block=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"]["block_size"])' "$config")
[ "$batch" -ge 2 ] && [ $((batch % 2)) -eq 0 ] || { echo "bench_mpi: the config's batch_size must be even" >&2; exit 2; }

# The config with `steps` steps, batch b per process, threads t, one 1-batch evaluation at
# each end and no checkpoints but the last.
derive() {  # derive OUT BATCH THREADS
  python3 - "$config" "$1" "$2" "$3" "$steps" "$root" <<'EOF'
import json, os, sys
src, out, batch, threads, steps, root = sys.argv[1:]
c = json.load(open(src))
path = c["data"]["path"]
if not os.path.isabs(path):
    c["data"]["path"] = os.path.join(root, path)
c["training"].update(batch_size=int(batch), threads=int(threads), max_steps=int(steps))
c["logging"].update(eval_interval=100000, eval_iters=1, checkpoint_interval=0, log_interval=int(steps))
json.dump(c, open(out, "w"))
EOF
}

# run NAME RANKS BATCH_PER_RANK THREADS [FLAGS [OVERLAP]]: prints one table row. OVERLAP 0
# sums the gradients after the backward pass instead of during it.
run() {
  local name=$1 ranks=$2 b=$3 threads=$4 flags=${5:-} overlap=${6:-1}
  derive "$work/$name.json" "$b" "$threads"
  local cmd=("$moe" train --config "$work/$name.json" --out "$work/$name" --overwrite $flags)
  if [ "$ranks" -gt 1 ]; then
    cmd=(mpirun -np "$ranks" --oversubscribe --bind-to none -x OMP_NUM_THREADS="$threads"
         -x MOE_OVERLAP_ALLREDUCE="$overlap" "${cmd[@]}")
  fi
  OMP_NUM_THREADS=$threads "${cmd[@]}" > "$work/$name.log" 2>&1 || { cat "$work/$name.log" >&2; exit 1; }
  local ms reduce
  ms=$(sed -n 's/.*median step \([0-9.]*\) ms.*/\1/p' "$work/$name.log" | tail -1)
  reduce=$(sed -n 's/.*all-reduce \([0-9.]*\) ms per step.*/\1/p' "$work/$name.log" | tail -1)
  python3 - "$name" "$ranks" "$b" "$threads" "$ms" "${reduce:--}" "$block" "$work/base" <<'EOF'
import os, sys
name, ranks, b, threads, ms, reduce, block, base = sys.argv[1:]
tok = int(ranks) * int(b) * int(block) / (float(ms) / 1000)
if not os.path.exists(base):
    open(base, "w").write(str(tok))
speedup = tok / float(open(base).read())
print(f"| {name} | {ranks} x {threads} | {int(ranks) * int(b)} | {float(ms):.1f} | {tok:,.0f} | {speedup:.2f}x | {reduce} |")
EOF
}

echo "config $(basename "$config"), $steps steps, moe $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "| run | processes x threads | global batch | median step ms | tokens/s | vs 1 process | all-reduce wait ms/step |"
echo "|---|---|---|---|---|---|---|"
half=$((batch / 2))
run one_process 1 "$batch" 1
run data_parallel 2 "$half" 1
run data_parallel_no_overlap 2 "$half" 1 "" 0
run expert_parallel 2 "$half" 1 --expert-parallel
run data_parallel_2x_batch 2 "$batch" 1
run openmp_2_threads 1 "$batch" 2
