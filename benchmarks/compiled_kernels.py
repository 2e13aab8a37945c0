"""Kernels that ``torch.compile`` launches per training step, for each method against plain BN, without a GPU.

In a compiled step on a GPU every kernel launch costs host time (about 16 us each on the H100
machine, where the compiled ResNet-18 step was bound by the host) and a small kernel costs device
time even under CUDA graphs. The ghost layers' cost under ``torch.compile`` is therefore, to first
order, the number of extra kernels inductor generates for them. This script counts them on a
machine without a GPU: inductor generates its Triton code (the code it generates for CUDA) for CPU
tensors, with

* a stand-in Triton driver that reports an sm_90 target, so that code generation runs;
* the generated kernels' launches replaced by no-ops (``TRITON_INTERPRET=1`` makes inductor load
  them as Python; nothing is compiled or run, so the values computed are meaningless);
* inductor's CPU-only heuristics switched to their GPU values (the opcount and reads thresholds for
  realizing buffers, loop reordering), so that it fuses as it does for CUDA.

It also sums the tensors that AOTAutograd's partitioner keeps from the forward for the backward
(``saved``, MiB: the activation memory of the compiled step). It then counts, in the ``call``
functions of the generated forward and backward graphs, the launches of one step: Triton kernels, extern kernels (convolutions, matrix products) and ATen
fallbacks. A proxy, not a GPU measurement: the device properties inductor reads (e.g. for split
reductions) are the CPU's. Every line gives the graph breaks dynamo counted (each splits the step
into more graphs, and their counts are no longer comparable) and ends with the ratio of launches to
plain BN (LN).

    python benchmarks/compiled_kernels.py                          # one BatchNorm2d(64) layer, (128, 64, 16, 16)
    python benchmarks/compiled_kernels.py --channels-last          # the same, channels-last input
    python benchmarks/compiled_kernels.py --model resnet18 --batch 64   # ResNet-18 step (slow: minutes)
    python benchmarks/compiled_kernels.py --model layernorm              # one LayerNorm(256) on (64, 128, 256)
    python benchmarks/compiled_kernels.py --compiled-kernels       # the coefficient kernels as custom ops

``--model resnet18`` is channels last: that is how the custom-op path's graph break at every layer
(an ``out=`` into a non-contiguous buffer, since fixed) showed up here, as 34 graphs and a
count below plain BN's, where the contiguous single-layer case had none.
"""

from __future__ import annotations

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: inductor loads its kernels as Python
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ghostnoise_kernel_count_"))

import argparse
import collections
import re
from collections import Counter
from typing import Callable

import torch
from torch import nn

from lightning_ghostnoise import apply_ghost_noise, config
from lightning_ghostnoise.experiments.models import resnet18_cifar

METHODS = ("bn", "gni", "analytic", "gbn", "xbn")
_NOT_LAUNCHES = (
    "empty",
    "empty_strided",
    "as_strided",
    "view",
    "reshape",
    "alias",
    "copy_",
)  # ATen calls that launch nothing (or BN does too)


class _FakeDriver:
    """Just enough of a Triton driver for inductor to generate CUDA-style code on a CPU-only machine."""

    def get_current_target(self) -> object:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: object = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name: str) -> object:
        raise AttributeError(f"the stand-in Triton driver has no {name!r}")


def setup() -> list[str]:
    """Configure inductor as described in the module docstring; returns the list the graph sources go to."""
    import torch._inductor.runtime.triton_heuristics as heuristics
    from torch._inductor import codecache, config, ir, scheduler
    from triton.runtime.driver import driver

    driver.set_active(_FakeDriver())
    config.cpu_backend = "triton"
    config.fx_graph_cache = False
    ir.is_cpu = lambda node: False  # realize thresholds: the GPU's
    scheduler.BaseSchedulerNode.is_cpu = lambda self: False  # loop reordering as on a GPU
    heuristics.CachingAutotuner.run = lambda self, *args, **kwargs: None  # no launch
    sources: list[str] = []
    load = codecache.PyCodeCache.load_by_key_path.__func__

    def load_and_keep(cls: type, key: str, path: str, *args: object, **kwargs: object) -> object:
        with open(path) as f:
            text = f.read()
        if "def call(" in text:
            sources.append(text)
        return load(cls, key, path, *args, **kwargs)

    codecache.PyCodeCache.load_by_key_path = classmethod(load_and_keep)
    return sources


def record_saved() -> list[int]:
    """Wrap inductor's partitioner; returns the list that gets the bytes each backward graph takes from the forward."""
    from torch._inductor import compile_fx

    saved: list[int] = []
    partition = compile_fx.min_cut_rematerialization_partition

    def partition_and_record(*args: object, **kwargs: object) -> object:
        forward, backward = partition(*args, **kwargs)
        values = [node.meta.get("val") for node in backward.graph.find_nodes(op="placeholder")]
        names = [node.name for node in backward.graph.find_nodes(op="placeholder")]
        saved.append(
            sum(
                v.numel() * v.element_size()
                for v, name in zip(values, names)
                if isinstance(v, torch.Tensor) and not name.startswith("tangents")
            )
        )
        return forward, backward

    compile_fx.min_cut_rematerialization_partition = partition_and_record
    return saved


