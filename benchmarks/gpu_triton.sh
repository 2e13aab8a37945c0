#!/usr/bin/env bash
# The GPU checks and measurements, in two parts that each fit one 600 s call on a cold machine
# (inductor compiles each model). PART=1 (the default, about 8.5 minutes):
#   1. the kernel tests on CUDA (tests/test_kernels.py), the GBN/XBN backward kernels included, which
#      recompute the effective statistics from the kept ghost moments;
#   2. the eager ResNet-18 step at 224x224, batch 64 (a GPU-bound step), with saved and peak memory;
#   3. the layer cases (BatchNorm2d and LayerNorm) against plain autograd (fused=False);
#   4. the compiled step with CUDA graphs (mode="reduce-overhead") with GHOSTNOISE_COMPILED_KERNELS=1
#      (the opt-in coefficient kernels in compiled graphs) and, as the A/B, without; both with --profile:
#      GPU kernels per step, to set against benchmarks/compiled_kernels.py's GPU-free count (per layer,
#      forward and backward: gni 11, BN 5; on this ResNet-18 step at batch 64 with the custom ops:
#      gni 284, gbn 233 launches, BN 198).
# PART=2 (about 5.5 minutes): the CUDA-graphs and LayerNorm/GroupNorm correctness checks (cuda_checks.py); the
# host time of the custom ops (custom_op_overhead.py); the compiled default-mode step with
# GHOSTNOISE_COMPILED_KERNELS=1 for gni and gbn (time, and the peak memory with cudnn.benchmark off, with the
# step's own peak); the eager step of a LayerNorm net (TinyTransformer d384x6, bf16 autocast: GNI's
# recomputing LayerNorm path).
# Other GPU measurements (see docs/performance.md):
#   python3 benchmarks/launch_overhead.py
#   python3 benchmarks/host_overhead.py --device cuda [--cprofile gni]
#   python3 benchmarks/overhead.py --device cuda --repeats 20 --skip-layers --launch-ab [--profile]
#   python3 benchmarks/overhead.py --device cuda --compile-only --skip-layers --methods gni,gbn --repeats 20 --profile
# Run from the repo root on a machine with torch, triton, lightning and a CUDA GPU:
#   bash benchmarks/gpu_triton.sh            # part 1
#   PART=2 bash benchmarks/gpu_triton.sh     # part 2
# If the GPU machine has no pytest (and no network), carry pure-Python wheels along, made beforehand with
#   pip download --no-deps -d .gpu_wheels pytest iniconfig pluggy packaging
# A/B against the PyTorch fused path: GHOSTNOISE_TRITON=0 python3 benchmarks/overhead.py --device cuda
set -u
export PYTHONPATH=.:/tmp/gn-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ghostnoise-gpu}"; mkdir -p "$OUT"
PART="${PART:-1}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ "$PART" = 1 ]; then
  python3 -c "import pytest" 2>/dev/null || python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gn-site') for w in glob.glob('.gpu_wheels/*.whl')]"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -25 | tee "$OUT/kernel_tests_cuda.txt"
  timeout 60 python3 benchmarks/overhead.py --device cuda --repeats 10 --skip-layers --image-size 224 --batch 64 2>&1 | tee "$OUT/overhead_cuda_eager_224.txt"
  timeout 60 python3 benchmarks/overhead.py --device cuda --skip-models --plain-autograd --repeats 10 --methods gni,gbn 2>&1 | tee "$OUT/overhead_cuda_layers_plain_autograd.txt"
  GHOSTNOISE_COMPILED_KERNELS=1 timeout 170 python3 benchmarks/overhead.py --device cuda --compile-only --compile-mode reduce-overhead --skip-layers --methods gni,gbn --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_cudagraphs_compiled_kernels.txt"
  timeout 130 python3 benchmarks/overhead.py --device cuda --compile-only --compile-mode reduce-overhead --skip-layers --methods gni,gbn --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_cudagraphs_inductor.txt"
else
  timeout 120 python3 benchmarks/cuda_checks.py "CUDA graphs,LayerNorm/GroupNorm" 2>&1 | tee "$OUT/cuda_checks_cudagraphs.txt"
  timeout 40 python3 benchmarks/custom_op_overhead.py --device cuda 2>&1 | tee "$OUT/custom_op_overhead_cuda.txt"
  GHOSTNOISE_COMPILED_KERNELS=1 timeout 170 python3 benchmarks/overhead.py --device cuda --compile-only --skip-layers --methods gni,gbn --repeats 10 --no-cudnn-benchmark 2>&1 | tee "$OUT/overhead_cuda_compiled_kernels_peak.txt"
  timeout 45 python3 benchmarks/overhead.py --device cuda --model transformer --skip-layers --methods gni,analytic --repeats 10 2>&1 | tee "$OUT/overhead_cuda_transformer_eager.txt"
fi
