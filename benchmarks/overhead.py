"""Cost of ghost noise relative to plain BatchNorm, measured side by side in one run.

For every method (gni, gbn, xbn, analytic) and plain BN this prints, per case, the median time of a
training step (forward + backward + SGD step) or a single layer's forward + backward, the ratio to
plain BN measured in the same run (interleaved repeats in shuffled order, so machine noise hits
all alike; ``spread`` gives the quartiles of the per-repeat ratios), the
activation memory (bytes of tensors saved for backward), the peak memory of a step (CUDA: ``peak``,
the peak allocated memory, and ``step_peak``, that peak above what was held before the step; CPU:
``step_peak``, from the profiler's allocation events),
and under ``torch.compile`` the number of graph breaks.

Usage:
    python benchmarks/overhead.py                      # CPU: small ResNet, 1x28x28, batch 128
    python benchmarks/overhead.py --device cuda        # CUDA: ResNet-18, 3x32x32, batch 256, bf16, channels_last
    python benchmarks/overhead.py --compile            # add torch.compile cases
    python benchmarks/overhead.py --device cuda --compile-only --compile-mode reduce-overhead  # CUDA graphs
    GHOSTNOISE_COMPILED_KERNELS=1 python benchmarks/overhead.py --device cuda --compile-only  # coefficient kernels in the graph
    python benchmarks/overhead.py --quick              # fewer repeats (smoke test)
    python benchmarks/overhead.py --skip-models --plain-autograd   # layers: fused paths against plain autograd
    python benchmarks/overhead.py --model transformer  # a LayerNorm net (TinyTransformer): GNI, analytic vs plain LN
    python benchmarks/overhead.py --skip-models --ln-shape 128,196,384   # a larger LayerNorm layer
    python benchmarks/overhead.py --skip-models --bn-shape 128,16,28,28 128,64,7,7  # other BatchNorm2d layers

Every line ends with ``ratio=X.XXX`` (time relative to the plain model or layer, BN or LN, in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from lightning_ghostnoise import apply_ghost_noise, config
from lightning_ghostnoise.experiments.models import TinyTransformer, resnet18_cifar, small_resnet

METHODS = ("bn", "gni", "gbn", "xbn", "analytic")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn`` (activation memory)."""
    total = 0
    seen = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return total


def cpu_step_peak_bytes(step: Callable[[], None]) -> int | None:
    """CPU: the most memory torch held during ``step`` above what it held at its start, in bytes.

    Read from the profiler's allocation events (``profile_memory=True``), summed in time order;
    ``None`` (with a message) if this torch's profiler does not give them.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        cpu = torch.autograd.DeviceType.CPU
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
        held = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            held += e.nbytes()
            peak = max(peak, held)
        return peak
    except Exception as err:  # noqa: BLE001  (reported, not hidden: one failed measurement must not stop the others)
        print(f"  (CPU peak memory failed: {type(err).__name__}: {err})")
        return None


class Timings:
    """Interleaved timings: each round runs every step once, in a shuffled order (seeded), so that
    drifts of the machine hit all cases alike and no case always follows the same one."""

    def __init__(self, steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in steps}
        order = list(steps)
        shuffle = random.Random(0).shuffle
        for _ in range(repeats):
            shuffle(order)
            for name in order:
                _sync(device)
                start = time.perf_counter()
                steps[name]()
                _sync(device)
                self.times[name].append(time.perf_counter() - start)
        self.medians = {k: statistics.median(v) for k, v in self.times.items()}

    def ratio(self, name: str, base: str = "bn") -> str:
        """``spread=[q1,q3] ratio=R``: R the ratio of the medians, q1 and q3 the quartiles of the
        per-round ratios (a measure of the machine's noise)."""
        paired = sorted(t / b for t, b in zip(self.times[name], self.times[base]))
        q1, q3 = (statistics.quantiles(paired, n=4)[i] for i in (0, 2)) if len(paired) > 1 else (paired[0],) * 2
        return f"spread=[{q1:.3f},{q3:.3f}] ratio={self.medians[name] / self.medians[base]:.3f}"


def build_models(
    base: nn.Module,
    ghost_batch_size: int,
    methods: Sequence[str] = METHODS[1:],
    plain: str = "bn",
    plain_autograd: bool = False,
) -> dict[str, nn.Module]:
    """The plain model under the name ``plain`` and one ghost copy per method; with ``plain_autograd``
    also each method with ``fused=False`` (named ``method~plain``), the A/B of the fused paths."""
    models = {plain: base}
    for method in methods:
        models[method] = apply_ghost_noise(copy.deepcopy(base), ghost_batch_size, method=method, seed=0)
    if plain_autograd:
        for method in methods:
            models[method + "~plain"] = apply_ghost_noise(
                copy.deepcopy(base), ghost_batch_size, method=method, seed=0, fused=False
            )
    return models


def train_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    optim: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Any,
    cudagraphs: bool = False,
) -> Callable[[], None]:
    """One training step of ``model`` as a closure: forward under ``autocast``, cross-entropy,
    backward, optimizer step (with ``cudagraphs``, a new CUDA-graph step is marked first)."""

    def step() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optim.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()

    return step


