#!/usr/bin/env bash
# Does watching a run in the dashboard slow it down? Trains configs/makemoe.json for STEPS
# steps (eval_iters 20, a log line every 10 steps) ROUNDS times without and with `moe serve`
# plus a headless chromium showing the run's live page (which polls metrics.jsonl every
# second), alternating, and prints the median step time of each run side by side, and the CPU
# seconds that moe serve and the browser used meanwhile. The browser opens the page before the
# watched run starts (so its own start-up is not counted).
# Usage: scripts/bench_dashboard.sh MOE_BINARY [STEPS=200] [ROUNDS=2]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
moe=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
steps=${2:-200}
rounds=${3:-2}
work=$(mktemp -d)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null; wait "$p" 2> /dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$root"
/usr/bin/python3 - "$steps" "$work/cfg.json" <<'PY'
import json, sys
c = json.load(open("configs/makemoe.json"))
c["training"]["max_steps"] = int(sys.argv[1])
c["logging"].update(eval_iters=20, log_interval=10, eval_interval=100000, checkpoint_interval=0)
json.dump(c, open(sys.argv[2], "w"))
PY
median() { grep -o "median step [0-9.]* ms" "$1" | grep -o "[0-9.]*"; }
# CPU seconds of a process (all its threads) and every process under it (chromium: browser, renderer, GPU, network).
cpu() {
  local p total=0
  for p in $(pstree -pT "$1" | grep -o '([0-9]*)' | tr -d '()'); do
    total=$(awk -v t="$total" '{ print t + ($14 + $15) / 100 }' "/proc/$p/stat" 2> /dev/null || echo "$total")
  done
  echo "$total"
}
printf "%-6s %-22s %-22s %-20s %-20s\n" round "alone: step ms" "watched: step ms" "serve CPU s" "browser CPU s"
for r in $(seq "$rounds"); do
  "$moe" train --config "$work/cfg.json" --out "$work/runs/alone_$r" > "$work/alone_$r.log" 2>&1
  mkdir -p "$work/runs/watched_$r"
  cp "$work/cfg.json" "$work/runs/watched_$r/config.json"  # the page opens on it before training
  "$moe" serve --runs "$work/runs" --port 0 > "$work/serve_$r.log" 2>&1 &
  serve=$!
  pids+=($serve)
  until grep -q "http://" "$work/serve_$r.log"; do sleep 0.1; done
  url=$(grep -o 'http://127.0.0.1:[0-9]*/' "$work/serve_$r.log")
  NODE_PATH="$root/src/serve/web/node_modules" node tests/browser/open_page.js "$url" "#/run?path=watched_$r" \
    --stay 0 --ready "$work/ready_$r" &
  browser=$!
  pids+=($browser)
  until [ -e "$work/ready_$r" ]; do sleep 0.2; done
  serve0=$(cpu $serve)
  browser0=$(cpu $browser)
  "$moe" train --config "$work/cfg.json" --out "$work/runs/watched_$r" > "$work/watched_$r.log" 2>&1 &
  train=$!
  pids+=($train)
  wait $train
  serve_cpu=$(awk -v a="$(cpu $serve)" -v b="$serve0" 'BEGIN { print a - b }')
  browser_cpu=$(awk -v a="$(cpu $browser)" -v b="$browser0" 'BEGIN { print a - b }')
  kill "${pids[@]}" 2> /dev/null || true
  wait "${pids[@]}" 2> /dev/null || true
  pids=()
  printf "%-6s %-22s %-22s %-20s %-20s\n" "$r" "$(median "$work/alone_$r.log")" "$(median "$work/watched_$r.log")" \
    "$serve_cpu" "$browser_cpu"
done
