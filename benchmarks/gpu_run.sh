#!/usr/bin/env bash
# One prepared GPU session: CUDA correctness checks, then the overhead benchmark (eager, then compiled).
# Run from the repo root on a machine with torch, lightning and a CUDA GPU:  bash benchmarks/gpu_run.sh
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ghostnoise-gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
timeout 170 python3 benchmarks/cuda_checks.py 2>&1 | tee "$OUT/cuda_checks.txt"
timeout 120 python3 benchmarks/overhead.py --device cuda --repeats 30 2>&1 | tee "$OUT/overhead_cuda_eager.txt"
timeout 330 python3 benchmarks/overhead.py --device cuda --compile-only --repeats 30 --skip-layers 2>&1 | tee "$OUT/overhead_cuda_compiled.txt"