def graph_breaks(model: nn.Module, x: torch.Tensor) -> int | None:
    try:
        import torch._dynamo as dynamo

        dynamo.reset()
        return int(dynamo.explain(model)(x).graph_break_count)
    except Exception as err:  # noqa: BLE001  (reported, not hidden: one failed measurement must not stop the others)
        print(f"  (graph break count failed: {type(err).__name__}: {err})")
        return None


def _model_case(
    args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, tuple[int, ...], str, str, list[str]]:
    """``(model, input shape, label, plain name, methods)`` of the ``--model`` case on ``device``."""
    cuda = device.type == "cuda"
    size = args.image_size or (32 if cuda else 28)
    channels = 3 if cuda else 1
    shape = (args.batch or (256 if cuda else 128), channels, size, size)
    if args.model == "transformer":
        # a ViT of LayerNorms over tokens: only GNI and analytic GNI apply
        dim, depth, heads = (384, 6, 6) if cuda else (128, 4, 4)
        base: nn.Module = TinyTransformer(10, channels, size, 4, dim=dim, depth=depth, heads=heads)
        label = f"TinyTransformer d{dim}x{depth} {channels}x{size}x{size}/4"
        return base, shape, label, "ln", [m for m in args.methods if m in ("gni", "analytic")]
    if cuda:
        return (
            resnet18_cifar(num_classes=10, in_channels=3),
            shape,
            f"ResNet-18 3x{size}x{size}",
            "bn",
            list(args.methods),
        )
    base = small_resnet(depth=8, width=16, in_channels=1, num_classes=10)
    return base, shape, f"small ResNet-8 1x{size}x{size}", "bn", list(args.methods)


