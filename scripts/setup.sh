#!/usr/bin/env bash
# Installs what building moe and its tests needs, from Debian's packages. Idempotent: when
# everything is there it installs nothing and does not touch the network.
# --python also installs what the Python scripts need (numpy, matplotlib, optuna) for
# Debian's /usr/bin/python3; scripts/py.sh finds that interpreter. --mpi installs Open MPI
# (mpirun and the headers): CMake then builds moe with MPI (mpirun -np N moe train).
# --serve installs what `moe serve` and its browser test need: cpp-httplib, chromium, node and
# npm (Debian's, when no node is on PATH), then the front end's npm packages (uPlot,
# playwright-core) as pinned in src/serve/web/package-lock.json, with npm ci.
set -euo pipefail
# MOE_EXTRA_PKGS (space-separated) adds packages, e.g. scripts/fuzz.sh asks for clang and
# libclang-rt-dev (libFuzzer and the sanitizer runtimes).
# shellcheck disable=SC2206
pkgs=(build-essential cmake libomp-dev libcli11-dev libspdlog-dev nlohmann-json3-dev catch2 ${MOE_EXTRA_PKGS:-})
serve=0
for arg in "$@"; do
  case "$arg" in
    --python) pkgs+=(python3 python3-numpy python3-matplotlib python3-optuna) ;;
    --mpi) pkgs+=(openmpi-bin libopenmpi-dev) ;;
    --serve)
      serve=1
      pkgs+=(libcpp-httplib-dev pkg-config chromium)
      command -v node > /dev/null 2>&1 || pkgs+=(nodejs)
      command -v npm > /dev/null 2>&1 || pkgs+=(npm)
      ;;
    *) echo "setup.sh: unknown option $arg (use --python, --mpi and/or --serve)" >&2; exit 2 ;;
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
if [ "$serve" = 1 ]; then
  web=$(cd "$(dirname "$0")/../src/serve/web" && pwd)
  # npm ci again only when the lock file changed since the last install.
  if ! cmp -s "$web/package-lock.json" "$web/node_modules/.moe-package-lock.json" 2> /dev/null; then
    echo "setup: npm ci in $web"
    (cd "$web" && npm ci --no-audit --no-fund && cp package-lock.json node_modules/.moe-package-lock.json)
  fi
fi
