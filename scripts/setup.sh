#!/usr/bin/env bash
# Installs what building moe and its tests needs, from Debian's packages. Idempotent: when
# everything is there it installs nothing and does not touch the network.
# --python also installs what the Python scripts need (numpy, matplotlib, optuna) for
# Debian's /usr/bin/python3; scripts/py.sh finds that interpreter. --mpi installs Open MPI
# (mpirun and the headers): CMake then builds moe with MPI (mpirun -np N moe train).
set -euo pipefail
# MOE_EXTRA_PKGS (space-separated) adds packages, e.g. scripts/fuzz.sh asks for clang and
# libclang-rt-dev (libFuzzer and the sanitizer runtimes).
# shellcheck disable=SC2206
pkgs=(build-essential cmake libomp-dev libcli11-dev libspdlog-dev nlohmann-json3-dev catch2 ${MOE_EXTRA_PKGS:-})
for arg in "$@"; do
  case "$arg" in
    --python) pkgs+=(python3 python3-numpy python3-matplotlib python3-optuna) ;;
    --mpi) pkgs+=(openmpi-bin libopenmpi-dev) ;;
    *) echo "setup.sh: unknown option $arg (use --python and/or --mpi)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
