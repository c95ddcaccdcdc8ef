#!/usr/bin/env python3
"""Training step time and peak memory at growing context lengths, the tokens per step held
fixed (block_size x batch_size = --tokens), for moe's attention kernels and the PyTorch twin.

  /usr/bin/python3 scripts/long_context.py [--config configs/shakespeare_10min.json]
      [--blocks 128 256 512] [--tokens 2048] [--steps 5] [--threads 1] [--kernels exact tiled]

The config's other settings stay (the default: the 10-minute model with router.num_experts 8,
top-2). Per block size the runs alternate (moe with each kernel, then the twin), each a fresh
process: `moe bench --json` gives the median step, /usr/bin/time's %M the peak (max RSS). The
twin (`scripts/torch_twin.py bench`) needs torch: run this with a Python that has it (Debian:
/usr/bin/python3); without torch, or with --no-torch, only moe is timed.
--repeats R runs R such rounds and shows the medians. --quick: a tiny config for a few seconds
(tests/scripts/test_scripts.sh).
Prints a Markdown table; --json FILE also writes the rows.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_CONFIG = "configs/shakespeare_10min.json"
DEFAULT_OVERRIDES = {"router.num_experts": 8, "router.top_k": 2}


def run_child(cmd, work):
    """(the last stdout line as JSON, the child's peak RSS in MB). The peak is /usr/bin/time's %M
    (the child's own maximum resident set; a parent's wait4 would count this script's memory at
    the fork too)."""
    peak_file = os.path.join(work, "peak")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak_file] + cmd, cwd=ROOT, stdout=out, stderr=err,
                           text=True)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            sys.exit(f"long_context: {' '.join(cmd)} failed ({p.returncode}):\n{err.read()}")
        with open(peak_file) as f:
            peak_kb = float(f.read().split()[-1])
        return json.loads(out.read().strip().splitlines()[-1]), peak_kb / 1024.0


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--tokens", type=int, default=2048, help="block_size x batch_size of every row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds per block size (each round runs every kernel and the twin once); medians are shown")
    ap.add_argument("--kernels", nargs="+", default=["exact", "tiled"], choices=["exact", "tiled"],
                    help="model.attention_kernel values to time")
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 block sizes, 1 step, no twin")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    overrides = dict(DEFAULT_OVERRIDES) if args.config == DEFAULT_CONFIG else {}
    if args.quick:
        args.config, overrides = "tests/fixtures/tiny_sweep.json", {}
        args.blocks, args.tokens, args.steps, args.repeats, args.no_torch = [16, 32], 64, 1, 1, True
    have_torch = not args.no_torch
    if have_torch and subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0:
        have_torch = False
        print("torch is not importable by this Python: timing moe only", file=sys.stderr)
    with open(os.path.join(ROOT, args.config)) as f:
        base = studylib.with_data_path(json.load(f), ROOT)
    work = tempfile.mkdtemp(prefix="long_context_")
    rows = []
    for T in args.blocks:
        if args.tokens % T:
            sys.exit(f"long_context: --tokens {args.tokens} is not a multiple of block {T}")
        B = args.tokens // T
        cfg = studylib.derive(base, {**overrides, "model.block_size": T, "training.batch_size": B})
        runs = {k: [] for k in args.kernels + (["torch"] if have_torch else [])}
        paths = {k: studylib.write_config(studylib.derive(cfg, {"model.attention_kernel": k}),
                                          os.path.join(work, f"moe_{T}_{k}.json")) for k in args.kernels}
        torch_path = studylib.write_config(cfg, os.path.join(work, f"torch_{T}.json"))  # the twin has no kernels
        for _ in range(args.repeats):
            for kernel in args.kernels:
                m, peak = run_child([args.moe, "bench", "--config", paths[kernel], "--steps", str(args.steps),
                                     "--threads", str(args.threads), "--generate", "0", "--json"], work)
                runs[kernel].append((m["step_ms_median"], peak))
            if have_torch:
                t, peak = run_child([sys.executable, os.path.join(ROOT, "scripts", "torch_twin.py"), "bench",
                                     "--config", torch_path, "--steps", str(args.steps), "--threads", str(args.threads)],
                                    work)
                runs["torch"].append((t["median_ms"], peak))
        row = {"block": T, "batch": B}
        for k, v in runs.items():
            row[k] = {"ms": median([ms for ms, _ in v]), "peak_mb": max(p for _, p in v), "runs_ms": [ms for ms, _ in v]}
        rows.append(row)
        print(f"block {T} x batch {B}: " + ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in row.items()
                                                    if isinstance(v, dict)), file=sys.stderr, flush=True)
    over = ", ".join(f"{k} {v}" for k, v in overrides.items())
    print(f"{args.config}{' with ' + over if over else ''}: median training step of {args.steps} "
          f"(after 3 warm-up steps), median of {args.repeats} alternating run(s), {args.tokens} tokens a step, "
          f"{args.threads} thread(s); peak = the process's max RSS")
    cols = [f"moe {k}" for k in args.kernels] + (["PyTorch"] if have_torch else [])
    head = ["block", "batch"] + [f"{c} ms" for c in cols] + [f"{c} peak MB" for c in cols]
    if have_torch:
        head += [f"PyTorch / moe {k}" for k in args.kernels]
    if "exact" in args.kernels and "tiled" in args.kernels:
        head.append("exact / tiled")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        keys = list(args.kernels) + (["torch"] if have_torch else [])
        cells = [str(r["block"]), str(r["batch"])]
        cells += [f"{r[k]['ms']:.1f}" for k in keys] + [f"{r[k]['peak_mb']:.0f}" for k in keys]
        if have_torch:
            cells += [f"{r['torch']['ms'] / r[k]['ms']:.2f}x" for k in args.kernels]
        if "exact" in args.kernels and "tiled" in args.kernels:
            cells.append(f"{r['exact']['ms'] / r['tiled']['ms']:.2f}x")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, "tokens": args.tokens, "steps": args.steps,
                       "threads": args.threads, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
