#!/usr/bin/env bash
# One prepared GPU session for the Triton kernels: the kernel tests on CUDA, the eager benchmark with
# the kernels (batch 256 with a kernel profile, and batch 1024), the synchronization check, and the
# compiled GNI step with its kernel profile.
# Run from the repo root on a machine with torch, triton, lightning and a CUDA GPU:
#   bash benchmarks/gpu_triton.sh
# If the GPU machine has no pytest (and no network), carry pure-Python wheels along, made beforehand with
#   pip download --no-deps -d .gpu_wheels pytest iniconfig pluggy packaging
# A/B against the PyTorch fused path: GHOSTNOISE_TRITON=0 python3 benchmarks/overhead.py --device cuda
set -u
export PYTHONPATH=.:/tmp/gn-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ghostnoise-gpu}"; mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 -c "import pytest" 2>/dev/null || python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gn-site') for w in glob.glob('.gpu_wheels/*.whl')]"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -25 | tee "$OUT/kernel_tests_cuda.txt"
timeout 100 python3 benchmarks/overhead.py --device cuda --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_eager_triton.txt"
timeout 70 python3 benchmarks/overhead.py --device cuda --repeats 10 --skip-layers --batch 1024 2>&1 | tee "$OUT/overhead_cuda_eager_b1024.txt"
timeout 40 python3 benchmarks/cuda_checks.py "synchronization,agree" 2>&1 | tee "$OUT/cuda_checks_triton.txt"
timeout 240 python3 benchmarks/overhead.py --device cuda --compile-only --skip-layers --methods gni,gbn --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_compiled_profile.txt"
