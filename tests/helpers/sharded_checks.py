"""Run tests/helpers/sharded_worker.py and check what it recorded (shared by the CPU and the GPU tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.processes import run_worker
from helpers.sharded_worker import Transformer

#: The sharded unit (block class) expected around each normalization layer.
UNITS = {
    "blocks.0.ln1": "Block",
    "blocks.0.ln2": "Block",
    "blocks.1.norm": "ConvBlock",
    "blocks.2.ln1": "Block",
    "blocks.2.ln2": "Block",
}


def run_and_check(model: str, out: Path, accelerator: str, devices: int, timeout: float = 300) -> None:
    """Train ``model`` (see the worker) on ``devices`` processes and check every recorded property.

    - every LayerNorm/GroupNorm is a ghost layer inside its block's sharded unit (FSDP2: its parameters
      are DTensors);
    - the noise is per rank: with identical data and weights on every rank, different seeds and outputs;
    - the checkpoints written in and after ``fit`` are plain: the plain model's keys, plain tensors, load
      strictly into the model without the callback, equal to each other, every parameter trained.
    """
    run_worker("sharded_worker.py", model, out, accelerator, devices, timeout=timeout)
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]
    expected_strategy = "FSDPStrategy" if model == "fsdp" else "ModelParallelStrategy"
    for rank, rec in enumerate(records):
        assert (rec["global_rank"], rec["world_size"], rec["strategy"]) == (rank, devices, expected_strategy)
        layers = rec["layers"]
        assert set(layers) == set(UNITS), sorted(layers)
        for name, info in layers.items():
            assert info["ghost"], f"{name} is not a ghost layer in training"
            assert info["units"] and info["units"][-1] == UNITS[name], f"{name} sits in units {info['units']}"
            if model != "fsdp":
                assert info["param_types"] == ["DTensor"], f"{name}: {info['param_types']}"
        assert len(rec["seeds"]) == len(UNITS)
    if devices >= 2:
        a, b = records[0], records[1]
        torch.testing.assert_close(a["first_in"], b["first_in"], rtol=1e-6, atol=1e-6)
        assert (a["first_out"] - b["first_out"]).abs().max() > 0.1
        assert all(x != y for x, y in zip(a["seeds"], b["seeds"]))
    plain = Transformer()
    keys = sorted(plain.state_dict())
    saved = {}
    for name in ("in_fit", "after_fit"):
        state = torch.load(out / f"{name}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        assert sorted(state) == keys, f"{name}.ckpt keys differ from the plain model's"
        assert all(type(v) is torch.Tensor for v in state.values()), f"{name}.ckpt holds non-plain tensors"
        Transformer().load_state_dict(state, strict=True)
        saved[name] = state
    for k in keys:
        assert torch.equal(saved["in_fit"][k], saved["after_fit"][k]), f"{k} differs after fit (revert)"
    if model != "model_parallel_late":  # the late blocks are initialized inside the run
        initial = torch.load(out / "initial.pt", weights_only=True)
        untrained = [k for k in keys if torch.equal(initial[k], saved["in_fit"][k])]
        assert not untrained, f"not trained: {untrained}"
