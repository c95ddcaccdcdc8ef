#!/usr/bin/env bash
# The sweep and plot scripts end to end on a tiny config: grid search with an impossible
# pair, resume without re-running, random and Bayesian search with the pruner, and the plots.
# Usage: tests/scripts/test_scripts.sh MOE_BINARY
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
moe=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
py() { bash scripts/py.sh "$@"; }
fail() { echo "test_scripts: FAILED: $*" >&2; exit 1; }

cat > "$work/grid.json" <<JSON
{"base": "tests/fixtures/tiny_sweep.json", "method": "grid", "parallel": 2,
 "params": {"router.num_experts": [1, 2], "router.top_k": [1, 2]},
 "overrides": {"training.max_steps": 20}}
JSON
py scripts/sweep.py "$work/grid.json" --out "$work/grid" --moe "$moe" 2> "$work/grid.log" || { cat "$work/grid.log"; fail "grid sweep"; }
py - "$work/grid/results.json" <<'PY' || fail "grid results"
import json, sys
r = json.load(open(sys.argv[1]))["trials"]
status = sorted((t["router.num_experts"], t["router.top_k"], t["status"]) for t in r)
assert status == [(1, 1, "done"), (1, 2, "invalid"), (2, 1, "done"), (2, 2, "done")], status
for t in r:
    if t["status"] == "done":
        assert t["final_val_loss"] > 0 and t["best_val_loss"] <= t["final_val_loss"], t
        assert t["tokens_per_s"] > 0 and t["wall_s"] > 0 and t["parameters"] >= t["active_parameters"] > 0, t
PY
grep -q "router.num_experts,router.top_k,final_val_loss" "$work/grid/results.csv" || fail "results.csv header"

# Resume: nothing left to run, nothing re-run.
py scripts/sweep.py "$work/grid.json" --out "$work/grid" --moe "$moe" 2> "$work/resume.log"
grep -q "resuming: 4 trial(s) finished, 0 to run" "$work/resume.log" || { cat "$work/resume.log"; fail "resume"; }
[ "$(ls -d "$work"/grid/trial_* | wc -l)" -eq 4 ] || fail "resume ran new trials"

# Interrupt: SIGTERM (or Ctrl-C) stops the sweep (exit 130), the running trials are recorded
# as interrupted, and running again finishes them. (A background job of a script ignores
# SIGINT, so the test sends SIGTERM.)
sed 's/"training.max_steps": 20/"training.max_steps": 5000/' "$work/grid.json" > "$work/long.json"
bash scripts/py.sh scripts/sweep.py "$work/long.json" --out "$work/int" --moe "$moe" 2> "$work/int.log" &
pid=$!
for _ in $(seq 600); do [ -s "$work/int/trial_000/metrics.jsonl" ] && break; sleep 0.2; done
[ -s "$work/int/trial_000/metrics.jsonl" ] || fail "the long sweep did not start a trial within 2 minutes"
kill -TERM $pid
code=0; wait $pid || code=$?
[ $code -eq 130 ] || { cat "$work/int.log"; fail "interrupted sweep exit code $code"; }
grep -q ",interrupted," "$work/int/results.csv" || { cat "$work/int/results.csv"; fail "no interrupted trial"; }
py scripts/sweep.py "$work/grid.json" --out "$work/int" --moe "$moe" 2> "$work/int2.log" || { cat "$work/int2.log"; fail "resume after interrupt"; }
[ "$(grep -c ',done,' "$work/int/results.csv")" -eq 3 ] || { cat "$work/int/results.csv"; fail "resume finished 3 trials"; }

cat > "$work/bayes.json" <<JSON
{"base": "tests/fixtures/tiny_sweep.json", "method": "bayes", "trials": 4, "parallel": 1, "seed": 3,
 "startup_trials": 2, "enqueue": [{"optimizer.lr": 0.005, "model.dropout": 0.125}],
 "params": {"optimizer.lr": {"low": 1e-4, "high": 3e-2, "log": true}, "model.dropout": {"low": 0.0, "high": 0.3}},
 "overrides": {"training.max_steps": 30},
 "pruner": {"startup_trials": 1, "warmup_steps": 0}}
