#!/usr/bin/env python3
"""Router study: routers beyond noisy top-k, at equal wall time on the same base model.

  noisy top-k          makeMoE's router (topk_softmax with noise)
  softmax top-k + aux  softmax_topk, renormalised, Switch aux loss 0.01, no noise
  loss-free bias       DeepSeek-V3 selection bias, rate 1e-2, no noise
  sigmoid + groups     sigmoid_topk, 4 groups of 2, 2 open, loss-free bias
  ReLU routing         ReMoE: relu gating, adaptive L1 (defaults), no noise
  expert choice        capacity_factor 1; val loss by the causal thresholds, and the batch rule's
  dense-to-sparse      k from E down to top_k over the first half of the steps
  upcycled             a dense model (num_experts 1) trained for `--dense-fraction` of the budget,
                       upcycled (noise 1e-3), then trained as noisy top-k for the rest

Equal wall time: every run ends at `--budget` seconds (`training.time_limit`: from the start
of `moe train`, its evaluations at step 0 and at the end and its checkpoint included); the
upcycled variant's dense run and MoE run share the budget (`--dense-fraction`). Only the
dense-to-sparse anneal length comes from a short calibration run (`--calibrate` steps).
Each row's exact `moe train` command is printed. Then `moe eval --json` measures the last
checkpoint on the whole validation split.

Table (Markdown + JSON in --out, and router_study.png): val loss (mean over seeds, and each
seed), max violation (mean over layers of max load / mean load - 1), tokens/s (mean of the
metrics log), active experts per token (top_k, or the measured mean for relu / expert choice).

  python3 scripts/router_study.py --budget SECONDS [--seeds 1 2] [--out runs/router_study]
                                  [--moe build/moe] [--config configs/study_base.json]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from studylib import calibration_config, evaluate, median_step_ms, read_metrics, steps_done, with_data_path, write_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> router changes (from the base config's router), and how it is trained
VARIANTS = [
    ("noisy top-k", {}, "plain"),
    ("softmax top-k + aux", {"gating": "softmax_topk", "renormalize": True, "aux_loss_coef": 0.01, "noisy": False},
     "plain"),
    ("loss-free bias", {"bias_update_rate": 1e-2, "noisy": False}, "plain"),
    ("sigmoid + groups", {"gating": "sigmoid_topk", "n_groups": 4, "topk_groups": 2, "bias_update_rate": 1e-2,
                          "noisy": False}, "plain"),
    ("ReLU routing", {"gating": "relu", "noisy": False}, "plain"),
    ("expert choice", {"gating": "expert_choice", "capacity_factor": 1.0, "noisy": False}, "plain"),
    ("dense-to-sparse", {}, "anneal"),
    ("upcycled", {}, "upcycle"),
]


def run(cmd, quiet=True):
    print("  $ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True)



def calibrate(moe, cfg, steps, run_dir):
    """Trains `steps` steps of cfg and reads the median step time."""
    path = write_config(calibration_config(cfg, steps, os.path.join(run_dir, "calibrate")),
                        os.path.join(run_dir, "calibrate.json"))
    out = run([moe, "train", "--config", path, "--overwrite"])
    ms = median_step_ms(out.stdout + out.stderr)
    if ms is None:
        sys.exit(f"router_study: no 'median step' in the output of the calibration run in {run_dir}")
    return ms


def train(moe, cfg, run_dir, extra=()):
    path = write_config(cfg, os.path.join(run_dir, "config.json"))
    cmd = [moe, "train", "--config", path, "--out", run_dir, "--overwrite", *extra]
    print(" ".join(cmd), flush=True)
    run(cmd)
    return " ".join(cmd)


def tokens_per_s(run_dir):
    vals = [r["tokens_per_s"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "tokens_per_s" in r]
    return statistics.mean(vals) if vals else float("nan")


def one_run(args, base, name, router, kind, seed, run_dir):
    cfg = copy.deepcopy(base)
    cfg["training"]["seed"] = seed
    cfg["router"].update(router)
    E, k = cfg["router"]["num_experts"], cfg["router"]["top_k"]
    budget_ms = args.budget * 1000.0
    row = {"variant": name, "seed": seed, "commands": []}
    # Equal wall time: training.time_limit ends every run at the budget (start, evaluations and
    # saving included); max_steps is out of reach (the schedule is constant in study_base.json).
    cfg["training"].update({"max_steps": 10 ** 7, "time_limit": args.budget})
    cfg["logging"].update({"eval_interval": 10 ** 7, "checkpoint_interval": 0})
    if kind == "plain":
        row["commands"].append(train(args.moe, cfg, run_dir))
    elif kind == "anneal":
        # The anneal runs over about the first half of the steps: those are estimated from a
        # short calibration run (k falls linearly, so about the mean of the two step times there).
        dense = copy.deepcopy(cfg)
        dense["router"]["top_k"] = E
        ms_dense = calibrate(args.moe, dense, args.calibrate, os.path.join(run_dir, "cal_dense"))
        ms_sparse = calibrate(args.moe, cfg, args.calibrate, run_dir)
        ms = 0.5 * (ms_dense + ms_sparse) / 2 + 0.5 * ms_sparse
        cfg["router"]["top_k_anneal_steps"] = max(1, int(budget_ms / ms) // 2)
        row["commands"].append(train(args.moe, cfg, run_dir))
    else:  # upcycle: dense pre-training counts in the budget
        dense = copy.deepcopy(cfg)
        dense["router"] = {"num_experts": 1, "top_k": 1, "noisy": False}
        dense["training"]["time_limit"] = args.dense_fraction * args.budget
        dense_dir = os.path.join(run_dir, "dense")
        row["commands"].append(train(args.moe, dense, dense_dir))
        row["dense_steps"] = steps_done(dense_dir)
        cfg["training"]["time_limit"] = (1 - args.dense_fraction) * args.budget
        up = os.path.join(dense_dir, "upcycled.safetensors")  # not in run_dir: a fresh run there empties it
        cfg_path = write_config(cfg, os.path.join(run_dir, "config.json"))
        cmd = [args.moe, "upcycle", "--from", os.path.join(dense_dir, "last.safetensors"), "--config", cfg_path,
               "--out", up, "--noise", "1e-3", "--seed", str(seed)]
        print(" ".join(cmd), flush=True)
        run(cmd)
        row["commands"].append(" ".join(cmd))
        row["commands"].append(train(args.moe, cfg, run_dir, ["--init", up]))
    ev = evaluate(args.moe, os.path.join(run_dir, "last.safetensors"))
    layers = ev["router"]
    row["max_steps"] = steps_done(run_dir)
    row["val_loss"] = ev["loss"]
    if "expert_choice" in ev:
        row["val_loss_batch"] = ev["expert_choice"]["loss_batch"]
    row["max_violation"] = statistics.mean(l["max_violation"] for l in layers)
    row["tokens_per_s"] = tokens_per_s(run_dir)
    if all("experts_per_token" in l for l in layers):
        row["experts_per_token"] = statistics.mean(l["experts_per_token"]["mean"] for l in layers)
    else:
        row["experts_per_token"] = k
    return row


def plot(rows, names, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("router_study: no matplotlib (run with /usr/bin/python3): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, n in enumerate(names):
        ys = [r["val_loss"] for r in rows if r["variant"] == n]
        ax.bar(i, statistics.mean(ys), color="#8ab", width=0.6)
        ax.plot([i] * len(ys), ys, "k.", ms=8)
        yb = [r["val_loss_batch"] for r in rows if r["variant"] == n and "val_loss_batch" in r]
        if yb:
            ax.plot([i] * len(yb), yb, "rx", ms=8, label="expert choice, batch rule")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right")
    lo = min(r["val_loss"] for r in rows)
    ax.set_ylim(lo - 0.05, max(r["val_loss"] for r in rows) + 0.05)
    ax.set_ylabel("val loss (whole split)")
    ax.set_title("Routers at equal wall time")
    if any("val_loss_batch" in r for r in rows):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, required=True, help="wall seconds per run (training.time_limit)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--out", default="runs/router_study")
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "study_base.json"))
    ap.add_argument("--calibrate", type=int, default=20, help="steps of each calibration run")
    ap.add_argument("--dense-fraction", type=float, default=0.5, help="upcycled: the dense pre-training's share")
    ap.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    args = ap.parse_args()
    if not os.access(args.moe, os.X_OK):
        sys.exit(f"router_study: {args.moe} is not an executable; build first (bash scripts/build.sh)")
    with open(args.config) as f:
        base = json.load(f)
    for sec in ("router", "training", "logging"):
        base.setdefault(sec, {})
    base = with_data_path(base, ROOT)
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    rows = []
    for i, (name, router, kind) in enumerate(variants):
        for seed in args.seeds:
            print(f"[{i + 1}/{len(variants)}] {name}, seed {seed}", file=sys.stderr, flush=True)
            run_dir = os.path.join(args.out, f"v{i}_s{seed}")
            rows.append(one_run(args, base, name, router, kind, seed, run_dir))
    names = [v[0] for v in variants]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "router_study.json"), "w") as f:
        json.dump({"budget_s": args.budget, "seeds": args.seeds, "config": args.config, "rows": rows}, f, indent=2)
    lines = [f"Routers at equal wall time ({args.budget:g} s per run, `training.time_limit`; "
             f"{os.path.basename(args.config)}; seeds {' '.join(map(str, args.seeds))}). val loss: `moe eval` on the "
             "whole validation split (expert choice: causal thresholds, batch rule in brackets).", "",
             "| router | val loss (mean) | per seed | max violation | tokens/s | experts/token | steps |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        rs = [r for r in rows if r["variant"] == n]
        vl = statistics.mean(r["val_loss"] for r in rs)
        batch = [r["val_loss_batch"] for r in rs if "val_loss_batch" in r]
        lines.append(f"| {n} | {vl:.4f}" + (f" ({statistics.mean(batch):.4f})" if batch else "") +
                     " | " + " ".join("%.4f" % r["val_loss"] for r in rs) + " | " +
                     "%.3f | " % statistics.mean(r["max_violation"] for r in rs) +
                     "%.0f | " % statistics.mean(r["tokens_per_s"] for r in rs) +
                     "%.2f | " % statistics.mean(r["experts_per_token"] for r in rs) +
                     " ".join(str(r["max_steps"]) for r in rs) + " |")
    lines += ["", "Commands:", ""] + [f"    {c}" for r in rows for c in r["commands"]]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "router_study.md"), "w") as f:
        f.write(md)
    print(md)
    plot(rows, names, os.path.join(args.out, "router_study.png"))


if __name__ == "__main__":
    main()
