#!/usr/bin/env bash
# The main job: build moe, fetch tiny Shakespeare, train on a config (default
# configs/tiny.json), then print a sample from the best checkpoint.
# Usage: scripts/main.sh [CONFIG]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-configs/tiny.json}
bash "$root/scripts/build.sh"
bash "$root/data/get_data.sh"
cd "$root"
out=runs/$(basename "$config" .json)
./build/moe train --config "$config" --out "$out" --overwrite
./build/moe generate --checkpoint "$out/best.safetensors" --prompt "ROMEO:" --max-new-tokens 300 --seed 1
