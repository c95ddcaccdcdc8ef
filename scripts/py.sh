#!/usr/bin/env bash
# Runs a Python script of scripts/ with a python3 that has numpy, matplotlib and optuna.
# Tries $MOE_PYTHON, then python3 on PATH, then /usr/bin/python3 (Debian's, where
# scripts/setup.sh --python installs python3-numpy, python3-matplotlib and python3-optuna).
# Usage: scripts/py.sh SCRIPT.py [args...]
set -euo pipefail
for py in "${MOE_PYTHON:-}" python3 /usr/bin/python3; do
  [ -n "$py" ] || continue
  command -v "$py" > /dev/null 2>&1 || continue
  if "$py" -c "import numpy, matplotlib, optuna" > /dev/null 2>&1; then
    exec "$py" "$@"
  fi
done
echo "py.sh: no python3 with numpy, matplotlib and optuna found (tried \$MOE_PYTHON, python3, /usr/bin/python3);" \
     "on Debian run: bash scripts/setup.sh --python" >&2
exit 1
