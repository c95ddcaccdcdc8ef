#!/usr/bin/env python3
"""Hyperparameter sweeps over `moe train`.

  scripts/py.sh scripts/sweep.py SPEC.json [--out DIR] [--trials N] [--parallel P]

A spec (JSON) names a base config, the parameters to vary as dotted config paths, a method
and a budget; see configs/sweeps/ for examples:

  {
    "base": "configs/tiny.json",
    "params": {"router.num_experts": [1, 4, 8, 16],              (a list: these values)
               "optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": true},   (a range)
               "model.n_layer": {"low": 1, "high": 4, "int": true}},
    "method": "grid" | "random" | "bayes",   (bayes: Optuna's TPE sampler)
    "trials": 20,          (budget; grid: at most every combination)
    "parallel": 2,         (trials at once; each gets cores / parallel OpenMP threads)
    "seed": 0,
    "overrides": {"training.max_steps": 1000},      (applied to every trial)
    "pruner": {"warmup_steps": 500, "startup_trials": 3},  (optional: Optuna's median pruner)
    "out": "runs/sweeps/NAME"
  }

Optional, for searches at equal wall time and over linked settings:

    "budget": {"seconds": 120, "calibrate_steps": 30},
        Every trial gets the same wall time: a short calibration run (calibrate_steps steps)
        measures the trial's median step time, and max_steps is set to fill the seconds, so
        the lr schedule ends where the trial does. training.time_limit (1.25 x seconds)
        guards against a bad estimate.
    "objective": "eval",
        Score each trial by `moe eval` over the whole validation split on its last
        checkpoint, instead of the last in-training evaluation (a sample of eval_iters batches).
    "bundles": {"@balance": {"bias": {"router.bias_update_rate": 0.01},
                             "aux": {"router.aux_loss_coef": 0.01}}},
        A parameter whose name starts with @ sets no field itself; when it has a bundle, its
        value names a set of fields to apply.
    "derived": {"optimizer.min_lr": "p['optimizer.lr'] * p['@min_lr_ratio']",
                "model.n_head": "p['model.n_embed'] // 32"},
        Fields computed from the trial's parameters (a Python expression over p), applied last.
    "startup_trials": 10,
        Bayes: random trials before TPE takes over (Optuna's default 10).
    "enqueue": [{"optimizer.lr": 0.003, ...}],
        Bayes: known points to run first, each giving every parameter (skipped when already run).

Every trial runs in DIR/trial_NNN with its own derived config. Configs that `moe` rejects
(for example top_k > num_experts) are recorded as "invalid" and not trained. The study
lives in DIR/optuna.db: running the same command again resumes, skipping finished trials
and re-running the ones an interruption cut short. After every trial, DIR/results.json and
DIR/results.csv list every trial: parameters, status, final and best val loss, tokens/s,
wall time, total and active parameters.
"""
import argparse
import csv
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time


def stop_on_sigterm(signum, frame):
    """SIGTERM stops the sweep the way Ctrl-C does (installed before the slow imports)."""
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, stop_on_sigterm)

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from studylib import calibration_config, evaluate, median_step_ms, read_metrics, write_config  # noqa: E402  (scripts/ is on the path when this runs as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["trial", "status", "final_val_loss", "best_val_loss", "eval_loss", "tokens_per_s", "step_ms", "wall_s",
          "parameters", "active_parameters", "steps", "dir"]


def fail(msg):
    sys.exit(f"sweep: error: {msg}")


def set_dotted(cfg, path, value):
    section, _, key = path.partition(".")
    if not key:
        fail(f"parameter '{path}' must be a dotted config path such as router.num_experts")
    cfg.setdefault(section, {})[key] = value


def distributions(params):
    out = {}
    for name, spec in params.items():
        if isinstance(spec, list):
            if not spec:
                fail(f"parameter {name}: empty value list")
            out[name] = optuna.distributions.CategoricalDistribution(spec)
        elif isinstance(spec, dict) and "low" in spec and "high" in spec:
            if spec.get("int"):
                out[name] = optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]),
                                                                 log=bool(spec.get("log")))
            else:
                out[name] = optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                                   log=bool(spec.get("log")))
        else:
            fail(f"parameter {name}: give a list of values or a range {{\"low\": a, \"high\": b}}")
    return out


