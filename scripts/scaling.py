#!/usr/bin/env python3
"""How a training step's cost grows: `moe bench --json` across one axis at a time of a base config.

  /usr/bin/python3 scripts/scaling.py [--base configs/makemoe.json] [--axes n_embed experts top_k block_size batch]
                                      [--steps 10] [--threads 2] [--gemm-peak GFLOPS] [--out docs/scaling]
                                      [--moe build/moe] [--quick] [--profile] [--plot-only]

Axes (every other field stays the base's; n_head keeps the base's head width):
  n_embed     64 128 256 384 512, expert_hidden 4 x n_embed
  experts     4 8 16 32 64 at fixed active and total parameters (fine-grained): top_k = E/4,
              expert_hidden = base width x 8 / E (the base's 8 experts of top-2 at E = 8)
  top_k       1 2 3 4 of the base's experts
  block_size  32 64 128 256 512, the batch cut so that batch x block_size stays the base's
              tokens per step (at least 1 sequence)
  batch       4 8 16 32 64

For each point: median step (ms), tokens/s, GFLOP/s (the model's analytic matmul FLOPs, as
`moe bench` counts them), the peak resident memory of the training steps, and, given
`--gemm-peak` (the GEMM kernel's own GFLOP/s on the model's shapes, from
`bash scripts/bench_gemm.sh`), the fraction of it the whole step reaches. Writes
OUT/scaling.json, OUT/scaling.md (a table per axis with the command of every row) and
OUT/scaling_<axis>.png. Run it on a quiet machine: every figure is a timing.
`--quick` (the tests) runs two points per axis of 2 steps. `--profile` adds where each point's
step goes (`moe bench --profile`: the share of each part, GEMM, attention, routing...) to
scaling.json, the non-GEMM share and the three largest parts to each table row, a line per axis
naming the points where non-GEMM work takes over (over half the step), and a panel of each
point's shares to each plot. `--plot-only` redraws the plots of OUT/scaling.json.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from studylib import derive, with_data_path, write_config  # noqa: E402


def points(base, axis):
    """(label, overrides) for each point of an axis."""
    m, r, t = base["model"], base["router"], base["training"]
    head = m["n_embed"] // m["n_head"]
    tokens = t["batch_size"] * m["block_size"]
    if axis == "n_embed":
        return [(c, {"model.n_embed": c, "model.n_head": max(1, c // head), "model.expert_hidden": 4 * c})
                for c in (64, 128, 256, 384, 512)]
    if axis == "experts":
        width = m.get("expert_hidden", 4 * m["n_embed"]) * r["num_experts"] // 8
        return [(e, {"router.num_experts": e, "router.top_k": max(1, e // 4), "model.expert_hidden": width * 8 // e})
                for e in (4, 8, 16, 32, 64)]
    if axis == "top_k":
        return [(k, {"router.top_k": k}) for k in (1, 2, 3, 4) if k <= r["num_experts"]]
    if axis == "block_size":
        return [(T, {"model.block_size": T, "training.batch_size": max(1, tokens // T)}) for T in (32, 64, 128, 256, 512)]
    if axis == "batch":
        return [(b, {"training.batch_size": b}) for b in (4, 8, 16, 32, 64)]
    sys.exit(f"scaling: unknown axis {axis!r}")


def bench(moe, cfg, steps, threads, tmp, profile=False):
    path = write_config(cfg, os.path.join(tmp, "point.json"))
    cmd = [moe, "bench", "--config", path, "--steps", str(steps), "--threads", str(threads), "--generate", "1", "--json"]
    if profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=os.path.join(ROOT, "configs", "makemoe.json"))
    ap.add_argument("--axes", nargs="+", default=["n_embed", "experts", "top_k", "block_size", "batch"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-peak", type=float, help="the GEMM's own GFLOP/s on the model's shapes")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "scaling"))
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    ap.add_argument("--quick", action="store_true", help="two points per axis, 2 steps (for the tests)")
    ap.add_argument("--profile", action="store_true", help="time each point's step by part (moe bench --profile)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from OUT/scaling.json, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        with open(os.path.join(args.out, "scaling.json")) as f:
            saved = json.load(f)
        rows = saved["rows"]
        args.axes = list(dict.fromkeys(r["axis"] for r in rows))
        args.threads, args.gemm_peak = saved["threads"], saved["gemm_peak"]
        args.profile = all("parts" in r for r in rows)
        plot(args, rows)
        return
    with open(args.base) as f:
        base = json.load(f)
    base = with_data_path(base, ROOT)
    steps = 2 if args.quick else args.steps
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for axis in args.axes:
            pts = points(base, axis)
            for label, over in pts[:2] if args.quick else pts:
                r, cmd = bench(args.moe, derive(base, over), steps, args.threads, tmp, args.profile)
                row = {"axis": axis, "value": label, "overrides": over, "step_ms": r["step_ms_median"],
                       "tokens_per_s": r["tokens_per_s"], "gflop_per_step": r["gflop_per_step"],
                       "gflop_per_s": r["gflop_per_s"], "peak_rss_mb": r["peak_rss_mb"],
                       "gemm_fraction": r["gflop_per_s"] / args.gemm_peak if args.gemm_peak else None,
                       "command": shlex.join(cmd[:3]) + " <point config> " + shlex.join(cmd[4:])}
                if args.profile:
                    row["parts"] = {p["part"]: p["share"] for p in r["profile"]["parts"]}
                rows.append(row)
                print(f"scaling: {axis}={label}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
                      f"{row['gflop_per_s']:.1f} GFLOP/s, {row['peak_rss_mb']:.0f} MB "
                      f"({len(rows)} done)", file=sys.stderr, flush=True)
    meta = {"base": os.path.relpath(args.base, ROOT), "steps": steps, "threads": args.threads,
            "gemm_peak": args.gemm_peak, "command": shlex.join(["scripts/scaling.py", *sys.argv[1:]])}
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(f"# Step cost by axis\n\n`{meta['command']}` (base {meta['base']}, {steps} timed steps, "
                f"{args.threads} threads; each point's `moe bench` ran on its config with the one field changed)\n")
        for axis in args.axes:
            parts_head = (" non-GEMM | largest parts |", "---|---|") if args.profile else ("", "")
            f.write(f"\n## {axis}\n\n| {axis} | step ms | tokens/s | GFLOP/step | GFLOP/s | of GEMM peak | peak MB |"
                    f"{parts_head[0]}\n|---|---|---|---|---|---|---|{parts_head[1]}\n")
            for r in (r for r in rows if r["axis"] == axis):
                frac = f"{100 * r['gemm_fraction']:.0f} %" if r["gemm_fraction"] is not None else "-"
                parts = ""
                if args.profile:
                    top = sorted(r["parts"].items(), key=lambda kv: -kv[1])[:3]
                    parts = (f" {100 * non_gemm(r):.0f} % | " +
                             ", ".join(f"{name} {100 * share:.0f} %" for name, share in top) + " |")
                f.write(f"| {r['value']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['gflop_per_step']:.2f} | "
                        f"{r['gflop_per_s']:.1f} | {frac} | {r['peak_rss_mb']:.0f} |{parts}\n")
            if args.profile:
                over = [r for r in rows if r["axis"] == axis and non_gemm(r) > 0.5]
                f.write("\nNon-GEMM work (attention, routing, gathers, softmax, norms, elementwise, loss, AdamW, "
                        "zeroing) takes over (> 50 % of the step) at: " +
                        (", ".join(f"{axis} {r['value']} ({100 * non_gemm(r):.0f} %)" for r in over) or "no point") +
                        ".\n")
    plot(args, rows)


GEMM_PARTS = ("gemm_dense", "gemm_expert")
# The parts drawn in the share panel, smaller ones summed under "rest".
SHARE_GROUPS = [("GEMM", GEMM_PARTS), ("attention", ("attention",)), ("optimizer", ("optimizer",)),
                ("routing + gathers", ("routing", "gather_scatter")),
                ("norms + elementwise", ("norm", "elementwise", "softmax")),
                ("rest", ("loss", "zeroing", "other"))]


def non_gemm(row):
    """The share of a profiled point's step outside the GEMM parts."""
    return 1.0 - sum(row["parts"].get(p, 0.0) for p in GEMM_PARTS)


