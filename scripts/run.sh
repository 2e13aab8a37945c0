#!/usr/bin/env bash
# Set up (if needed) and run the main job: `ghostnoise compare` on the small ViT (LayerNorm) against the
# same ViT with Ghost Noise Injection (N = 4, the size the study selected on validation), 5 paired seeds,
# 2000 Fashion-MNIST training images, 30 epochs: the regime of docs/results.md where GNI's gain in test
# accuracy is significant. Arguments go to `ghostnoise compare` after these and override them, e.g.
# `bash scripts/run.sh --seeds 3` or `bash scripts/run.sh --model resnet8 --methods plain gbn gni@16`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# CPU training: keep freed heap memory instead of returning it to the OS after every step (glibc),
# so that each step does not fault its activations' pages in afresh. On the 2-core machine this took
# every step, plain BN's and ghost noise's alike, about a quarter faster (docs/performance.md). Both must be set: the trim threshold alone makes glibc mmap every large block.
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}" MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
exec "${GHOSTNOISE_VENV:-$ROOT/.venv}/bin/ghostnoise" compare --model vit --methods plain gni@4 --subset 2000 \
  --val-size 2000 --epochs 30 --eval-every 10 --seeds 5 "$@"
