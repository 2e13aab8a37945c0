"""GhostNoise under Lightning's sharded strategies on CUDA (skipped without a GPU).

    pytest -m gpu tests/gpu

``FSDPStrategy`` (FSDP1, every transformer block auto-wrapped) and ``ModelParallelStrategy`` (torch's
``fully_shard`` applied in ``configure_model``, to blocks built in ``__init__`` or inside
``configure_model``). Each case trains a small transformer with LayerNorm and GroupNorm blocks in a
subprocess on ``min(2, torch.cuda.device_count())`` GPUs (Lightning starts the processes) and checks
that the ghost layers are inside the sharded blocks, the noise is per rank (with 2 GPUs or more), and
the checkpoints written in and after ``fit`` are plain (see ``helpers/sharded_checks.py``).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from pathlib import Path  # noqa: E402

from helpers.sharded_checks import run_and_check  # noqa: E402
from lightning.pytorch import strategies  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
DEVICES = min(2, torch.cuda.device_count())


@pytest.mark.parametrize("model", ["fsdp", "model_parallel", "model_parallel_late"])
def test_ghost_noise_in_sharded_strategies(tmp_path: Path, model: str) -> None:
    if model != "fsdp" and not hasattr(strategies, "ModelParallelStrategy"):
        pytest.skip("ModelParallelStrategy needs lightning >= 2.4")
    run_and_check(model, tmp_path, "cuda", DEVICES)