def count_launches(sources: list[str]) -> Counter[str]:
    """Launches in the ``call`` functions of generated graph modules: ``triton``, ``extern:<name>``,
    ``aten:<name>`` (ATen fallbacks) and ``op:<name>`` (other custom ops)."""
    launches: Counter[str] = collections.Counter()
    for text in sources:
        body = text.split("def call(", 1)[1]
        body = re.split(r"\n(?:def |class |runner = |async_compile\.wait)", body, maxsplit=1)[0]
        for line in body.splitlines():
            call = re.sub(r"^(?:\w+(?:, \w+)*,? = )", "", line.strip())  # the statement's callee
            if re.match(r"\w+\.run\(", call):
                launches["triton"] += 1
            elif (m := re.match(r"extern_kernels\.(\w+)\(", call)) is not None:
                launches[f"extern:{m.group(1)}"] += 1
            elif (m := re.match(r"(?:torch\.ops\.)?aten\.(\w+)\.\w+\(", call)) is not None:
                if m.group(1) not in _NOT_LAUNCHES:
                    launches[f"aten:{m.group(1)}"] += 1
            elif (m := re.match(r"torch\.ops\.(\w+\.\w+)\.\w+\(", call)) is not None:
                launches[f"op:{m.group(1)}"] += 1
    return launches


def _single_layer_step(
    plain: nn.Module, method: str, shape: tuple[int, ...], ghost_batch_size: int, channels_last: bool = False
) -> Callable[[], None]:
    """Forward and backward of ``plain`` (``method`` "bn"/"ln") or its ghost version, compiled."""
    layer = plain if method in ("bn", "ln") else apply_ghost_noise(plain, ghost_batch_size, method=method)
    compiled = torch.compile(layer)
    x = torch.randn(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    return lambda: compiled(x).backward(grad)


def layer_step(method: str, args: argparse.Namespace) -> Callable[[], None]:
    shape = tuple(int(v) for v in args.shape.split(","))
    return _single_layer_step(nn.BatchNorm2d(shape[1]), method, shape, args.ghost_batch_size, args.channels_last)


def layernorm_step(method: str, args: argparse.Namespace) -> Callable[[], None]:
    shape = tuple(int(v) for v in args.ln_shape.split(","))
    return _single_layer_step(nn.LayerNorm(shape[-1]), method, shape, args.ghost_batch_size)


def resnet_step(method: str, args: argparse.Namespace) -> Callable[[], None]:
    torch.manual_seed(0)
    model = resnet18_cifar().to(memory_format=torch.channels_last)
    if method != "bn":
        model = apply_ghost_noise(model, args.ghost_batch_size, method=method)
    compiled = torch.compile(model)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("layer", "layernorm", "resnet18"), default="layer")
    parser.add_argument("--shape", default="128,64,16,16", help="the layer's input (B, C, H, W)")
    parser.add_argument("--channels-last", action="store_true", help="layer: a channels-last input")
    parser.add_argument(
        "--compiled-kernels",
        action="store_true",
        help="the Triton coefficient kernels as custom ops (config.enable_compiled_kernels; or GHOSTNOISE_COMPILED_KERNELS=1)",
    )
    parser.add_argument("--ln-shape", default="64,128,256", help="layernorm: the input (B, T, D)")
    parser.add_argument("--batch", type=int, default=64, help="resnet18: batch size (bf16 autocast, channels_last)")
    parser.add_argument("--ghost-batch-size", type=int, default=16)
    parser.add_argument("--methods", default=None, help="default: every method (layernorm: ln,gni,analytic)")
    args = parser.parse_args()
    plain = "ln" if args.model == "layernorm" else "bn"
    methods = args.methods or ("ln,gni,analytic" if args.model == "layernorm" else ",".join(METHODS))
    if args.compiled_kernels:
        config.enable_compiled_kernels(True)
    sources = setup()
    saved = record_saved()
    if config.compiled_kernels_enabled():  # GHOSTNOISE_COMPILED_KERNELS=1, or --compiled-kernels
        from lightning_ghostnoise.backends.triton import launcher

        launcher.launch = lambda *args, **kwargs: None  # the custom ops, like inductor's kernels, launch nothing
        config.set_backend("triton")  # CPU tensors take the Triton paths under TRITON_INTERPRET=1
    make = {"layer": layer_step, "layernorm": layernorm_step, "resnet18": resnet_step}[args.model]
    what = {
        "layer": f"BatchNorm2d layer {args.shape}{' channels_last' if args.channels_last else ''}",
        "layernorm": f"LayerNorm layer {args.ln_shape}",
        "resnet18": f"ResNet-18 batch {args.batch}",
    }[args.model]
    flag = "1" if config.compiled_kernels_enabled() else "0"
    print(
        f"# torch {torch.__version__}, inductor's Triton code for an sm_90 target generated on CPU (no GPU), "
        f"{what}, ghost_batch_size={args.ghost_batch_size}, GHOSTNOISE_COMPILED_KERNELS={flag}"
    )
    totals: dict[str, int] = {}
    counters = torch._dynamo.utils.counters
    for method in methods.split(","):
        torch._dynamo.reset()
        counters.clear()
        sources.clear()
        saved.clear()
        step = make(method, args)
        step()  # compiles the forward and the backward graph
        breaks = sum(counters["graph_break"].values())
        launches = count_launches(sources)
        totals[method] = sum(launches.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(launches.items()))
        ratio = f" ratio={totals[method] / totals[plain]:.3f}" if plain in totals else ""
        print(
            f"compiled {args.model} method={method:<8} graph_breaks={breaks} saved={sum(saved) / 2**20:.4f}MiB "
            f"launches per step={totals[method]:4d} ({detail}){ratio}",
            flush=True,
        )


if __name__ == "__main__":
    main()
