#!/usr/bin/env python3
"""Architecture study: the study base, each architecture option alone, and a "modern"
combination (RMSNorm + RoPE + SwiGLU + GQA + loss-free balancing), at equal wall time.

Every run ends at the same wall time (`training.time_limit`, scripts/studylib.py), so each
variant gets what its speed buys on this machine.
`moe eval --json` then measures the last checkpoint over the whole validation split.
Writes study.json, study.md and study.png into --out.

  /usr/bin/python3 scripts/arch_study.py [--budget 90] [--seeds 1337 1338] [--only NAME ...]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studylib  # noqa: E402

# SwiGLU has three matrices: a hidden width of 2/3 of 4·n_embed keeps its parameters those of
# the ReLU expert (n_embed 96: 384 -> 256).
SWIGLU = {"model.expert_ffn": "swiglu", "model.expert_hidden": 256}
VARIANTS = [
    ("base", {}),
    ("rmsnorm", {"model.norm": "rmsnorm"}),
    ("rope", {"model.position": "rope"}),
    ("gqa (2 kv heads of 4)", {"model.n_kv_head": 2}),
    ("qk_norm", {"model.qk_norm": True}),
    ("swiglu (hidden 256)", SWIGLU),
    ("loss-free bias 1e-2", {"router.bias_update_rate": 1e-2}),
    ("moe_every 2", {"model.moe_every": 2}),
    ("dense_first 1", {"model.dense_first": 1}),
    ("tie_embeddings", {"model.tie_embeddings": True}),
    ("modern", {"model.norm": "rmsnorm", "model.position": "rope", **SWIGLU, "model.n_kv_head": 2,
                "router.bias_update_rate": 1e-2}),
]
TWO_SEEDS = {"base", "modern"}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(root, "configs", "study_base.json"))
    ap.add_argument("--budget", type=float, default=90, help="wall seconds per run (training.time_limit)")
    ap.add_argument("--seeds", type=int, nargs=2, default=[1337, 1338],
                    help="the seeds of base and modern; the other variants run the first")
    ap.add_argument("--threads", type=int, default=2, help="training.threads of every run")
    ap.add_argument("--only", nargs="*", help="run only these variants (by name)")
    ap.add_argument("--out", default="runs/arch_study")
    ap.add_argument("--moe", default=os.path.join(root, "build", "moe"))
    args = ap.parse_args()
    if not os.access(args.moe, os.X_OK):
        sys.exit(f"arch_study: {args.moe} is not an executable; build first (bash scripts/build.sh)")
    with open(args.config) as f:
        base = json.load(f)
    base = studylib.with_data_path(base, root)
    base = studylib.derive(base, {"training.threads": args.threads, "logging.eval_iters": 20})

    rows = []
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    for i, (name, overrides) in enumerate(variants):
        for seed in (args.seeds if name in TWO_SEEDS else args.seeds[:1]):
            print(f"[{i + 1}/{len(variants)}] {name}", file=sys.stderr, flush=True)
            run_dir = os.path.join(args.out, f"v{i}_s{seed}")
            rows.append(studylib.run_variant(args.moe, base, name, overrides, run_dir, args.budget, seed))
            studylib.write_outputs(args.out, title(args), rows, COLUMNS)


def title(args):
    return (f"Architecture options at equal wall time ({args.budget:.0f} s per run, "
            f"{os.path.basename(args.config)}, {args.threads} thread(s))")


COLUMNS = [
    ("variant", lambda r: r["variant"]),
    ("seed", lambda r: str(r["seed"])),
    ("val loss (whole split)", lambda r: f"{r['val_loss']:.4f}"),
    ("steps", lambda r: str(r["steps"])),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
    ("train wall s", lambda r: f"{r['train_wall_s']:.0f}"),
    ("max violation (mean over MoE layers)",
     lambda r: "-" if r["max_violation_mean"] is None else f"{r['max_violation_mean']:.3f}"),
]

if __name__ == "__main__":
    main()
