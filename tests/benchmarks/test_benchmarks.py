"""One smoke test per benchmark script: it runs on CPU at tiny sizes and prints what its docs promise.

Each starts a Python process that imports torch and the package, so each is marked ``slow``. These
check that the scripts work and what each line holds, never how fast anything is (timings live
in the scripts' output and docs/results/, not in tests), and never a count that another torch or
inductor release may legitimately change.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"spread=\[(\d+\.\d{3}),(\d+\.\d{3})\] ratio=(\d+\.\d{3})$")


def _run(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> list[str]:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    done = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def _method(line: str) -> str:
    found = re.search(r"method=(\S+)", line)
    assert found, line
    return found.group(1)


@pytest.mark.slow
def test_overhead_prints_every_case_with_its_ratio_memory_and_spread():
    """Layers (with the plain-autograd A/B) and the model, each with its ratio, memory and spread."""
    lines = _run(
        "benchmarks/overhead.py", "--quick", "--batch", "16", "--image-size", "8", "--methods", "gni,gbn",
        "--ghost-batch-size", "4", "--plain-autograd",
    )  # fmt: skip
    assert lines[0].startswith("# torch ")
    layers = [line for line in lines if line.startswith("layer ")]
    models = [line for line in lines if line.startswith("model ")]
    assert [_method(line) for line in layers] == [
        "bn", "gni", "gbn", "gni~plain", "gbn~plain", "ln", "gni", "gni~plain",
    ]  # fmt: skip
    assert all(" BatchNorm2d " in line for line in layers[:5]) and all(" LayerNorm " in line for line in layers[5:])
    assert [_method(line) for line in models] == ["bn", "gni", "gbn"]
    for line in layers + models:
        match = RATIO.search(line)
        assert match, line
        q1, q3, ratio = (float(v) for v in match.groups())
        assert 0 < q1 <= q3 and ratio > 0
    # the plain layer and model against themselves
    assert layers[0].endswith("spread=[1.000,1.000] ratio=1.000")
    assert layers[5].endswith("spread=[1.000,1.000] ratio=1.000")
    assert models[0].endswith("spread=[1.000,1.000] ratio=1.000")
    for line in models:
        assert re.search(r"saved=\s*[\d.]+MiB saved_ratio=\d", line), line
        peak = re.search(r"step_peak=\s*([\d.]+)MiB step_peak_ratio=(\d+\.\d{3})", line)
        assert peak and float(peak.group(1)) > 0, line
    saved = {}
    for line in layers:
        match = re.search(r"saved=\s*([\d.]+)MiB step_peak=\s*([\d.]+)MiB", line)
        assert match, line
        saved[(line.split()[1], _method(line))] = float(match.group(1))
    # the fused LayerNorm path keeps only x, as LayerNorm does; plain autograd keeps x_hat too
    assert saved[("LayerNorm", "gni")] < 1.1 * saved[("LayerNorm", "ln")]
    assert saved[("LayerNorm", "gni~plain")] > 1.8 * saved[("LayerNorm", "ln")]


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / ".git").exists(),
    reason="benchmarks/ab_revisions.py reads a git revision: run from a git checkout (scripts/matrix.py tests a snapshot)",
)
def test_ab_revisions_compares_against_a_git_revision_in_one_process():
    lines = _run(
        "benchmarks/ab_revisions.py", "HEAD", "--cases", "layernorm:8,3,4", "groupnorm:2:8,4,2,2",
        "batchnorm:8,16,4,4", "resnet8", "--methods", "gni,analytic", "--ghost-batch-size", "4", "--rounds", "2",
    )  # fmt: skip
    assert lines[0].startswith("# torch ") and "rev=HEAD" in lines[0] and "ghost_batch_size=4" in lines[0]
    ab = [line for line in lines if line.startswith("ab ")]
    assert [_method(line) for line in ab] == ["gni", "analytic"] * 4
    for line in ab:
        match = re.search(
            r"plain=([\d.]+)ms rev=([\d.]+)ms \(([\d.]+)x\) current=([\d.]+)ms \(([\d.]+)x\) current/rev=(\d+\.\d{3})$",
            line,
        )
        assert match, line
        assert all(float(v) > 0 for v in match.groups()), line


@pytest.mark.slow
def test_host_overhead_covers_every_method():
    lines = _run("benchmarks/host_overhead.py", "--stub-kernels", "--calls", "5")
    host = [line for line in lines if line.startswith("host layer")]
    assert [_method(line) for line in host] == ["bn", "gni", "analytic", "gbn", "xbn"]
    assert all(re.search(r"ratio=\d+\.\d{2}$", line) for line in host)


def _inductor_has_triton_cpu_backend() -> bool:
    import torch._inductor.config

    return hasattr(torch._inductor.config, "cpu_backend")


@pytest.mark.slow
@pytest.mark.skipif(
    not _inductor_has_triton_cpu_backend(),
    reason="benchmarks/compiled_kernels.py counts launches with inductor's cpu_backend='triton', which this torch lacks",
)
def test_compiled_kernels_counts_fewer_launches_with_the_coefficient_kernels():
    """The GPU-free count of inductor's launches per compiled layer: one graph per case (channels
    last too), and the coefficient kernels as custom ops (counted, never run) take fewer launches than
    inductor's own kernels for the same math: the property that earns that path its place (the counts
    themselves change with inductor)."""

    def counts(env: dict[str, str]) -> dict[str, int]:
        lines = _run(
            "benchmarks/compiled_kernels.py", "--shape", "16,8,4,4", "--channels-last", "--ghost-batch-size", "4",
            "--methods", "bn,gbn", env=env,
        )  # fmt: skip
        assert lines[0].startswith("# torch ") and "sm_90" in lines[0] and "channels_last" in lines[0]
        found = {}
        for line in lines[1:]:
            match = re.match(
                r"compiled layer method=(\w+) +graph_breaks=0 saved=(\d+\.\d{4})MiB launches per step= *(\d+) \((.*)\) "
                r"ratio=(\d+\.\d{3})$",
                line,
            )
            assert match, line  # graph_breaks=0: channels last too is one graph
            found[match.group(1)] = int(match.group(3))
            assert abs(float(match.group(5)) - found[match.group(1)] / found["bn"]) < 1e-3
            if env["GHOSTNOISE_COMPILED_KERNELS"] == "1" and match.group(1) == "gbn":
                assert "op:ghostnoise.ghost_statistics_coefficients=1" in match.group(4), line
        assert list(found) == ["bn", "gbn"]
        return found

    inductor = counts({"GHOSTNOISE_COMPILED_KERNELS": "0"})
    custom_ops = counts({"GHOSTNOISE_COMPILED_KERNELS": "1"})
    assert inductor["bn"] == custom_ops["bn"] <= custom_ops["gbn"] < inductor["gbn"]


@pytest.mark.slow
def test_strength_tail_grows_faster_than_the_strength():
    lines = _run("benchmarks/strength_tail.py")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"plain", "analytic", "xbn", "gni"}
    plain = float(rows["plain"][-1])
    assert 3.0 < plain < 8.0  # unit-Gaussian batches
    for method in ("analytic", "xbn", "gni"):
        s1, s2 = float(rows[method][2]), float(rows[method][3])
        assert plain < s1 < s2 and s2 / s1 > 2.0  # doubling s more than doubles the worst output
