#!/usr/bin/env python3
"""Bytes each process sends per training step under `mpirun -np R moe train`, on paper.

Parameter counts come from `moe train --config CONFIG --dry-run`; the rest from the config.
Data parallel: a ring all-reduce of every gradient sends 2(R-1)/R of the gradient block per
process. Expert parallel: the same for the parameters that are not routed experts, plus four
row exchanges per MoE layer (dispatch and combine, forward and backward) of the B*T*top_k
routed rows of n_embed floats, of which (R-1)/R leave the process when the router balances
the experts. The per-layer exchange of routing counts (2E integers per process) is ignored.

    python3 scripts/comm_estimate.py --config configs/large_mpi.json --ranks 4 --gbit 10
Standard library only.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--gbit", type=float, default=10.0, help="link speed per process, Gbit/s")
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    a = ap.parse_args()
    out = subprocess.run([a.moe, "train", "--config", a.config, "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr.strip() or out.stdout.strip())
    d = json.loads(out.stdout)
    cfg = d["resolved"]
    total, active = d["parameters"], d["active_parameters"]
    E, K = cfg["router"]["num_experts"], cfg["router"]["top_k"]
    L, C = cfg["model"]["n_layer"], cfg["model"]["n_embed"]
    B, T = cfg["training"]["batch_size"], cfg["model"]["block_size"]
    # active = total - experts + experts * K / E
    experts = round((total - active) * E / (E - K)) if E > K else 0
    rest = total - experts
    rows = B * T * K
    print(f"{os.path.basename(a.config)}: {total:,} parameters ({experts:,} in routed experts, {rest:,} other); "
          f"{L} MoE layers, batch {B} x {T} per process, top-{K} of {E} experts, n_embed {C}")
    print(f"| processes | data parallel MB/step | expert parallel MB/step (all-reduce + exchanges) "
          f"| at {a.gbit:g} Gbit/s: data / expert parallel |")
    print("|---|---|---|---|")
    for R in a.ranks:
        ring = 2 * (R - 1) / R
        dp = ring * 4 * total
        ep_reduce = ring * 4 * rest
        ep_exchange = 4 * L * rows * C * 4 * (R - 1) / R
        ep = ep_reduce + ep_exchange
        s = lambda b: b * 8 / (a.gbit * 1e9)
        print(f"| {R} | {dp / 1e6:,.0f} | {ep / 1e6:,.0f} ({ep_reduce / 1e6:,.0f} + {ep_exchange / 1e6:,.0f}) "
              f"| {s(dp):.2f} s / {s(ep):.2f} s |")


if __name__ == "__main__":
    main()
