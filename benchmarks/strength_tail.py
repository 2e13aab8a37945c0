"""Largest output magnitude of a ghost BatchNorm1d(64) layer at strength 1 and 2 (why MAX_STRENGTH is 2).

Run: ``python benchmarks/strength_tail.py``. Prints, per (method, N), the largest ``|y|`` over 100
batches of ``(256, 64)`` unit-Gaussian inputs in training mode (plain BatchNorm stays below about 5).
The scale noise enters as ``scale**-s``, so its rare small scales are amplified far faster than the
typical noise grows; docs/methods.md quotes this output.
"""

import warnings

import torch
from torch import nn

from lightning_ghostnoise import apply_ghost_noise


def largest_output(method: str, ghost_batch_size: int, strength: float, batches: int = 100) -> float:
    layer = apply_ghost_noise(
        nn.Sequential(nn.BatchNorm1d(64)), ghost_batch_size, method=method, strength=strength, seed=0
    )
    layer.train()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for _ in range(batches):
            worst = max(worst, layer(torch.randn(256, 64, generator=g)).abs().max().item())
    return worst


def main() -> None:
    warnings.simplefilter("ignore")  # the one-time warning about strength > 1
    torch.set_num_threads(1)
    print("method    N   max|y| s=1   max|y| s=2")
    for method, n in (("bn", 0), ("analytic", 2), ("xbn", 4), ("gni", 16)):
        if method == "bn":
            layer = nn.BatchNorm1d(64).train()
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                worst = max(layer(torch.randn(256, 64, generator=g)).abs().max().item() for _ in range(100))
            print(f"{'plain BN':9s} {'-':>2s} {worst:11.3g}")
            continue
        print(f"{method:9s} {n:2d} {largest_output(method, n, 1.0):11.3g} {largest_output(method, n, 2.0):12.3g}")


if __name__ == "__main__":
    main()
