"""Host cost of one kernel launch (CUDA): Triton's launch, the package's cached launch, and PyTorch ops.

In eager mode a small model's training step on a GPU is bound by the host: what each launch costs
in Python decides the step time. This prints the host time per call (median over blocks of calls,
launches are asynchronous) of:

* ``torch.empty`` and a small PyTorch op (``x * 2``), for scale;
* ``kernels.affine`` and ``kernels.gni_coefficients`` (allocation + one launch), with the cached
  launch (``kernels.FAST_LAUNCH``) and through Triton's ``kernel[grid](...)``;
* the bare compiled kernel's ``run`` with every argument prepared (the floor of a Triton launch).

    python benchmarks/launch_overhead.py   # needs CUDA and Triton
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch

from lightning_ghostnoise import kernels as K


def per_call(fn: Callable[[], object], calls: int = 500, blocks: int = 7) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(blocks):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    x = torch.randn(8, 16, 4, 4, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    lay = K.layout(x)
    assert lay is not None, "the kernels do not take this tensor (is Triton available?)"
    w, b = torch.ones(16, device=dev), torch.zeros(16, device=dev)
    rm, rv = torch.zeros(16, device=dev), torch.ones(16, device=dev)
    s = torch.ones((), device=dev)
    idx = torch.randint(0, 8, (8, 4), device=dev)
    mv = K.moments(x, lay)
    coef, _ = K.gni_coefficients(mv, w, b, rm, rv, s, 128, 0.1, 1e-5, True, True, indices=idx)

    def coefficients() -> object:
        return K.gni_coefficients(mv, w, b, rm, rv, s, 128, 0.1, 1e-5, True, True, indices=idx)

    block_c, block_s = K._blocks(lay.c, lay.s, lay.sc == 1)
    grid = (lay.b, K._cdiv(lay.c, block_c), K._cdiv(lay.s, block_s))
    y = torch.empty_like(x)
    args = (x, y, coef, lay.b, lay.c, lay.s, lay.sb, lay.sc, lay.ss)
    compiled = K._affine_kernel[grid](*args, BLOCK_C=block_c, BLOCK_S=block_s)
    stream = torch.cuda.current_stream().cuda_stream
    results: Dict[str, float] = {}
    results["torch.empty(2, 8, 16)"] = per_call(lambda: torch.empty(2, 8, 16, device=dev))
    results["torch op x * 2"] = per_call(lambda: x * 2)
    results["triton kernel[grid](...) affine"] = per_call(
        lambda: K._affine_kernel[grid](*args, BLOCK_C=block_c, BLOCK_S=block_s)
    )
    results["compiled.run(...) affine (floor)"] = per_call(
        lambda: compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                             None, None, None, *args, block_c, block_s)
    )  # fmt: skip
    for fast in (False, True):
        K.FAST_LAUNCH = fast
        label = "cached launch" if fast else "triton launch"
        results[f"kernels.affine, {label}"] = per_call(lambda: K.affine(x, lay, coef))
        results[f"kernels.gni_coefficients, {label}"] = per_call(coefficients)
    print(f"# torch {torch.__version__}, triton {K.triton.__version__}, {torch.cuda.get_device_name()}: host time per call")
    for name, t in results.items():
        print(f"launch {name:<42} {t * 1e6:7.1f}us")


if __name__ == "__main__":
    main()