def plot(args, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for axis in args.axes:
        rs = [r for r in rows if r["axis"] == axis]
        xs = [r["value"] for r in rs]
        fig, axs = plt.subplots(1, 4 if args.profile else 3, figsize=(16 if args.profile else 12, 3.6))
        if args.profile:
            ax, bottom = axs[3], [0.0] * len(rs)
            pos = range(len(rs))
            for name, parts in SHARE_GROUPS:
                share = [100 * sum(r["parts"].get(p, 0.0) for p in parts) for r in rs]
                ax.bar(pos, share, bottom=bottom, label=name)
                bottom = [b + v for b, v in zip(bottom, share)]
            ax.axhline(50, ls=":", color="black", lw=0.8)
            ax.set_xticks(list(pos), [str(x) for x in xs])
            ax.set_xlabel(axis)
            ax.set_ylabel("share of the step (%)")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        for ax, key, label in zip(axs, ("step_ms", "tokens_per_s", "gflop_per_s"),
                                  ("median step (ms)", "tokens/s", "GFLOP/s achieved")):
            ax.plot(xs, [r[key] for r in rs], "o-")
            if key == "gflop_per_s" and args.gemm_peak:
                ax.axhline(args.gemm_peak, ls="--", color="gray", label=f"GEMM peak {args.gemm_peak:g}")
                ax.legend(fontsize=8)
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"{axis}: one field of the base changed ({args.threads} threads)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"scaling_{axis}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
