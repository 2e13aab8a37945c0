#!/usr/bin/env bash
# Set up (if needed) and run the main job: the demo, plain BatchNorm vs ghost noise on Fashion-MNIST.
# Arguments go to the demo, e.g. `bash scripts/run.sh --epochs 1 --subset 2000` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${GHOSTNOISE_VENV:-$ROOT/.venv}/bin/python" -m lightning_ghostnoise.demo "$@"
