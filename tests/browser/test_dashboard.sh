#!/usr/bin/env bash
# moe serve in a real browser: Debian's chromium driven by playwright-core (src/serve/web's
# node_modules). Makes a finished run, a sweep and a run that is still training (metrics lines
# appended by the test) from a tiny config, serves them on a free port of 127.0.0.1, and runs
# tests/browser/dashboard.test.js against them. The server is always stopped.
# Usage: tests/browser/test_dashboard.sh MOE_BINARY   (MOE_SCREENSHOTS=DIR also saves a PNG per page)
# Exits 77 (ctest: skipped) when moe has no serve, or chromium or node_modules are missing:
# bash scripts/setup.sh --serve installs them.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
moe=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
skip() { echo "test_dashboard: SKIPPED: $*" >&2; exit 77; }
fail() { echo "test_dashboard: FAILED: $*" >&2; exit 1; }
[ -x /usr/bin/chromium ] || skip "no /usr/bin/chromium (bash scripts/setup.sh --serve)"
command -v node > /dev/null || skip "no node (bash scripts/setup.sh --serve)"
# playwright-core needs node 20 or newer (Debian 12's own nodejs is 18).
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || skip "node $(node --version) is older than 20, which playwright-core needs"
[ -d "$root/src/serve/web/node_modules/playwright-core" ] || skip "no src/serve/web/node_modules (bash scripts/setup.sh --serve)"
[ -f "$root/src/serve/web/node_modules/uplot/dist/uPlot.iife.min.js" ] || skip "no uPlot in src/serve/web/node_modules"

work=$(mktemp -d)
server=""
cleanup() {
  local code=$?
  set +e
  if [ -n "$server" ]; then
    kill "$server" 2> /dev/null
    wait "$server" 2> /dev/null
  fi
  rm -rf "$work"
  exit $code
}
trap cleanup EXIT
"$moe" serve --runs "$work/none" --port 0 > "$work/probe.log" 2>&1 &
probe=$!
sleep 0.3
kill "$probe" 2> /dev/null || true
wait "$probe" 2> /dev/null || true
grep -q "built without cpp-httplib" "$work/probe.log" && skip "moe was built without cpp-httplib"

start=$(date +%s.%N)
cd "$root"
# Two layers (so that Inspect has a transition), 40 steps, a checkpoint.
cat > "$work/tiny.json" <<JSON
{"data": {"path": "$root/tests/fixtures/small.txt"},
 "model": {"block_size": 8, "n_embed": 16, "n_head": 2, "n_layer": 2, "dropout": 0.0},
 "router": {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.01},
 "training": {"batch_size": 4, "max_steps": 40},
 "logging": {"log_interval": 5, "eval_interval": 10, "eval_iters": 2, "checkpoint_interval": 0}}
JSON
runs=$work/runs
mkdir -p "$runs"
"$moe" train --config "$work/tiny.json" --out "$runs/finished" > "$work/train.log" 2>&1 || { cat "$work/train.log"; fail "train"; }
cat > "$work/sweep.json" <<JSON
{"base": "$work/tiny.json", "method": "grid", "parallel": 2,
 "params": {"optimizer.lr": [0.003, 0.01, 0.03]}, "overrides": {"training.max_steps": 20}}
JSON
bash scripts/py.sh scripts/sweep.py "$work/sweep.json" --out "$runs/sweeps/lr" --moe "$moe" 2> "$work/sweep.log" ||
  { cat "$work/sweep.log"; fail "sweep"; }
# A run still training: the finished run's config and its first lines; the test appends the rest.
mkdir -p "$runs/live"
cp "$runs/finished/config.json" "$runs/live/"
head -n 4 "$runs/finished/metrics.jsonl" > "$runs/live/metrics.jsonl"
tail -n +5 "$runs/finished/metrics.jsonl" > "$work/live_rest.jsonl"
# A symlink that leads out of the runs directory: the server must refuse it.
ln -s "$work" "$runs/escape"
fixtures=$(date +%s.%N)

"$moe" serve --runs "$runs" --port 0 --max-new-tokens 500 > "$work/serve.log" 2>&1 &
server=$!
url=""
for _ in $(seq 100); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*/' "$work/serve.log" || true)
  [ -n "$url" ] && break
  kill -0 "$server" 2> /dev/null || { cat "$work/serve.log"; fail "moe serve exited"; }
  sleep 0.1
done
[ -n "$url" ] || fail "moe serve printed no address"
NODE_PATH="$root/src/serve/web/node_modules" node tests/browser/dashboard.test.js "$url" "$runs" "$work/live_rest.jsonl" ||
  { echo "--- moe serve's log:"; cat "$work/serve.log"; fail "browser test"; }
kill -0 "$server" 2> /dev/null || fail "moe serve died during the test"
end=$(date +%s.%N)
awk -v a="$start" -v b="$fixtures" -v c="$end" 'BEGIN { printf "test_dashboard: fixtures %.1f s, browser test %.1f s\n", b - a, c - b }'
