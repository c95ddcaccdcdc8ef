#!/usr/bin/env bash
# How close 2 data-parallel processes with batch B come to 1 process with batch 2B: trains a
# small model (2 layers, n_embed 64, 4 experts with top-2, dropout 0.1, noisy router, aux loss
# 0.01) both ways, one thread per process, and prints the largest loss difference per 5 steps.
#   bash scripts/mpi_equivalence.sh [BIAS_UPDATE_RATE] [STEPS] [BATCH]   (default 0.01, 30, 4)
# Needs moe built with MPI (bash scripts/setup.sh --mpi; bash scripts/build.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bias=${1:-0.01}
steps=${2:-30}
batch=${3:-4}
moe=${MOE_BINARY:-$root/build/moe}
work=$(mktemp -d /tmp/moe_mpi_equivalence.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # containers run as root

config() {  # config BATCH: the run's config on stdout
  cat <<EOF
{"data": {"path": "$root/data/tinyshakespeare.txt"},
 "model": {"block_size": 32, "n_embed": 64, "n_head": 4, "n_layer": 2, "dropout": 0.1},
 "router": {"num_experts": 4, "top_k": 2, "noisy": true, "aux_loss_coef": 0.01, "bias_update_rate": $bias},
 "optimizer": {"lr": 3e-3},
 "training": {"batch_size": $1, "max_steps": $steps, "seed": 1337, "threads": 1},
 "logging": {"log_interval": 1, "eval_interval": 100000, "eval_iters": 1, "checkpoint_interval": 0}}
EOF
}
config $((2 * batch)) > "$work/one.json"
config "$batch" > "$work/two.json"
OMP_NUM_THREADS=1 "$moe" train --config "$work/one.json" --out "$work/one" > "$work/one.log" 2>&1 ||
  { cat "$work/one.log" >&2; exit 1; }
mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 \
  "$moe" train --config "$work/two.json" --out "$work/two" > "$work/two.log" 2>&1 ||
  { cat "$work/two.log" >&2; exit 1; }

python3 - "$work/one/metrics.jsonl" "$work/two/metrics.jsonl" "$bias" "$batch" <<'EOF'
import json, sys
def losses(path):
    return {j["step"]: j["loss"] for j in map(json.loads, open(path)) if "loss" in j}
one, two = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(one) & set(two))
diff = {s: abs(one[s] - two[s]) for s in steps}
first = next((s for s in steps if diff[s] != 0), None)
print(f"bias_update_rate {sys.argv[3]}: 1 process x batch {2 * int(sys.argv[4])} against "
      f"2 processes x batch {sys.argv[4]}, {len(steps)} steps; first step whose loss differs: {first}")
for lo in range(steps[0], steps[-1] + 1, 5):
    part = [s for s in steps if lo <= s < lo + 5]
    print(f"  steps {part[0]:>3}-{part[-1]:>3}: max |loss difference| {max(diff[s] for s in part):.1e}")
EOF
