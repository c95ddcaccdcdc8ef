"""Shared pieces of the studies (scripts/arch_study.py, scripts/router_study.py): configs derived
from a base by dotted overrides, equal-wall-time step budgets, `moe train` + whole-split `moe eval`,
and the Markdown/JSON/plot output. Standard library only, but for the plot (matplotlib).

Equal wall time: every run ends at the budget (`training.time_limit`, counted from the start of
`moe train`, its evaluations at step 0 and at the end and its checkpoint included), with
max_steps out of reach (keep the learning rate constant: a schedule would read max_steps). The
row records the steps it made, the wall time and the exact command.
"""
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time


def derive(base, overrides):
    """A copy of config `base` with {"section.field": value} overrides applied."""
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = value
    return cfg


def with_data_path(cfg, root):
    """A copy of cfg whose data.path (moe's default if unset) is absolute: relative paths are the
    repository's (root), so the config works from any run directory."""
    path = cfg.get("data", {}).get("path", "data/tinyshakespeare.txt")
    return derive(cfg, {"data.path": path if os.path.isabs(path) else os.path.join(root, path)})


def write_config(cfg, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def median_step_ms(text):
    """The median step time in `moe train`'s output ("median step X ms"), or None."""
    m = re.search(r"median step ([0-9.]+) ms", text)
    return float(m.group(1)) if m else None


def calibration_config(cfg, steps, out_dir):
    """A copy of cfg that trains `steps` steps only to time them: no evaluation past the first
    (of one batch), no checkpoints, one progress line; its run directory is out_dir."""
    c = copy.deepcopy(cfg)
    c["training"]["max_steps"] = steps
    c["training"]["time_limit"] = 0
    c.setdefault("logging", {}).update({"eval_interval": 10 ** 9, "eval_iters": 1, "checkpoint_interval": 0,
                                        "log_interval": steps, "out_dir": out_dir})
    return c


def read_metrics(path):
    """The records of a metrics.jsonl (none if it does not exist yet); a line still being
    written (no newline yet) is left for the next read."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def train(moe, cfg_path, run_dir, extra=()):
    """Runs `moe train`; returns (wall seconds, median step ms, the command as text)."""
    cmd = [moe, "train", "--config", cfg_path, "--out", run_dir, "--overwrite", *extra]
    t0 = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    ms = median_step_ms(out.stdout + out.stderr)
    if ms is None:
        sys.exit(f"study: no 'median step' in the output of {shlex.join(cmd)}")
    return wall, ms, shlex.join(cmd)


def steps_done(run_dir):
    """The steps a run made: the last step in its metrics.jsonl."""
    last = 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            last = max(last, json.loads(line).get("step", 0))
    return last


def evaluate(moe, checkpoint, extra=()):
    """`moe eval --json` over the whole validation split."""
    ev = subprocess.run([moe, "eval", "--checkpoint", checkpoint, "--json", *extra], capture_output=True, text=True)
    if ev.returncode != 0:
        raise RuntimeError(f"moe eval failed on {checkpoint}: {ev.stderr.strip()}")
    return json.loads(ev.stdout)


def router_summary(ev):
    """Mean and worst max violation and, where the eval reports it, experts per token, over MoE layers."""
    layers = [l for l in ev.get("router") or [] if l is not None]  # null: a dense block
    if not layers:
        return {"max_violation_mean": None, "max_violation_worst": None, "experts_per_token": None}
    viol = [l["max_violation"] for l in layers]
    ept = [l["experts_per_token"]["mean"] if isinstance(l.get("experts_per_token"), dict)
           else l.get("experts_per_token") for l in layers]
    ept = [x for x in ept if x is not None]
    return {"max_violation_mean": sum(viol) / len(viol), "max_violation_worst": max(viol),
            "experts_per_token": sum(ept) / len(ept) if ept else None}


def run_variant(moe, base, name, overrides, run_dir, budget_s, seed, extra_train=()):
    """Trains one variant for the budget and evaluates it; returns its row."""
    cfg = derive(base, {**overrides, "training.seed": seed, "training.time_limit": budget_s,
                        "training.max_steps": 10 ** 7, "logging.eval_interval": 10 ** 7,
                        "logging.checkpoint_interval": 0})
    cfg_path = write_config(cfg, os.path.join(run_dir, "config.json"))
    wall, median_ms, cmd = train(moe, cfg_path, run_dir, extra_train)
    steps = steps_done(run_dir)
    print(f"  {name} seed {seed}: {steps} steps, median {median_ms:.1f} ms/step", file=sys.stderr, flush=True)
    ev = evaluate(moe, os.path.join(run_dir, "last.safetensors"))
    tokens = steps * cfg["training"]["batch_size"] * cfg["model"]["block_size"]
    return {"variant": name, "seed": seed, "overrides": overrides, "steps": steps, "tokens": tokens,
            "train_wall_s": wall, "median_step_ms": median_ms, "tokens_per_s": tokens / wall,
            "val_loss": ev["loss"], **router_summary(ev), "command": cmd, "eval": ev}


def mean(xs):
    return sum(xs) / len(xs)


def write_outputs(out_dir, title, rows, columns, plot_name="study.png", ylabel="whole-split val loss"):
    """study.json, study.md (a table, one line per row and a mean per variant) and a bar plot."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "eval"} for r in rows], f, indent=2)
    lines = [f"# {title}", "", "| " + " | ".join(c for c, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r) for _, fmt in columns) + " |")
    lines += ["", "Commands (each row's config is in its run directory):", ""]
    lines += [f"- {r['variant']}, seed {r['seed']}: `{r['command']}`" for r in rows]
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib missing, no plot (run with /usr/bin/python3)", file=sys.stderr)
        return
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for i, n in enumerate(names):
        losses = [r["val_loss"] for r in rows if r["variant"] == n]
        ax.barh(i, mean(losses), color="#8fb3d9")
        ax.plot(losses, [i] * len(losses), "k.", ms=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    lo = min(r["val_loss"] for r in rows)
    hi = max(r["val_loss"] for r in rows)
    ax.set_xlim(lo - 0.1 * (hi - lo + 0.01), hi + 0.1 * (hi - lo + 0.01))
    ax.set_xlabel(ylabel + " (bar: mean, dots: seeds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, plot_name), dpi=110)
