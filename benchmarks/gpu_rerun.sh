#!/usr/bin/env bash
# A shorter GPU session after a change: the synchronization and fused-path checks, then the model
# benchmark (eager: every method; compiled: BN, GNI, GBN).
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ghostnoise-gpu}"; mkdir -p "$OUT"
timeout 60 python3 benchmarks/cuda_checks.py "agree" 2>&1 | tee "$OUT/cuda_checks_rerun.txt"
timeout 60 python3 benchmarks/cuda_checks.py "synchronization" 2>&1 | tee -a "$OUT/cuda_checks_rerun.txt"
timeout 90 python3 benchmarks/overhead.py --device cuda --repeats 30 --skip-layers 2>&1 | tee "$OUT/overhead_cuda_eager_rerun.txt"
timeout 200 python3 benchmarks/overhead.py --device cuda --compile-only --skip-layers --methods gni,gbn --repeats 30 2>&1 | tee "$OUT/overhead_cuda_compiled_rerun.txt"