def plan(spec, dists):
    """The parameter sets grid and random search will run, in order (None for bayes)."""
    names = list(spec["params"])
    if spec["method"] == "grid":
        for n in names:
            if not isinstance(spec["params"][n], list):
                fail(f"grid search needs a list of values for {n}")
        return [dict(zip(names, combo)) for combo in itertools.product(*(spec["params"][n] for n in names))]
    if spec["method"] == "random":
        rng = random.Random(spec.get("seed", 0))
        out = []
        for _ in range(spec["trials"]):
            p = {}
            for n in names:
                d = dists[n]
                if isinstance(d, optuna.distributions.CategoricalDistribution):
                    p[n] = rng.choice(list(d.choices))
                elif isinstance(d, optuna.distributions.IntDistribution):
                    p[n] = rng.randint(d.low, d.high)
                elif d.log:
                    p[n] = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
                else:
                    p[n] = rng.uniform(d.low, d.high)
            out.append(p)
        return out
    return None


class Sweep:
    def __init__(self, spec, out, moe):
        self.spec, self.out, self.moe = spec, out, moe
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.procs = []
        self.dists = distributions(spec["params"])
        for name, bundle in spec.get("bundles", {}).items():
            d = self.dists.get(name)
            if not name.startswith("@") or not isinstance(d, optuna.distributions.CategoricalDistribution):
                fail(f"bundle {name}: needs a parameter of that name, starting with @, with a list of values")
            missing = [v for v in d.choices if str(v) not in bundle]
            if missing:
                fail(f"bundle {name}: no fields for value(s) {missing}")
        with open(resolve(spec["base"])) as f:
            self.base = json.load(f)
        data = self.base.get("data", {}).get("path", "data/tinyshakespeare.txt")
        self.base.setdefault("data", {})["path"] = os.path.abspath(data)
        for k, v in spec.get("overrides", {}).items():
            set_dotted(self.base, k, v)
        parallel = max(1, int(spec.get("parallel", 1)))
        self.threads = int(spec.get("threads_per_trial", max(1, (os.cpu_count() or 1) // parallel)))
        pr = spec.get("pruner")
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=int(pr.get("startup_trials", 3)),
                                              n_warmup_steps=int(pr.get("warmup_steps", 0)))
                  if pr else optuna.pruners.NopPruner())
        sampler = (optuna.samplers.TPESampler(seed=spec.get("seed", 0),
                                              n_startup_trials=int(spec.get("startup_trials", 10)))
                   if spec["method"] == "bayes" else None)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{os.path.join(out, 'optuna.db')}",
                                         load_if_exists=True, direction="minimize", sampler=sampler, pruner=pruner)
        # Trials an interruption cut short: failed, so they do not count; grid/random re-run them.
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            self.study.tell(t.number, state=TrialState.FAIL)
        self.todo = plan(spec, self.dists)
        finished = [t for t in self.study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if self.todo is not None:
            done = [t.params for t in finished]
            total = spec.get("trials", len(self.todo))
            self.todo = [p for p in self.todo if p not in done]
            self.budget = min(len(self.todo), max(0, total - len(finished)))
            self.todo = self.todo[:self.budget]
        else:
            self.budget = max(0, spec["trials"] - len(finished))
        # Bayes: known points to try first (each a full set of parameters), unless already run.
        self.first = [p for p in spec.get("enqueue", []) if p not in [t.params for t in finished]]
        for p in self.first:
            if set(p) != set(spec["params"]):
                fail(f"an enqueued trial must give every parameter: {sorted(spec['params'])}")
        if finished:
            print(f"sweep: resuming: {len(finished)} trial(s) finished, {self.budget} to run", file=sys.stderr)

    def next_trial(self):
        with self.lock:
            if self.budget <= 0 or self.stopping.is_set():
                return None
            self.budget -= 1
            if self.todo is not None:
                self.study.enqueue_trial(self.todo.pop(0))
            elif self.first:
                self.study.enqueue_trial(self.first.pop(0))
            return self.study.ask(self.dists)

    def run(self):
        """Runs the trials; returns False when interrupted (Ctrl-C or SIGTERM)."""
        parallel = max(1, int(self.spec.get("parallel", 1)))
        workers = [threading.Thread(target=self.worker) for _ in range(parallel)]
        for w in workers:
            w.start()
        try:
            # Sleep, not join: a KeyboardInterrupt that lands inside Thread.join can leave the
            # thread marked finished while it still runs (seen with Python 3.11: the trial
            # being stopped was never recorded).
            while any(w.is_alive() for w in workers):
                time.sleep(0.2)
        except KeyboardInterrupt:
            # Stop: no new trials; running ones get SIGINT (moe saves and exits) and are
            # recorded as interrupted, to run again on resume.
            self.stopping.set()
            print("sweep: interrupted; stopping the running trials", file=sys.stderr, flush=True)
            with self.lock:
                for proc in self.procs:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
            for w in workers:
                w.join()
        self.write_results()
        return not self.stopping.is_set()

    def worker(self):
        while True:
            trial = self.next_trial()
            if trial is None:
                return
            try:
                state, value = self.run_trial(trial)
            except TrialInterrupted:  # no status: it shows as interrupted and runs again on resume
                state, value = TrialState.FAIL, None
            except Exception as e:  # a crashed trial is recorded, the sweep goes on
                trial.set_user_attr("status", "failed")
                trial.set_user_attr("error", str(e))
                state, value = TrialState.FAIL, None
            with self.lock:
                self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
                self.write_results()

    def run_trial(self, trial):
        cfg = json.loads(json.dumps(self.base))
        apply_params(cfg, self.spec, trial.params)
        run_dir = os.path.join(self.out, f"trial_{trial.number:03d}")
        os.makedirs(run_dir, exist_ok=True)
        set_dotted(cfg, "training.threads", self.threads)
        set_dotted(cfg, "logging.out_dir", run_dir)
        cfg_path = os.path.join(run_dir, "trial_config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        trial.set_user_attr("dir", run_dir)
        label = ", ".join(f"{k}={v}" for k, v in trial.params.items())

        check = subprocess.run([self.moe, "train", "--config", cfg_path, "--dry-run"], capture_output=True, text=True)
        if check.returncode != 0:
            trial.set_user_attr("status", "invalid")
            trial.set_user_attr("error", (check.stderr or check.stdout).strip())
            print(f"sweep: trial {trial.number} ({label}): invalid: {check.stderr.strip()}", file=sys.stderr)
            return TrialState.PRUNED, None
        sizes = json.loads(check.stdout)
        trial.set_user_attr("parameters", sizes["parameters"])
        trial.set_user_attr("active_parameters", sizes["active_parameters"])
        if "budget" in self.spec:
            self.fit_budget(cfg, cfg_path, run_dir, trial, label)

        print(f"sweep: trial {trial.number} ({label}): training in {run_dir}", file=sys.stderr, flush=True)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        t0 = time.time()
        with open(os.path.join(run_dir, "train.log"), "w") as log:
            proc = self.launch([self.moe, "train", "--config", cfg_path, "--overwrite"], stdout=log,
                               stderr=subprocess.STDOUT)
            seen, pruned = 0, False
            while True:
                code = proc.poll()
                records = read_metrics(metrics_path)
                for r in records[seen:]:
                    if "val_loss" in r:
                        trial.report(r["val_loss"], r["step"])
                        if not pruned and trial.should_prune():
                            pruned = True
                            proc.send_signal(signal.SIGTERM)  # moe saves last.safetensors and exits 143
                seen = len(records)
                if code is not None:
                    break
                time.sleep(0.5)
        wall = time.time() - t0
        records = read_metrics(metrics_path)
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
        trial.set_user_attr("wall_s", wall)
        trial.set_user_attr("steps", max([r["step"] for r in records], default=0))
        if vals:
            trial.set_user_attr("final_val_loss", vals[-1])
            trial.set_user_attr("best_val_loss", min(vals))
        if speeds:
            trial.set_user_attr("tokens_per_s", speeds[len(speeds) // 2])
        if pruned:
            trial.set_user_attr("status", "pruned")
            print(f"sweep: trial {trial.number} pruned at val loss {vals[-1]:.4f}", file=sys.stderr)
            return TrialState.PRUNED, None
        if proc.returncode in (130, 143) or self.stopping.is_set():  # SIGINT / SIGTERM: moe saved and stopped
            raise TrialInterrupted()
        if proc.returncode != 0 or not vals:
            raise RuntimeError(f"moe train exited with {proc.returncode}; see {run_dir}/train.log")
        trial.set_user_attr("status", "done")
        score = vals[-1]
        if self.spec.get("objective") == "eval":
            score = evaluate(self.moe, os.path.join(run_dir, "last.safetensors"))["loss"]
            trial.set_user_attr("eval_loss", score)
        print(f"sweep: trial {trial.number} done: final val loss {vals[-1]:.4f}, best {min(vals):.4f}, "
              f"score {score:.4f}, {wall:.0f} s", file=sys.stderr, flush=True)
        return TrialState.COMPLETE, score

    def launch(self, cmd, **popen_args):
        """Starts a moe process that a stop (Ctrl-C, SIGTERM) reaches: listed for run()'s SIGINT,
        or signalled at once when the stop came first."""
        proc = subprocess.Popen(cmd, **popen_args)
        with self.lock:
            self.procs.append(proc)
            if self.stopping.is_set():
                proc.send_signal(signal.SIGINT)
        return proc

    def fit_budget(self, cfg, cfg_path, run_dir, trial, label):
        """Sets max_steps so the trial fills the budget's seconds, from a short timed run."""
        budget = self.spec["budget"]
        seconds, n = float(budget["seconds"]), int(budget.get("calibrate_steps", 30))
        cal_path = write_config(calibration_config(cfg, n, os.path.join(run_dir, "calibrate")),
                                os.path.join(run_dir, "calibrate_config.json"))
        proc = self.launch([self.moe, "train", "--config", cal_path, "--overwrite"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        text = proc.communicate()[0]
        if self.stopping.is_set():  # interrupted while calibrating: run the trial again on resume
            raise TrialInterrupted()
        step_ms = median_step_ms(text)
        if proc.returncode != 0 or step_ms is None:
            raise RuntimeError(f"calibration run failed: {text.strip()[-500:]}")
        steps = max(1, int(seconds * 1000 / step_ms))
        set_dotted(cfg, "training.max_steps", steps)
        set_dotted(cfg, "training.time_limit", 1.25 * seconds)
        write_config(cfg, cfg_path)
        trial.set_user_attr("step_ms", step_ms)
        print(f"sweep: trial {trial.number} ({label}): {step_ms:.1f} ms/step, {steps} steps in {seconds:.0f} s",
              file=sys.stderr, flush=True)

    def write_results(self):
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            # A failed trial without a status of its own was cut short by an interruption.
            row = {"trial": t.number, "status": t.user_attrs.get("status", "interrupted")}
            row.update({k: t.params.get(k) for k in self.spec["params"]})
            for k in FIELDS[2:]:
                row[k] = t.user_attrs.get(k)
            if "error" in t.user_attrs:
                row["error"] = t.user_attrs["error"]
            rows.append(row)
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump({"spec": self.spec, "trials": rows}, f, indent=2)
        cols = ["trial", "status", *self.spec["params"], *FIELDS[2:], "error"]
        with open(os.path.join(self.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


class TrialInterrupted(Exception):
    """moe train stopped on a signal: the trial runs again on resume."""


def apply_params(cfg, spec, params):
    """A trial's parameters into its config: dotted fields, @ bundles, then derived fields."""
    bundles = spec.get("bundles", {})
    for k, v in params.items():
        if k.startswith("@"):
            if k in bundles:
                for field, value in bundles[k][str(v)].items():
                    set_dotted(cfg, field, value)
        else:
            set_dotted(cfg, k, v)
    for field, expr in spec.get("derived", {}).items():
        set_dotted(cfg, field, eval(expr, {"__builtins__": {}, "int": int, "round": round, "max": max, "min": min},
                                    {"p": params}))


def resolve(path):
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--out", help="sweep directory (default: the spec's out)")
    ap.add_argument("--trials", type=int, help="override the spec's trial budget")
    ap.add_argument("--parallel", type=int, help="override the spec's parallel")
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    args = ap.parse_args()
    try:
        with open(resolve(args.spec)) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read the spec {args.spec}: {e}")
    for k in ("base", "params", "method"):
        if k not in spec:
            fail(f"the spec has no '{k}'")
    if spec["method"] not in ("grid", "random", "bayes"):
        fail(f"method must be grid, random or bayes, got {spec['method']!r}")
    if args.trials is not None:
        spec["trials"] = args.trials
    if args.parallel is not None:
        spec["parallel"] = args.parallel
    if spec["method"] != "grid" and "trials" not in spec:
        fail(f"{spec['method']} search needs a trial budget ('trials')")
    if not os.access(args.moe, os.X_OK):
        fail(f"{args.moe} is not an executable; build first (bash scripts/build.sh)")
    out = args.out or spec.get("out") or os.path.join("runs", "sweeps", os.path.splitext(os.path.basename(args.spec))[0])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump(spec, f, indent=2)
    finished = Sweep(spec, out, args.moe).run()
    print(f"sweep: results in {out}/results.csv and {out}/results.json", file=sys.stderr)
    if not finished:
        print("sweep: run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before any trial started
        print("sweep: interrupted", file=sys.stderr)
        sys.exit(130)