JSON
py scripts/sweep.py "$work/bayes.json" --out "$work/bayes" --moe "$moe" 2> "$work/bayes.log" || { cat "$work/bayes.log"; fail "bayes sweep"; }
py - "$work/bayes/results.json" <<'PY' || fail "bayes results"
import json, sys
r = json.load(open(sys.argv[1]))["trials"]
assert len(r) == 4, r
assert all(t["status"] in ("done", "pruned") for t in r), r
assert all(1e-4 <= t["optimizer.lr"] <= 3e-2 for t in r), r
t0 = [t for t in r if t["trial"] == 0][0]
assert t0["optimizer.lr"] == 0.005 and t0["model.dropout"] == 0.125, t0  # the enqueued point runs first
PY

cat > "$work/random.json" <<JSON
{"base": "tests/fixtures/tiny_sweep.json", "method": "random", "trials": 2, "seed": 1,
 "params": {"router.num_experts": [2, 4], "optimizer.lr": {"low": 1e-3, "high": 1e-2}},
 "overrides": {"training.max_steps": 10}}
JSON
py scripts/sweep.py "$work/random.json" --out "$work/random" --moe "$moe" 2> "$work/random.log" || { cat "$work/random.log"; fail "random sweep"; }
[ "$(grep -c ',done,' "$work/random/results.csv")" -eq 2 ] || fail "random: 2 trials done"

# Equal wall time, whole-split scoring, bundles and derived fields.
cat > "$work/budget.json" <<JSON
{"base": "tests/fixtures/tiny_sweep.json", "method": "random", "trials": 2, "seed": 2,
 "params": {"model.n_embed": [16, 32], "@balance": ["bias", "aux"], "@ratio": [0.1]},
 "bundles": {"@balance": {"bias": {"router.bias_update_rate": 0.01}, "aux": {"router.aux_loss_coef": 0.02}}},
 "derived": {"model.n_head": "p['model.n_embed'] // 8", "optimizer.min_lr": "0.01 * p['@ratio']"},
 "budget": {"seconds": 2, "calibrate_steps": 5}, "objective": "eval",
 "overrides": {"optimizer.schedule": "cosine", "optimizer.lr": 0.01}}
JSON
py scripts/sweep.py "$work/budget.json" --out "$work/budget" --moe "$moe" 2> "$work/budget.log" || { cat "$work/budget.log"; fail "budget sweep"; }
py - "$work/budget/results.json" <<'PY' || { cat "$work/budget.log"; fail "budget results"; }
import json, os, sys
r = json.load(open(sys.argv[1]))["trials"]
assert len(r) == 2 and all(t["status"] == "done" for t in r), r
for t in r:
    cfg = json.load(open(os.path.join(t["dir"], "trial_config.json")))
    assert cfg["model"]["n_head"] == t["model.n_embed"] // 8, cfg
    assert abs(cfg["optimizer"]["min_lr"] - 0.001) < 1e-12, cfg
    if t["@balance"] == "bias":
        assert cfg["router"]["bias_update_rate"] == 0.01 and "@balance" not in cfg["router"], cfg
    else:
        assert cfg["router"]["aux_loss_coef"] == 0.02, cfg
    # max_steps fills the budget at the calibrated step time; the score is the whole-split eval.
    assert t["step_ms"] > 0 and cfg["training"]["max_steps"] == max(1, int(2000 / t["step_ms"])), (t, cfg)
    assert cfg["training"]["time_limit"] == 2.5, cfg
    assert t["eval_loss"] > 0 and t["eval_loss"] != t["final_val_loss"], t
PY
sed 's/"aux": {"router.aux_loss_coef": 0.02}/"other": {}/' "$work/budget.json" > "$work/badbundle.json"
if py scripts/sweep.py "$work/badbundle.json" --out "$work/badbundle" --moe "$moe" 2> "$work/badbundle.log"; then
  fail "a bundle without a value was accepted"; fi
grep -q "bundle @balance: no fields for value(s) \['aux'\]" "$work/badbundle.log" || { cat "$work/badbundle.log"; fail "bundle message"; }

# Quality runs: a seeded run scored over the whole split, its table row and the tokens-vs-loss plot.
py scripts/quality.py run tests/fixtures/tiny_sweep.json --seed 7 --out "$work/q" --moe "$moe" > "$work/q.log" 2>&1 ||
  { cat "$work/q.log"; fail "quality run"; }
