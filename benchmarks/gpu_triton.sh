#!/usr/bin/env bash
# The GPU tests and the GPU rows of docs/performance.md, on a machine with a CUDA GPU, torch and triton.
# Two parts that each fit in about ten minutes on a cold machine (inductor compiles each model):
#   bash benchmarks/gpu_triton.sh            # part 1: GPU tests; eager ResNet-18 steps (batch 256 with the
#                                            # launch A/B and a profile, batch 1024); the PyTorch path
#   PART=2 bash benchmarks/gpu_triton.sh     # part 2: the compiled step (default mode and CUDA graphs), with
#                                            # and without the coefficient kernels as custom ops; host time
# Outputs go to $OUT (default /tmp/ghostnoise-gpu), one file per command, named as in docs/results/.
# If the GPU machine has no pytest (and no network), carry pure-Python wheels along, made beforehand with
#   pip download --no-deps -d .gpu_wheels pytest iniconfig pluggy packaging
# GPU_TESTS overrides which tests part 1 runs (default: the tests marked gpu).
set -u
export PYTHONPATH=.:/tmp/gn-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ghostnoise-gpu}"; mkdir -p "$OUT"
PART="${PART:-1}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
if [ "$PART" = 1 ]; then
  python3 -c "import pytest" 2>/dev/null || python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gn-site') for w in glob.glob('.gpu_wheels/*.whl')]"
  timeout 200 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:--m gpu tests} 2>&1 | tail -25 | tee "$OUT/kernel_tests_cuda.txt"
  timeout 120 python3 benchmarks/overhead.py --device cuda --repeats 20 --launch-ab --profile 2>&1 | tee "$OUT/overhead_cuda_eager_cached_launch.txt"
  timeout 60 python3 benchmarks/overhead.py --device cuda --repeats 10 --skip-layers --batch 1024 2>&1 | tee "$OUT/overhead_cuda_eager_b1024.txt"
  GHOSTNOISE_TRITON=0 timeout 60 python3 benchmarks/overhead.py --device cuda --repeats 10 --skip-layers --methods gni,gbn 2>&1 | tee "$OUT/overhead_cuda_eager_pytorch_path.txt"
  timeout 60 python3 benchmarks/host_overhead.py --device cuda --cprofile gni 2>&1 | tee "$OUT/host_overhead_cuda.txt"
else
  timeout 170 python3 benchmarks/overhead.py --device cuda --compile-only --compile-mode reduce-overhead --skip-layers --methods gni,gbn --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_cudagraphs_inductor.txt"
  GHOSTNOISE_COMPILED_KERNELS=1 timeout 170 python3 benchmarks/overhead.py --device cuda --compile-only --compile-mode reduce-overhead --skip-layers --methods gni,gbn --repeats 20 --profile 2>&1 | tee "$OUT/overhead_cuda_cudagraphs_compiled_kernels.txt"
  GHOSTNOISE_COMPILED_KERNELS=1 timeout 170 python3 benchmarks/overhead.py --device cuda --compile-only --skip-layers --methods gni,gbn --repeats 10 --no-cudnn-benchmark 2>&1 | tee "$OUT/overhead_cuda_compiled_kernels_peak.txt"
  timeout 45 python3 benchmarks/overhead.py --device cuda --model transformer --skip-layers --methods gni,analytic --repeats 10 2>&1 | tee "$OUT/overhead_cuda_transformer_eager.txt"
fi
