"""Host time of a call of the coefficient kernels as custom ops (``GHOSTNOISE_COMPILED_KERNELS=1``).

In a compiled graph (``lightning_ghostnoise.ops``) the forward and backward coefficient kernels are
called through PyTorch's dispatcher as ``torch.ops.ghostnoise.*``. This prints, per op, the host
time of that call against calling the kernel's Python function directly, and the same for a custom
op that declares a mutated argument (as the forward ops formerly did, for the running
statistics): torch.library's step for mutated arguments is what that costs. Calls are made under
``torch.no_grad()``, as a compiled graph runs them.

    python benchmarks/custom_op_overhead.py                # CPU: launches stubbed (Python and dispatch only)
    python benchmarks/custom_op_overhead.py --device cuda  # CUDA: the real launches (host time; they are async)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Optional, Tuple

if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before lightning_ghostnoise defines the kernels

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_ghostnoise import kernels, ops  # noqa: E402


def best_of(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """The fastest round's mean time per call, in microseconds."""
    for _ in range(min(200, calls)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


@torch.library.custom_op("ghostnoise_benchmark::mutating_gni_coefficients", mutates_args=("running_mean", "running_var"))
def _mutating_gni_coefficients(
    mv: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, strength: Tensor,
    count: int, momentum: float, eps: float, shift_noise: bool, scale_noise: bool, indices: Optional[Tensor] = None,
    noise_eps: float = 1e-3, normal: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
    ghost_batch_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """The forward op's former, mutating form (the same 16 arguments): the running statistics updated in
    place by the kernel."""
    return kernels.gni_coefficients(
        mv, weight, bias, running_mean, running_var, strength, count, momentum, eps, shift_noise, scale_noise,
        indices=indices, noise_eps=noise_eps, normal=normal, gamma=gamma, ghost_batch_size=ghost_batch_size,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--calls", type=int, default=4000, help="calls per round (5 rounds, the best is kept)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        kernels.ALLOW_CPU = True
        kernels._launch = lambda *a, **k: None  # Python and dispatch only: nothing is launched
    batch, channels = args.batch, args.channels
    gen = torch.Generator().manual_seed(0)
    mv = torch.stack([torch.randn(batch, channels, generator=gen), torch.rand(batch, channels, generator=gen) + 0.5]).to(device)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    rm, rv = torch.zeros(channels, device=device), torch.ones(channels, device=device)
    s = torch.tensor(0.7, device=device)
    idx = torch.randint(0, batch, (batch, 16), generator=gen).to(device)
    r = torch.randn(2, batch, channels, generator=gen).to(device)
    coef, stats = kernels.gni_coefficients(mv, w, b, None, None, s, 2, 0.0, 1e-5, True, True, indices=idx)
    per_sample, per_channel = kernels.ghost_statistics_coefficients(mv, w, b, None, None, s, 2, 0.0, 1e-5, 4, False, True, True)
    n = 96
    cases = {
        "gni_coefficients": (
            lambda: kernels.gni_coefficients(mv, w, b, None, None, s, 2, 0.0, 1e-5, True, True, indices=idx),
            lambda: ops.gni_coefficients(mv, w, b, s, 1e-5, True, True, indices=idx),
        ),
        "gni_coefficients, mutating (former form)": (
            lambda: kernels.gni_coefficients(mv, w, b, rm, rv, s, n, 0.1, 1e-5, True, True, indices=idx),
            lambda: _mutating_gni_coefficients(mv, w, b, rm, rv, s, n, 0.1, 1e-5, True, True, indices=idx),
        ),
        "gni_input_coefficients": (
            lambda: kernels.gni_input_coefficients(r, coef, stats, w, n),
            lambda: ops.gni_input_coefficients(r, coef, stats, w, n),
        ),
        "ghost_statistics_coefficients": (
            lambda: kernels.ghost_statistics_coefficients(mv, w, b, None, None, s, 2, 0.0, 1e-5, 4, False, True, True),
            lambda: ops.ghost_statistics_coefficients(mv, w, b, s, 1e-5, 4, False, True, True),
        ),
        "ghost_statistics_input_coefficients": (
            lambda: kernels.ghost_statistics_input_coefficients(r, mv, per_sample, per_channel, s, 12, 1e-5, 4, False, True, True),
            lambda: ops.ghost_statistics_input_coefficients(r, mv, per_sample, per_channel, s, 12, 1e-5, 4, False, True, True),
        ),
    }
    where = "CUDA, launches real" if device.type == "cuda" else "CPU, launches stubbed"
    print(f"# torch {torch.__version__}, {where}, (B, C) = ({batch}, {channels}), under torch.no_grad()", flush=True)
    with torch.no_grad():
        for name, (direct, op) in cases.items():
            t_direct, t_op = best_of(direct, args.calls), best_of(op, args.calls)
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"op {name:<46} direct={t_direct:6.1f}us custom_op={t_op:6.1f}us dispatch={t_op - t_direct:6.1f}us", flush=True)


if __name__ == "__main__":
    main()
