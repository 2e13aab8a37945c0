#!/usr/bin/env bash
# Set up (if needed) and run the main job: `ghostnoise compare`, plain BatchNorm against GBN and GNI on
# Fashion-MNIST over several seeds. Arguments go to it, e.g. `bash scripts/run.sh --subset 0 --epochs 15`
# (see `ghostnoise compare --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# CPU training: keep freed heap memory instead of returning it to the OS after every step (glibc),
# so that each step does not fault its activations' pages in afresh. On the 2-core machine this took
# the small ResNet-8 step from 85-115 ms to 71-78 ms (plain BN and ghost noise alike; see
# docs/performance.md). Both must be set: the trim threshold alone makes glibc mmap every large block.
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}" MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
exec "${GHOSTNOISE_VENV:-$ROOT/.venv}/bin/ghostnoise" compare "$@"
