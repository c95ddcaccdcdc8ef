#!/usr/bin/env python3
"""Plots of one training run, from its metrics.jsonl.

  scripts/py.sh scripts/plot_run.py RUN_DIR [--out DIR]

Writes into DIR (default RUN_DIR/plots):
  loss.png     training loss per logging window, and the train/val estimates
  lr.png       learning rate
  experts.png  per MoE layer, a heatmap of the fraction of routed slots each expert got,
               over training (one column per logging window)
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        sys.exit(f"plot_run: error: cannot read {path}: {e}")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if not train and not evals:
        sys.exit(f"plot_run: error: {path} has no training or evaluation records")
    return train, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    train, evals = load(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(args.run_dir))

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train (window)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3, label="train (estimate)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val (estimate)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"{name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{name}: learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr.png"), dpi=120)
    plt.close(fig)

    # Per layer, null for a dense block (no router): only the MoE layers are drawn.
    with_counts = [r for r in train if r.get("tokens_per_expert") and any(c is not None for c in r["tokens_per_expert"])]
    counts = []
    if with_counts:
        moe_layers = [l for l, c in enumerate(with_counts[0]["tokens_per_expert"]) if c is not None]
        counts = [[r["tokens_per_expert"][l] for l in moe_layers] for r in with_counts]
    if counts:
        a = np.array(counts, dtype=float)  # [window, MoE layer, expert]
        a /= np.maximum(a.sum(axis=2, keepdims=True), 1)
        layers, experts = a.shape[1], a.shape[2]
        fig, axes = plt.subplots(layers, 1, figsize=(8, 1.2 + 0.25 * experts * layers), squeeze=False)
        steps = [r["step"] for r in with_counts]
        for l in range(layers):
            ax = axes[l][0]
            im = ax.imshow(a[:, l, :].T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                           extent=(steps[0], steps[-1], experts - 0.5, -0.5))
            ax.set_ylabel(f"layer {moe_layers[l]}\nexpert")
            fig.colorbar(im, ax=ax, label="fraction")
        axes[-1][0].set_xlabel("step")
        axes[0][0].set_title(f"{name}: tokens per expert (uniform = {1 / experts:.3f})")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "experts.png"), dpi=120)
        plt.close(fig)
    print(f"plot_run: wrote {out}/loss.png, lr.png" + (", experts.png" if counts else ""))


if __name__ == "__main__":
    main()
