#!/usr/bin/env python3
"""Balancing study: the same model and step budget with four routers.

  makeMoE router    noisy top-k, nothing else
  + aux loss        Switch load-balancing loss, coefficient 0.01
  + aux + z-loss    and the ST-MoE router z-loss, coefficient 1e-3
  loss-free bias    DeepSeek-V3 selection bias, no auxiliary loss

Each variant trains with `moe train` from a derived config, then `moe eval --json` measures
the last checkpoint on the whole validation split: loss and, per layer, the router health.
Prints a Markdown table. Needs only the Python standard library.

  python3 scripts/moe_study.py [--config configs/study_base.json] [--steps N] [--out runs/study]
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import time

VARIANTS = [
    ("makeMoE router", {}),
    ("+ aux loss 0.01", {"aux_loss_coef": 0.01}),
    ("+ aux 0.01 + z-loss 1e-3", {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}),
    ("loss-free bias, rate 1e-2", {"bias_update_rate": 1e-2}),
]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(root, "configs", "study_base.json"))
    ap.add_argument("--steps", type=int, help="override training.max_steps")
    ap.add_argument("--out", default="runs/study", help="one run directory per variant goes here")
    ap.add_argument("--moe", default=os.path.join(root, "build", "moe"), help="the moe binary")
    args = ap.parse_args()
    if not os.access(args.moe, os.X_OK):
        sys.exit(f"moe_study: {args.moe} is not an executable; build first (bash scripts/build.sh)")
    with open(args.config) as f:
        base = json.load(f)
    if args.steps:
        base.setdefault("training", {})["max_steps"] = args.steps

    rows = []
    for i, (name, router) in enumerate(VARIANTS):
        cfg = copy.deepcopy(base)
        cfg.setdefault("router", {}).update(router)
        run_dir = os.path.join(args.out, f"variant{i}")
        os.makedirs(run_dir, exist_ok=True)
        cfg_path = os.path.join(run_dir, "study_config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        print(f"[{i + 1}/{len(VARIANTS)}] {name}: training in {run_dir}", file=sys.stderr, flush=True)
        t0 = time.time()
        subprocess.run([args.moe, "train", "--config", cfg_path, "--out", run_dir, "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        ev = json.loads(subprocess.run([args.moe, "eval", "--checkpoint", os.path.join(run_dir, "last.safetensors"),
                                        "--json"], check=True, capture_output=True, text=True).stdout)
        layers = ev["router"]
        rows.append({
            "variant": name,
            "val_loss": ev["loss"],
            "max_violation_mean": sum(l["max_violation"] for l in layers) / len(layers),
            "max_violation_worst": max(l["max_violation"] for l in layers),
            "router_entropy": sum(l["router_entropy"] for l in layers) / len(layers),
            "z_loss": sum(l["z_loss"] for l in layers) / len(layers),
            "wall_s": wall,
        })

    steps = base.get("training", {}).get("max_steps")
    print(f"\n{os.path.basename(args.config)}, {steps} steps; val loss over the whole validation split of the "
          "last checkpoint; max violation = max load / mean load - 1 (mean over layers, worst layer)\n")
    print("| router | val loss | max violation, mean | worst layer | router entropy | z (mean lse²) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['val_loss']:.4f} | {r['max_violation_mean']:.3f} | {r['max_violation_worst']:.3f} "
              f"| {r['router_entropy']:.3f} | {r['z_loss']:.2f} | {r['wall_s']:.0f} |")
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
