"""CPU: the training step with glibc's default heap trimming against trimming turned off, per method.

glibc returns free memory at the top of its heap to the OS (it "trims" it); the next step then
faults the pages of its activations in again. How much of a step that costs, and for which
allocations, changes from run to run, which makes CPU step times and their ratios jump (see
docs/performance.md, "CPU: glibc's heap trimming"). With ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_`` set, glibc keeps the memory. glibc reads them when the process starts, so
every case runs in its own process: each round runs every (method, setting) pair once, in a shuffled
order, and prints the median step time of each.

    python benchmarks/malloc_ab.py                          # bn, gni, gbn; 3 rounds of 30 steps
    python benchmarks/malloc_ab.py --methods bn,xbn --rounds 5

The model is the small ResNet-8 of ``overhead.py`` (1x28x28, batch 128, 2 threads, SGD step).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

SETTINGS = {
    "default": {},
    "no-trim": {"MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_MMAP_THRESHOLD_": "33554432"},
}
_GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def child(method: str, steps: int, batch: int, threads: int) -> None:
    """Time ``steps`` training steps of the small ResNet-8 with ``method``; print the median in ms."""
    import torch
    from torch import nn

    from lightning_ghostnoise import apply_ghost_noise
    from lightning_ghostnoise.models import small_resnet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = small_resnet()
    if method != "bn":
        model = apply_ghost_noise(model, 16, method=method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seen = ",".join(f"{k}={os.environ[k]}" for k in _GLIBC_VARIABLES if k in os.environ)
    print(f"{statistics.median(times) * 1e3:.2f} {seen or 'default'}")


def run_case(method: str, setting: str, args: argparse.Namespace) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _GLIBC_VARIABLES}
    env.update(SETTINGS[setting])
    command = [sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--batch", str(args.batch)]
    command += ["--threads", str(args.threads)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, check=True)
    median, seen = out.stdout.strip().splitlines()[-1].split(" ")
    expected = ",".join(f"{k}={v}" for k, v in SETTINGS[setting].items()) or "default"
    if seen != expected:
        raise RuntimeError(f"the {setting!r} case ran with {seen!r} in its environment, expected {expected!r}")
    return float(median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="bn,gni,gbn", help="comma-separated: bn and ghost methods")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.threads)
        return
    methods = [m for m in args.methods.split(",") if m]
    print(
        f"# small ResNet-8 1x28x28 batch {args.batch}, {args.threads} threads, median of {args.steps} steps per case, "
        f"one process per case; no-trim: {' '.join(f'{k}={v}' for k, v in SETTINGS['no-trim'].items())}",
        flush=True,
    )
    results: Dict[Tuple[str, str], List[float]] = {(m, s): [] for m in methods for s in SETTINGS}
    for round_ in range(args.rounds):
        cases = list(results)
        random.shuffle(cases)
        for method, setting in cases:
            results[(method, setting)].append(run_case(method, setting, args))
        line = " ".join(f"{m}:{s}={results[(m, s)][-1]:.1f}ms" for m in methods for s in SETTINGS)
        print(f"round {round_ + 1} {line}", flush=True)
    for method in methods:
        medians = {s: statistics.median(results[(method, s)]) for s in SETTINGS}
        print(
            f"method={method:<8} default={medians['default']:.1f}ms no-trim={medians['no-trim']:.1f}ms "
            f"no-trim/default={medians['no-trim'] / medians['default']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
