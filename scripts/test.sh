#!/usr/bin/env bash
# Builds moe and runs every test. Exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The script tests need numpy, matplotlib and optuna; the MPI tests (tests/test_mpi.cpp) mpirun;
# the dashboard's browser test (tests/browser) cpp-httplib, chromium and the npm packages.
bash "$root/scripts/setup.sh" --python --mpi --serve
bash "$root/scripts/build.sh"
cd "$root/build"
ctest --output-on-failure -j "$(nproc)"
