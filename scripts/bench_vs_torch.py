#!/usr/bin/env python3
"""moe and its PyTorch twin timed side by side on one config, on 1 and on 2 cores.

  /usr/bin/python3 scripts/bench_vs_torch.py [--config configs/makemoe.json] [--steps 20]

Runs `moe bench` and `scripts/torch_twin.py bench` alternately in one go (timings on a
shared machine drift, so only ratios measured together mean much) and prints a table.
The twin needs torch: run this with a Python that has it (Debian: /usr/bin/python3 after
apt-get install python3-torch). Without torch only moe's figures are printed.

Debian's torch calls the system BLAS (BLAS_INFO=generic): with only libblas3 installed that
is the reference BLAS, about 9 times slower on makemoe.json (1300 against 143 ms a step),
so the script stops unless OpenBLAS is what libblas.so.3 resolves to (apt-get install
libopenblas0-pthread, or scripts/bench_gemm.sh which installs it); --any-blas times anyway.

OpenBLAS (the pthreads build) runs its products on every core whatever torch's own thread
count: `torch_twin.py bench --threads 1` is one torch thread with OpenBLAS on both cores of a
2-core machine (about 1.8 cores busy), PyTorch's fastest setting here. So the twin runs three
ways: on one core (--threads 1, OPENBLAS_NUM_THREADS=1) beside `moe bench --threads 1`, and
with --threads 1 and --threads 2 (OpenBLAS as it comes) beside `moe bench --threads 2`; the
last line compares each side's best.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def run_json(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def system_blas():
    """The library Debian's libblas.so.3 alternative points at, or None off Debian."""
    for lib in ("/usr/lib/x86_64-linux-gnu/libblas.so.3", "/usr/lib/aarch64-linux-gnu/libblas.so.3"):
        if os.path.exists(lib):
            return os.path.realpath(lib)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/makemoe.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--moe", default=os.path.join(ROOT, "build", "moe"))
    ap.add_argument("--any-blas", action="store_true", help="time PyTorch whatever BLAS it calls")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not importable by this Python: timing moe only", file=sys.stderr)
    blas = system_blas()
    if have_torch:
        print(f"PyTorch {torch.__version__}, system BLAS {blas or 'unknown'}")
        if blas and "openblas" not in blas and not args.any_blas:
            sys.exit(f"bench_vs_torch: libblas.so.3 is {blas}, not OpenBLAS: PyTorch would not run at its best "
                     "(apt-get install libopenblas0-pthread, or pass --any-blas)")
    # (cores, the moe threads too; [(PyTorch's setting, torch threads, extra environment)])
    plan = [(1, [("1 thread, OPENBLAS_NUM_THREADS=1", 1, {"OPENBLAS_NUM_THREADS": "1"})]),
            (2, [("1 thread, OpenBLAS on every core", 1, {}), ("2 threads", 2, {})])]
    rows = []
    for cores, settings in plan:
        m = run_json([args.moe, "bench", "--config", args.config, "--steps", str(args.steps),
                      "--threads", str(cores), "--generate", "0", "--json"])
        runs = []
        if have_torch:
            for name, torch_threads, env in settings:
                t = run_json([sys.executable, os.path.join(ROOT, "scripts", "torch_twin.py"), "bench", "--config",
                              args.config, "--steps", str(args.steps), "--threads", str(torch_threads)], env)
                runs.append((name, t["median_ms"]))
        rows.append((cores, m, runs))
    print(f"{args.config}: median training step (forward, backward, AdamW), {args.steps} timed steps")
    print("| cores | moe ms | PyTorch ms (its setting) | PyTorch / moe |")
    print("|---|---|---|---|")
    for cores, m, runs in rows:
        moe_ms = m["step_ms_median"]
        if runs:
            name, best = min(runs, key=lambda r: r[1])
            others = "; ".join(f"{n}: {ms:.1f}" for n, ms in runs if n != name)
            tm = f"{best:.1f} ({name}{'; ' + others if others else ''})"
            ratio = f"{best / moe_ms:.2f}x"
        else:
            tm, ratio = "-", "-"
        print(f"| {cores} | {moe_ms:.1f} (--threads {cores}) | {tm} | {ratio} |")
    if have_torch:
        name, best_t = min(((n, ms) for _, _, runs in rows for n, ms in runs), key=lambda r: r[1])
        best_m = min(m["step_ms_median"] for _, m, _ in rows)
        print(f"best of each side: moe {best_m:.1f} ms, PyTorch {best_t:.1f} ms ({name}), ratio {best_t / best_m:.2f}x")

if __name__ == "__main__":
    main()
