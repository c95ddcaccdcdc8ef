#!/usr/bin/env python3
"""Heatmaps of `moe inspect --out DIR`'s report.

  scripts/py.sh scripts/plot_inspect.py DIR/inspect.json [--out DIR] [--layers 0,3,7]

Writes into DIR (default: the report's folder), one row of panels per MoE layer (the report
lists those only; --layers takes block numbers, as the report's "layer" fields name them):
  inspect_classes.png    expert x character class (lowercase, uppercase, vowel, ...)
  inspect_positions.png  expert x position in the word (first, middle, last, single, outside)
  inspect_chars.png      expert x character
Colours are lifts: the expert's share of a class (character, position) over its share of the
split, on a log scale: red taken more often than chance, blue less.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402


def panels(report, layers, key, corpus, columns, path, width):
    """layers: indices into report["layers"]."""
    fig, axes = plt.subplots(len(layers), 1, figsize=(width, 1.0 + 1.6 * len(layers)), squeeze=False,
                             layout="constrained")
    norm = LogNorm(vmin=1 / 4, vmax=4)
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("#bbbbbb")  # not in the split: no lift
    absent = np.array(report["corpus"][corpus]) == 0
    for ax, l in zip(axes[:, 0], layers):
        m = np.array([e[key] for e in report["layers"][l]["experts"]], dtype=float)
        m = np.ma.masked_array(np.clip(m, 1 / 4, 4), mask=np.broadcast_to(absent, m.shape))
        im = ax.imshow(m, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels([f"e{e}" for e in range(m.shape[0])], fontsize=7)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns, fontsize=7 if len(columns) < 20 else 6, family="monospace",
                           rotation=0 if len(columns) > 20 else 30)
        ax.set_ylabel(f"layer {report['layers'][l]['layer']}", fontsize=8)
    bar = fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.6, label="lift (log scale; grey: not in the split)")
    bar.set_ticks([1 / 4, 1 / 2, 1, 2, 4], labels=["≤¼", "½", "1", "2", "≥4"])
    fig.suptitle(f"{os.path.basename(report.get('checkpoint', ''))}: {key.replace('_', ' ')}, "
                 f"{report['tokens']} {report.get('split', 'val')} tokens", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report")
    ap.add_argument("--out")
    ap.add_argument("--layers", help="comma-separated layer (block) numbers of MoE layers (default: all)")
    a = ap.parse_args()
    try:
        with open(a.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"plot_inspect: error: cannot read {a.report}: {e}")
    out = a.out or os.path.dirname(os.path.abspath(a.report))
    os.makedirs(out, exist_ok=True)
    at = {layer["layer"]: i for i, layer in enumerate(report["layers"])}  # block number -> entry
    if not at:
        sys.exit(f"plot_inspect: error: {a.report} has no MoE layers (an all-dense model): nothing to draw")
    wanted = [int(x) for x in a.layers.split(",")] if a.layers else list(at)
    bad = [l for l in wanted if l not in at]
    if bad:
        sys.exit(f"plot_inspect: error: --layers {bad}: not MoE layers of the report (they are {', '.join(map(str, at))})")
    layers = [at[l] for l in wanted]
    panels(report, layers, "class_lift", "classes", report["classes"], os.path.join(out, "inspect_classes.png"), 6)
    panels(report, layers, "position_lift", "positions", report["positions"], os.path.join(out, "inspect_positions.png"), 5)
    vocab = ["_" if c == "␣" else c for c in report["vocab"]]  # the font has no ␣
    panels(report, layers, "char_lift", "chars", vocab, os.path.join(out, "inspect_chars.png"), 14)
    for name in ("inspect_classes.png", "inspect_positions.png", "inspect_chars.png"):
        print(os.path.join(out, name))


if __name__ == "__main__":
    main()