def bench_models(args: argparse.Namespace, device: torch.device) -> None:
    base, shape, label, plain, methods = _model_case(args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    base = base.to(device=device, memory_format=memory_format)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 10, (shape[0],), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    for compiled in _modes(args):
        models = build_models(base, args.ghost_batch_size, methods, plain)
        breaks: dict[str, int | None] = {}
        if compiled:
            for k in list(models):
                breaks[k] = graph_breaks(models[k], x)
            torch._dynamo.reset()
            runners = {k: torch.compile(m, mode=args.compile_mode) for k, m in models.items()}
        else:
            runners = dict(models)
        optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

        cudagraphs = compiled and args.compile_mode == "reduce-overhead"

        steps = {k: train_step(runners[k], optims[k], x, y, autocast, cudagraphs) for k in models}
        if args.launch_ab and not compiled:
            for k in [k for k in models if k != plain]:
                steps[k + "~tl"] = _with_triton_launch(steps[k])
        skips: dict[str, int] = {}
        for k, step in steps.items():  # warm-up (and compilation)
            before = _cudagraph_skips()
            for _ in range(3 if not compiled else 4):
                step()
            skips[k] = _cudagraph_skips() - before
        timings = Timings(steps, args.repeats, device)
        medians = timings.medians
        peaks: dict[str, dict[str, int]] = {k: {} for k in steps}  # "peak" (CUDA), "step_peak"
        for k, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peaks[k]["peak"] = torch.cuda.max_memory_allocated()
                peaks[k]["step_peak"] = peaks[k]["peak"] - held
            else:
                step_peak = cpu_step_peak_bytes(step)
                if step_peak:
                    peaks[k]["step_peak"] = step_peak
        act = {}
        if not compiled:
            for k, m in models.items():
                with autocast:
                    act[k] = saved_bytes(lambda m=m: nn.functional.cross_entropy(m(x), y))
        mode = "eager"
        if compiled:
            mode = "compiled" if args.compile_mode in (None, "default") else f"compiled[{args.compile_mode}]"
        if args.profile and device.type == "cuda":
            for k, step in steps.items():
                profile_step(f"{mode} method={k}", step)
        for k in models:
            parts = [
                (
                    f"model {label} batch {shape[0]} {device.type} {mode}{' bf16' if args.bf16 else ''}"
                    f"{' channels_last' if args.channels_last else ''} method={k:<8}"
                ),
                f"step={medians[k] * 1e3:8.2f}ms",
            ]
            if act:
                parts.append(f"saved={act[k] / 2**20:7.1f}MiB saved_ratio={act[k] / act[plain]:.3f}")
            for name, value in peaks[k].items():  # step_peak: above the memory held before the step
                if peaks[plain].get(name):
                    parts.append(f"{name}={value / 2**20:7.1f}MiB {name}_ratio={value / peaks[plain][name]:.3f}")
            if compiled:
                parts.append(f"graph_breaks={breaks.get(k)}")
            if cudagraphs:
                parts.append(f"cudagraph_skips={skips[k]}")
            parts.append(timings.ratio(k, plain))
            print(" ".join(parts), flush=True)
        for k in [k for k in steps if k.endswith("~tl")]:
            base_k = k[:-3]
            print(
                f"model {label} batch {shape[0]} {device.type} {mode} method={base_k:<8} with Triton's own launch "
                f"step={medians[k] * 1e3:8.2f}ms cached_launch_speedup={medians[k] / medians[base_k]:.3f} "
                f"ratio={medians[k] / medians[plain]:.3f}",
                flush=True,
            )


def _with_triton_launch(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the kernels launched through Triton's ``kernel[grid](...)`` (no cached launch)."""

    def run() -> None:
        config.enable_fast_launch(False)
        try:
            step()
        finally:
            config.enable_fast_launch(True)

    return run


def _cudagraph_skips() -> int:
    """How often inductor has declined CUDA graphs so far (``mode="reduce-overhead"``)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001  (an internal counter; reported as 0 when absent)
        return 0


def bench_layers(args: argparse.Namespace, device: torch.device) -> None:
    """One layer's forward + backward: BatchNorm2d (every method) and LayerNorm over tokens (GNI, analytic)."""
    batch = args.batch or (256 if device.type == "cuda" else 128)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ln_shape = tuple(args.ln_shape) if args.ln_shape else (max(batch // 2, 1), 128, 256)
    bn_shapes = [tuple(shape) for shape in args.bn_shape] if args.bn_shape else [(batch, 64, 16, 16)]
    cases = [("BatchNorm2d", "bn", nn.BatchNorm2d(shape[1]), shape, list(args.methods)) for shape in bn_shapes]
    cases.append(
        ("LayerNorm", "ln", nn.LayerNorm(ln_shape[-1]), ln_shape, [m for m in args.methods if m in ("gni", "analytic")])
    )
    if args.bn_shape and not args.ln_shape:
        cases.pop()  # --bn-shape alone: the BatchNorm cases only
    for label, plain, base, shape, methods in cases:
        if not methods:
            continue
        channels_last = args.channels_last and len(shape) == 4
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        models = build_models(
            base.to(device=device, dtype=dtype), args.ghost_batch_size, methods, plain, args.plain_autograd
        )
        x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=memory_format).requires_grad_()
        grad = torch.randn_like(x)
        for compiled in _modes(args):
            if compiled:
                torch._dynamo.reset()
            runners = {k: (torch.compile(m) if compiled else m) for k, m in models.items()}

            def make(run: nn.Module, x: torch.Tensor = x, grad: torch.Tensor = grad) -> Callable[[], None]:
                def layer_step() -> None:
                    run(x).backward(grad)

                return layer_step

            steps = {k: make(runners[k]) for k in models}
            for step in steps.values():
                for _ in range(3):
                    step()
            timings = Timings(steps, args.repeats * 2, device)
            medians = timings.medians
            mode = "compiled" if compiled else "eager"
            for k in models:
                memory = ""
                if not compiled:
                    memory = f"saved={saved_bytes(lambda run=runners[k], x=x: run(x)) / 2**20:7.2f}MiB "
                    if device.type == "cpu":
                        step_peak = cpu_step_peak_bytes(steps[k])
                        memory += f"step_peak={step_peak / 2**20:7.2f}MiB " if step_peak else ""
                print(
                    f"layer {label} {tuple(shape)} {device.type} {mode} {str(dtype).replace('torch.', '')}"
                    f"{' channels_last' if channels_last else ''} method={k:<8} fwd+bwd={medians[k] * 1e3:8.3f}ms "
                    f"{memory}{timings.ratio(k, plain)}",
                    flush=True,
                )


def profile_step(label: str, step: Callable[[], None], top: int = 6) -> None:
    """One step under torch.profiler: number of GPU kernels, their total time, and the costliest ones."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

        def gpu_us(e: Any) -> float:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

        count = sum(e.count for e in kernels)
        total = sum(gpu_us(e) for e in kernels)
        print(f"profile {label} gpu_kernels={count} gpu_time={total / 1e3:.2f}ms", flush=True)
        for e in sorted(kernels, key=gpu_us, reverse=True)[:top]:
            print(f"    {gpu_us(e) / 1e3:7.3f}ms x{e.count:<4} {e.key[:90]}", flush=True)
    except Exception as err:  # noqa: BLE001  (reported, not hidden: one failed measurement must not stop the others)
        print(f"profile {label} failed: {type(err).__name__}: {err}")


def _modes(args: argparse.Namespace) -> list[bool]:
    if args.compile_only:
        return [True]
    return [False, True] if args.compile else [False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (inductor)")
    parser.add_argument("--compile-only", action="store_true", help="measure only torch.compile cases")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs; models only)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last (default on CUDA)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--image-size", type=int, default=None, help="models: input height and width (default 32 on CUDA, 28 on CPU)"
    )
    parser.add_argument("--ghost-batch-size", type=int, default=16)
    parser.add_argument(
        "--model",
        choices=("resnet", "transformer"),
        default="resnet",
        help="models: resnet (BatchNorm; CPU ResNet-8, CUDA ResNet-18) or transformer (LayerNorm; TinyTransformer, "
        "patch 4; CPU dim 128 x 4 blocks, CUDA dim 384 x 6)",
    )
    parser.add_argument(
        "--bn-shape",
        type=lambda v: [int(p) for p in v.split(",")],
        nargs="+",
        default=None,
        help="layers: the BatchNorm2d cases' inputs B,C,H,W (default: one, batch,64,16,16)",
    )
    parser.add_argument(
        "--ln-shape",
        type=lambda v: [int(p) for p in v.split(",")],
        default=None,
        help="layers: the LayerNorm case's input B,T,D (default: batch/2,128,256)",
    )
    parser.add_argument(
        "--methods",
        type=lambda v: [m for m in v.split(",") if m],
        default=list(METHODS[1:]),
        help="comma-separated methods to compare with plain BN (default: gni,gbn,xbn,analytic)",
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="3 repeats (smoke test)")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument(
        "--launch-ab", action="store_true", help="eager models: also each method with Triton's own launch path"
    )
    parser.add_argument(
        "--plain-autograd",
        action="store_true",
        help="layers: also each method with fused=False (A/B of the fused paths)",
    )
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: leave cudnn.benchmark off")
    parser.add_argument("--profile", action="store_true", help="CUDA: kernel count and costliest kernels per step")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        args.bf16 = True
        args.channels_last = True
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if (
        device.type == "cpu"
    ):  # glibc's heap trimming sets how many fresh pages each step faults in (docs/performance.md)
        tuned = [
            f"{k}={os.environ[k]}"
            for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
            if k in os.environ
        ]
        name += f", malloc {' '.join(tuned) if tuned else 'default'}"
    setup = f"backend {config.get_backend()}, Triton {'installed' if config.triton_installed() else 'not installed'}"
    if config.triton_installed():
        setup += f", cached launch {'on' if config.settings().fast_launch else 'off'}"
        setup += f", compiled kernels {'on' if config.compiled_kernels_enabled() else 'off'}"
    print(
        f"# torch {torch.__version__}, {name}, ghost_batch_size={args.ghost_batch_size}, repeats={args.repeats}, {setup}",
        flush=True,
    )
    if not args.skip_layers:
        bench_layers(args, device)
    if not args.skip_models:
        bench_models(args, device)


if __name__ == "__main__":
    main()