py - "$work/q/quality.json" "$work/q/config.json" <<'PY' || fail "quality.json"
import json, sys
q, cfg = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert q["seed"] == 7 and cfg["training"]["seed"] == 7, q
assert q["steps"] == cfg["training"]["max_steps"], q
assert q["tokens"] == q["steps"] * cfg["training"]["batch_size"] * cfg["model"]["block_size"], q
assert q["eval_last"] > 0 and q["eval_best"] > 0 and q["wall_s"] > 0, q
PY
py scripts/quality.py table "$work/q" | grep -q "| tests/fixtures/tiny_sweep.json | 7 |" || fail "quality table"
py scripts/quality.py plot tiny="$work/q" --out "$work/q/tokens.png" 2> /dev/null || fail "quality plot"
py scripts/quality.py plot tiny="$work/q" --train --out "$work/q/gap.png" 2> /dev/null && [ -s "$work/q/gap.png" ] || fail "quality plot --train"
[ "$(head -c 4 "$work/q/tokens.png" | tail -c 3)" = "PNG" ] || fail "quality plot is not a PNG"
# A run's curve file stands in for its directory: the same table row and a plot from it alone.
py scripts/quality.py curve "$work/q" --out "$work/q_curve.json" 2> /dev/null || fail "quality curve"
[ "$(py scripts/quality.py table "$work/q_curve.json")" = "$(py scripts/quality.py table "$work/q")" ] ||
  fail "quality table of a curve file"
py scripts/quality.py plot tiny="$work/q_curve.json" --train --out "$work/q/curve.png" 2> /dev/null &&
  [ -s "$work/q/curve.png" ] || fail "quality plot of a curve file"

py scripts/plot_run.py "$work/grid/trial_003" > /dev/null || fail "plot_run"
py scripts/plot_sweep.py "$work/grid" > /dev/null || fail "plot_sweep"
for f in grid/trial_003/plots/loss.png grid/trial_003/plots/lr.png grid/trial_003/plots/experts.png \
         grid/plots/heatmap.png grid/plots/history.png grid/plots/vs_router_num_experts.png grid/plots/vs_router_top_k.png; do
  [ "$(head -c 4 "$work/$f" | tail -c 3)" = "PNG" ] || fail "$f is not a PNG"
done

# The scaling study: a row per point (the block_size axis keeps the tokens per step), a table and a plot per axis.
py scripts/scaling.py --base tests/fixtures/tiny_sweep.json --quick --threads 1 --gemm-peak 10 --axes block_size experts \
  --profile --moe "$moe" --out "$work/scal" 2> "$work/scal.log" || { cat "$work/scal.log"; fail "scaling"; }
py - "$work/scal/scaling.json" <<'PY' || fail "scaling results"
import json, sys
r = json.load(open(sys.argv[1]))["rows"]
assert [(x["axis"], x["value"]) for x in r] == [("block_size", 32), ("block_size", 64), ("experts", 4), ("experts", 8)], r
assert r[1]["overrides"]["training.batch_size"] == 1, r[1]  # 4 x 8 tokens a step: one sequence of 64
assert all(x["step_ms"] > 0 and x["gflop_per_s"] > 0 and x["gemm_fraction"] > 0 for x in r), r
assert all(abs(sum(x["parts"].values()) - 1) < 0.01 and x["parts"]["gemm_expert"] > 0 for x in r), r
PY
[ -s "$work/scal/scaling_block_size.png" ] && grep -q "^## experts" "$work/scal/scaling.md" &&
  grep -q "^Non-GEMM work .* takes over" "$work/scal/scaling.md" || fail "scaling outputs"

# The long-context table, both attention kernels, on the tiny config.
py scripts/long_context.py --quick --moe "$moe" --json "$work/long.json" > "$work/long.md" 2> "$work/long.log" \
  || { cat "$work/long.log"; fail "long_context"; }
py - "$work/long.json" <<'PY' || { cat "$work/long.md"; fail "long_context results"; }
import json, sys
r = json.load(open(sys.argv[1]))["rows"]
assert [(x["block"], x["batch"]) for x in r] == [(16, 4), (32, 2)], r
assert all(x[k]["ms"] > 0 and x[k]["peak_mb"] > 0 for x in r for k in ("exact", "tiled")), r
PY
grep -q "^| 32 | 2 |" "$work/long.md" || { cat "$work/long.md"; fail "long_context table"; }

# Bad input: a clear error, not a traceback.
echo '{"base": "x.json"}' > "$work/bad.json"
if py scripts/sweep.py "$work/bad.json" --moe "$moe" 2> "$work/bad.log"; then fail "a bad spec was accepted"; fi
grep -q "sweep: error: the spec has no 'params'" "$work/bad.log" || { cat "$work/bad.log"; fail "bad spec message"; }
echo "test_scripts: all passed"
