"""GhostNoise under Lightning's ModelParallelStrategy (torch's FSDP2 ``fully_shard``) on CPU.

Two processes (gloo) started by Lightning from tests/helpers/sharded_worker.py; the checks are those of
the GPU tests (tests/gpu/test_fsdp.py, in ``helpers/sharded_checks.py``): the ghost layers sit inside the
sharded blocks with DTensor parameters, the noise is per rank, and the checkpoints are plain.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.sharded_checks import run_and_check
from lightning.pytorch import strategies

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(strategies, "ModelParallelStrategy"), reason="ModelParallelStrategy needs lightning >= 2.4"
    ),
    pytest.mark.skipif(
        tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5),
        reason="torch 2.4's fully_shard creates CUDA streams at its first forward (needs CUDA; tests/gpu covers it)",
    ),
]


@pytest.mark.parametrize("model", ["model_parallel", "model_parallel_late"])
def test_ghost_noise_in_model_parallel_strategy_on_cpu(tmp_path: Path, model: str) -> None:
    run_and_check(model, tmp_path, "cpu", devices=2)
