#!/usr/bin/env python3
"""Quality runs: train a config with a seed and score it, and plot validation loss against tokens seen.

  /usr/bin/python3 scripts/quality.py run CONFIG --seed S --out DIR [--moe build/moe] [--threads N]
      `moe train` (the wall time measured around it, evaluations and checkpoints included),
      then `moe eval` over the whole validation split on last.safetensors and best.safetensors.
      Writes DIR/quality.json: seed, wall seconds, steps, tokens seen (steps x batch x block),
      both whole-split losses and the commands.
  /usr/bin/python3 scripts/quality.py plot NAME=DIR [NAME=DIR ...] --out PNG [--train]
      Validation loss (the in-training estimates, eval_iters batches each) against tokens seen,
      one curve per run directory, its whole-split `moe eval` loss (from quality.json) as a
      marker, and the two reference points: makeMoE's tutorial and nanoGPT's shakespeare_char.
      --train adds each run's training loss (dashed; the same evaluations' estimate), so the
      gap between the two shows the overfitting.
  /usr/bin/python3 scripts/quality.py table DIR [DIR ...]
      A Markdown row per run.
  /usr/bin/python3 scripts/quality.py curve DIR --out FILE.json
      A run's evaluations (step, validation and training estimates), its quality.json and its
      config in one small file, to commit beside a plot: `plot` and `table` take such a file
      wherever they take a run directory, so the plot can be drawn again without the run.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from studylib import derive, evaluate, read_metrics, with_data_path, write_config  # noqa: E402

# Published points: makeMoE's notebook (its last reported val loss, after 5000 steps of 16 x 32
# tokens) and nanoGPT's shakespeare_char (10.65 M dense parameters on an A100, 5000 iterations of
# 64 x 256 tokens, dropout 0.2).
ANCHORS = [("makeMoE (reported)", 2.56e6, 1.7508), ("nanoGPT shakespeare_char (A100)", 82e6, 1.4697)]


def is_curve(path):
    return os.path.isfile(path) and path.endswith(".json")


def metrics(run_dir):
    if is_curve(run_dir):
        return json.load(open(run_dir))["evals"]
    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def run(args):
    with open(args.config) as f:
        base = json.load(f)
    over = {"training.seed": args.seed, "logging.out_dir": os.path.abspath(args.out)}
    if args.threads is not None:  # the numbers do not depend on it; only the wall time does
        over["training.threads"] = args.threads
    cfg = derive(with_data_path(base, ROOT), over)
    os.makedirs(args.out, exist_ok=True)
    cfg_path = write_config(cfg, os.path.join(os.path.abspath(args.out), "quality_config.json"))
    cmd = [args.moe, "train", "--config", cfg_path, "--overwrite"]
    print(f"quality: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # moe's progress lines, passed on as they come
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line)
    proc.wait()
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"quality: moe train exited with {proc.returncode}")
    m = re.findall(r"(?:done|time limit reached) at step (\d+)", "".join(lines))
    if not m:
        sys.exit("quality: no 'done at step' in moe train's output")
    steps = int(m[-1])
    tokens = steps * cfg["training"]["batch_size"] * cfg["model"]["block_size"]
    out = {"config": args.config, "seed": args.seed, "threads": cfg["training"].get("threads", 0),
           "wall_s": round(wall, 1), "steps": steps, "tokens": tokens, "train_command": shlex.join(cmd),
           "quality_command": shlex.join(["scripts/quality.py", *sys.argv[1:]])}
    for which in ("last", "best"):
        ckpt = os.path.join(args.out, f"{which}.safetensors")
        if os.path.exists(ckpt):
            ev = evaluate(args.moe, ckpt)
            out[f"eval_{which}"] = ev["loss"]
            out[f"eval_{which}_command"] = shlex.join([args.moe, "eval", "--checkpoint", ckpt, "--json"])
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


def load(run_dir):
    if is_curve(run_dir):
        c = json.load(open(run_dir))
        return c["quality"], c["config"]
    path = os.path.join(run_dir, "quality.json")
    q = json.load(open(path)) if os.path.exists(path) else {}
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        sys.exit(f"quality: {run_dir} is not a run directory (no config.json)")
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    return q, cfg


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, spec in enumerate(args.runs):
        name, _, run_dir = spec.partition("=")
        q, cfg = load(run_dir)
        per_step = cfg["training"]["batch_size"] * cfg["model"]["block_size"]
        records = metrics(run_dir)
        pts = [((r["step"] + 1) * per_step, r["val_loss"]) for r in records if "val_loss" in r and r["step"] > 0]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1.2)
        if args.train:  # the training loss's estimate at the same evaluations: the gap is the overfitting
            tr = [((r["step"] + 1) * per_step, r["train_loss"]) for r in records if "train_loss" in r and r["step"] > 0]
            ax.plot([p[0] for p in tr], [p[1] for p in tr], "--", color=line.get_color(), lw=1.0)
        if "eval_last" in q:
            ax.plot([q["tokens"]], [q["eval_last"]], "o", color=line.get_color(), ms=6)
            ax.annotate(f"{q['eval_last']:.4f}", (q["tokens"], q["eval_last"]), textcoords="offset points",
                        xytext=(6, -12 - 11 * i), fontsize=8, color=line.get_color())
    for label, tokens, loss in ANCHORS:
        ax.plot([tokens], [loss], "*", ms=12, label=f"{label}: {loss} at {tokens / 1e6:g} M tokens")
    ax.set_xscale("log")
    ax.set_ylim(*((0.9, 2.0) if args.train else (1.3, 2.6)))
    ax.set_xlabel("tokens seen (training)")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title("Validation loss against tokens seen (dots: whole-split moe eval of the final checkpoint)"
                 + ("; dashed: training loss" if args.train else ""))
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"quality: wrote {args.out}", file=sys.stderr)


def curve(args):
    q, cfg = load(args.dir)
    keep = ("step", "val_loss", "train_loss")
    evals = [{k: r[k] for k in keep if k in r} for r in metrics(args.dir) if "val_loss" in r]
    with open(args.out, "w") as f:
        json.dump({"quality": q, "config": cfg, "evals": evals}, f, indent=1)
        f.write("\n")
    print(f"quality: wrote {args.out} ({len(evals)} evaluations)", file=sys.stderr)


def table(args):
    print("| run | seed | wall s | steps | tokens | val loss (last, whole split) | val loss (best.safetensors) |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in args.dirs:
        q, _ = load(run_dir)
        if not q:
            sys.exit(f"quality: {run_dir} has no quality.json (made by `quality.py run`)")
        print(f"| {q['config']} | {q['seed']} | {q['wall_s']:.0f} | {q['steps']} | {q['tokens'] / 1e6:.2f} M | "
              f"{q.get('eval_last', float('nan')):.4f} | {q.get('eval_best', float('nan')):.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("config")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    r.add_argument("--threads", type=int, help="OpenMP threads (the losses are the same for any count)")
    p = sub.add_parser("plot")
    p.add_argument("runs", nargs="+", metavar="NAME=DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--train", action="store_true", help="also the training loss (dashed), to show the gap")
    t = sub.add_parser("table")
    t.add_argument("dirs", nargs="+")
    c = sub.add_parser("curve")
    c.add_argument("dir")
    c.add_argument("--out", required=True)
    args = ap.parse_args()
    {"run": run, "plot": plot, "table": table, "curve": curve}[args.cmd](args)


if __name__ == "__main__":
    main()
