"""Host-side cost of one ghost layer's forward + backward on a tiny tensor, relative to plain BN.

On a GPU in eager mode a small model's step is bound by kernel launches, i.e. by this host-side cost
(Python, dispatch, one launch per op), not by the arithmetic. A tiny CPU tensor measures it without
a GPU: the arithmetic is negligible, what remains is the per-op overhead.

    python benchmarks/host_overhead.py                # CPU tensor
    python benchmarks/host_overhead.py --device cuda  # CUDA tensor: host time per call (launches are async)
    python benchmarks/host_overhead.py --stub-kernels # CPU: the Triton path's Python with no-op launches
                                                      # (a GPU-free proxy for its host cost, launches excluded)
    python benchmarks/host_overhead.py --device cuda --cprofile gni  # and where a GNI layer's host time goes
    GHOSTNOISE_FAST_LAUNCH=0 python benchmarks/host_overhead.py --device cuda  # Triton's own launch path
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch

from lightning_ghostnoise import apply_ghost_noise, config


def stub_kernel_launches() -> None:
    """Route CPU tensors through the Triton backend, with every kernel launch a no-op (the launcher too)."""
    from lightning_ghostnoise.backends import dispatch
    from lightning_ghostnoise.backends.triton import launcher

    if not hasattr(dispatch, "_INTERPRETER"):
        raise SystemExit(
            "--stub-kernels: lightning_ghostnoise.backends.dispatch._INTERPRETER is gone; update this script"
        )
    launcher.launch = lambda *args, **kwargs: None
    dispatch._INTERPRETER = True  # the Triton backend takes CPU tensors, as under Triton's interpreter
    config.set_backend("triton")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stub-kernels", action="store_true", help="CPU: Triton path with no-op launches")
    parser.add_argument(
        "--cprofile", metavar="METHOD", help="then profile this method's layer (cProfile, top functions)"
    )
    parser.add_argument("--calls", type=int, default=300, help="timed calls per method (median)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.stub_kernels:
        stub_kernel_launches()
    torch.set_num_threads(1)
    bn = torch.nn.BatchNorm2d(16).to(device)
    x = torch.randn(8, 16, 4, 4, dtype=torch.bfloat16, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    layers = {"bn": bn}
    for method in ("gni", "analytic", "gbn", "xbn"):
        layers[method] = apply_ghost_noise(copy.deepcopy(bn), 4, method=method)
    layers = {k: m.to(torch.bfloat16) for k, m in layers.items()}
    times = {k: [] for k in layers}
    for layer in layers.values():
        for _ in range(20):
            layer(x).backward(grad)
    for _ in range(args.calls):
        for name, layer in layers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()  # an empty queue: the call below measures the host alone
            start = time.perf_counter()
            layer(x).backward(grad)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, one thread"
    if args.stub_kernels:
        where += ", Triton path with no-op launches"
    if device.type == "cuda" or args.stub_kernels:
        where += (
            f", backend {config.get_backend()}, cached Triton launch {'on' if config.settings().fast_launch else 'off'}"
        )
    print(f"# torch {torch.__version__}, {where}, BatchNorm2d(16) on (8, 16, 4, 4) bf16 channels_last")
    for name, t in med.items():
        print(f"host layer fwd+bwd method={name:<8} {t * 1e6:7.0f}us ratio={t / med['bn']:.2f}")
    if args.cprofile:
        layer = layers[args.cprofile]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            layer(x).backward(grad)
        profiler.disable()
        print(
            f"# cProfile, method={args.cprofile}, {args.calls} calls of fwd+bwd (times include the profiler's own cost)"
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
