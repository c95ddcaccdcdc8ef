#!/usr/bin/env python3
"""Plots of a sweep, from its results.json.

  scripts/py.sh scripts/plot_sweep.py SWEEP_DIR [--x PARAM --y PARAM] [--metric final_val_loss] [--out DIR] [--top N]

Writes into DIR (default SWEEP_DIR/plots):
  vs_<param>.png   the metric of every finished trial against each swept parameter
  history.png      the metric of every finished trial in trial order, and the best so far
  heatmap.png      the metric over two parameters (default: the first two swept), the best
                   trial per cell; empty cells (invalid, pruned or not run) are blank
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def label(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--x")
    ap.add_argument("--y")
    ap.add_argument("--metric", default="final_val_loss")
    ap.add_argument("--out")
    ap.add_argument("--top", type=int, default=0, help="also print the best N trials as a Markdown table")
    args = ap.parse_args()
    path = os.path.join(args.sweep_dir, "results.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"plot_sweep: error: cannot read {path}: {e}")
    params = list(res["spec"]["params"])
    done = [t for t in res["trials"] if t["status"] == "done" and t.get(args.metric) is not None]
    if not done:
        sys.exit(f"plot_sweep: error: no finished trial with {args.metric} in {path}")
    out = args.out or os.path.join(args.sweep_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written = []

    for p in params:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [t[p] for t in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, [t[args.metric] for t in done])
            spec = res["spec"]["params"][p]
            if isinstance(spec, dict) and spec.get("log"):
                ax.set_xscale("log")
        else:
            cats = sorted({label(x) for x in xs})
            ax.scatter([cats.index(label(x)) for x in xs], [t[args.metric] for t in done])
            ax.set_xticks(range(len(cats)), cats)
        ax.set(xlabel=p, ylabel=args.metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"vs_{p.replace('.', '_')}.png"
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)
        written.append(name)

    # The search's progress: every trial's metric in trial order, and the best so far.
    fig, ax = plt.subplots(figsize=(5, 3.5))
    order = sorted(done, key=lambda t: t["trial"])
    ax.scatter([t["trial"] for t in order], [t[args.metric] for t in order], s=14, label="trial")
    best = [min(t[args.metric] for t in order[:i + 1]) for i in range(len(order))]
    ax.step([t["trial"] for t in order], best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=args.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "history.png"), dpi=120)
    plt.close(fig)
    written.append("history.png")

    x = args.x or (params[0] if len(params) >= 2 else None)
    y = args.y or (params[1] if len(params) >= 2 else None)
    if x and y:
        xv = sorted({t[x] for t in res["trials"] if t.get(x) is not None}, key=lambda v: (str(type(v)), v))
        yv = sorted({t[y] for t in res["trials"] if t.get(y) is not None}, key=lambda v: (str(type(v)), v))
        grid = np.full((len(yv), len(xv)), np.nan)
        for t in done:
            i, j = yv.index(t[y]), xv.index(t[x])
            grid[i, j] = t[args.metric] if math.isnan(grid[i, j]) else min(grid[i, j], t[args.metric])
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(xv), 1.2 + 0.8 * len(yv)))
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        for i in range(len(yv)):
            for j in range(len(xv)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="black", fontsize=9,
                            bbox=dict(boxstyle="round", fc="white", alpha=0.6, lw=0))
        ax.set_xticks(range(len(xv)), [label(v) for v in xv])
        ax.set_yticks(range(len(yv)), [label(v) for v in yv])
        ax.set(xlabel=x, ylabel=y, title=args.metric)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "heatmap.png"), dpi=120)
        plt.close(fig)
        written.append("heatmap.png")
    print(f"plot_sweep: wrote {', '.join(written)} in {out}")
    if args.top:
        best = sorted(done, key=lambda t: t[args.metric])[:args.top]
        cols = ["trial", *params, args.metric, "steps", "parameters", "active_parameters"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for t in best:
            print("| " + " | ".join(f"{t.get(c):.4g}" if isinstance(t.get(c), float) else str(t.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
