"""A/B of this tree's ghost layers against another git revision's, in one process.

On a noisy machine, separate processes drift by 10-20 % between runs: more than many changes are
worth. This script puts both versions side by side in the same process: it exports the package at
``REV`` (``git archive``) into a temporary folder as ``lightning_ghostnoise_rev`` and times, per case
and method, the plain model or layer, ``REV``'s ghost version and this tree's, in shuffled rounds
(the median of each).

Usage:
    python benchmarks/ab_revisions.py 0098210                                  # default cases, gni
    python benchmarks/ab_revisions.py HEAD~3 --methods gni,analytic --cases layernorm:64,128,256
    python benchmarks/ab_revisions.py HEAD --cases resnet8 transformer --rounds 20
    python benchmarks/ab_revisions.py HEAD~1 --cases resnet8 --methods gni,gbn --compile
    python benchmarks/ab_revisions.py main --cases batchnorm:8,16,4,4 --ghost-batch-size 4 --threads 1 --rounds 300
        # host time of one layer call (tiny tensor: Python and dispatch only), the cost of a small model's eager GPU step

Cases: ``layernorm:B,T,D``, ``groupnorm:G:B,C,H,W``, ``batchnorm:B,C,H,W`` (one layer, forward and
backward), ``resnet8`` (small ResNet-8, 1x28x28, batch 128) and ``transformer`` (TinyTransformer
d128x4, patch 4 on 1x28x28, batch 128): one SGD step. CPU only; ``--bf16`` runs the forward under
bfloat16 autocast, ``--compile`` runs every model or layer through ``torch.compile`` (inductor).

Every line ends with ``current/rev=X.XXX`` (this tree's time over ``REV``'s, same process).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import train_step  # noqa: E402  (the sibling script, importable once its folder is on sys.path)

PACKAGE = "lightning_ghostnoise"
RENAMED = PACKAGE + "_rev"


def export_revision(rev: str, into: Path) -> ModuleType:
    """The package at git revision ``rev``, importable as ``lightning_ghostnoise_rev``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, PACKAGE], cwd=ROOT, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev} {PACKAGE} failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python without extraction filters (< 3.11.4): git's own archive, trusted
            tar.extractall(into)
    (into / PACKAGE).rename(into / RENAMED)
    word = re.compile(rf"\b{PACKAGE}\b")
    for path in (into / RENAMED).rglob("*.py"):
        path.write_text(word.sub(RENAMED, path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(RENAMED)


def _layer_case(spec: str) -> tuple[str, nn.Module, tuple[int, ...]]:
    kind, _, rest = spec.partition(":")
    if kind == "layernorm":
        shape = tuple(int(v) for v in rest.split(","))
        return f"LayerNorm {shape}", nn.LayerNorm(shape[-1]), shape
    if kind == "groupnorm":
        groups, _, dims = rest.partition(":")
        shape = tuple(int(v) for v in dims.split(","))
        return f"GroupNorm({groups}) {shape}", nn.GroupNorm(int(groups), shape[1]), shape
    if kind == "batchnorm":
        shape = tuple(int(v) for v in rest.split(","))
        return f"BatchNorm2d {shape}", nn.BatchNorm2d(shape[1]), shape
    raise SystemExit(
        f"unknown case {spec!r}: use layernorm:B,T,D, groupnorm:G:B,C,H,W, batchnorm:B,C,H,W, resnet8, transformer"
    )


def _steps(
    spec: str, method: str, rev: ModuleType, bf16: bool = False, compile: bool = False, ghost_batch_size: int = 16
) -> tuple[str, dict[str, Callable[[], None]]]:
    from lightning_ghostnoise import apply_ghost_noise
    from lightning_ghostnoise.experiments.models import TinyTransformer, small_resnet

    torch.manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if spec in ("resnet8", "transformer"):
        base: nn.Module
        if spec == "resnet8":
            base, label = small_resnet(depth=8, width=16, in_channels=1, num_classes=10), "small ResNet-8 batch 128"
        else:
            base, label = TinyTransformer(10, 1, 28, 4, dim=128, depth=4, heads=4), "TinyTransformer d128x4 batch 128"
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        models = {
            "plain": base,
            "rev": rev.apply_ghost_noise(copy.deepcopy(base), ghost_batch_size, method=method, seed=0),
            "current": apply_ghost_noise(copy.deepcopy(base), ghost_batch_size, method=method, seed=0),
        }
        optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
        run = {k: torch.compile(m) if compile else m for k, m in models.items()}
        return label, {k: train_step(run[k], optims[k], x, y, autocast) for k in models}
    label, layer, shape = _layer_case(spec)
    layers = {
        "plain": layer,
        "rev": rev.apply_ghost_noise(copy.deepcopy(layer), ghost_batch_size, method=method, seed=0),
        "current": apply_ghost_noise(copy.deepcopy(layer), ghost_batch_size, method=method, seed=0),
    }
    if compile:
        layers = {k: torch.compile(m) for k, m in layers.items()}
    inp = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)

    def layer_step(k: str) -> Callable[[], None]:
        def step() -> None:
            with autocast:
                out = layers[k](inp)
            out.backward(grad.to(out.dtype))

        return step

    return label, {k: layer_step(k) for k in layers}


def measure(steps: dict[str, Callable[[], None]], rounds: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per step, rounds in a shuffled order (seeded), after 3 warm-up steps each."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = random.Random(seed)
    for _ in range(rounds):
        keys = list(steps)
        order.shuffle(keys)
        for k in keys:
            start = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~1, a commit)")
    parser.add_argument("--cases", nargs="+", default=["layernorm:64,128,256", "groupnorm:8:128,64,16,16"],
                        help="cases, separated by spaces (see the docstring)")  # fmt: skip
    parser.add_argument("--methods", default="gni", help="comma-separated ghost methods")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU) around the forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model or layer")
    parser.add_argument("--ghost-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # plain, REV's and this tree's layers are other types in one frame: no eager fallback
        torch._dynamo.config.recompile_limit = 64
    for spec in args.cases:  # fail before the export and the first timing
        if spec not in ("resnet8", "transformer"):
            _layer_case(spec)
    with tempfile.TemporaryDirectory() as tmp:
        rev = export_revision(args.rev, Path(tmp))
        print(
            f"# torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, rounds={args.rounds}, ghost_batch_size={args.ghost_batch_size}, rev={args.rev}",
            flush=True,
        )
        for spec in args.cases:
            for method in [m for m in args.methods.split(",") if m]:
                if args.compile:  # a fresh cache per case: three variants of each module compile at once
                    torch._dynamo.reset()
                label, steps = _steps(spec, method, rev, args.bf16, args.compile, args.ghost_batch_size)
                if args.compile:
                    label += " compiled"
                med = measure(steps, args.rounds)
                print(
                    f"ab {label}{' bf16' if args.bf16 else ''} method={method} plain={med['plain'] * 1e3:.3f}ms "
                    f"rev={med['rev'] * 1e3:.3f}ms ({med['rev'] / med['plain']:.3f}x) "
                    f"current={med['current'] * 1e3:.3f}ms ({med['current'] / med['plain']:.3f}x) "
                    f"current/rev={med['current'] / med['rev']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
