"""Former import paths (``lightning_ghostnoise.callback``, ``.monitor``, ``.surgery``, ``.schedules.*``) are the
new objects, and both class paths of the callback work in a LightningCLI config."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path
from typing import Any, List

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_lightning import make_dataset, one_thread  # noqa: F401  (one_thread: autouse fixture)
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader

from lightning_ghostnoise.callbacks import GhostNoise, GhostNoiseMonitor
from lightning_ghostnoise.layers import GhostBatchNorm2d, convert
from lightning_ghostnoise.schedules import Linear

OLD_TO_NEW = {
    "lightning_ghostnoise.callback": ("lightning_ghostnoise.callbacks.ghost_noise", ["GhostNoise"]),
    "lightning_ghostnoise.monitor": (
        "lightning_ghostnoise.callbacks.monitor",
        ["GhostNoiseMonitor", "NoiseStatistics", "STATISTICS"],
    ),
    "lightning_ghostnoise.surgery": (
        "lightning_ghostnoise.layers.convert",
        [
            "LAYER_TYPES",
            "SurgeryReport",
            "apply_ghost_noise",
            "find_norm_layers",
            "ghost_class_for",
            "ghost_layers",
            "revert_ghost_noise",
            "set_ghost_batch_size",
            "set_strength",
        ],
    ),
}


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_module_gives_the_new_objects(old: str) -> None:
    new, names = OLD_TO_NEW[old]
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    assert sorted(old_module.__all__) == sorted(names)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), name
    assert new.rsplit(".", 1)[0] in (old_module.__doc__ or "")  # the docstring names the new path


def test_old_modules_are_attributes_of_the_package() -> None:
    import lightning_ghostnoise

    assert lightning_ghostnoise.callback.GhostNoise is GhostNoise
    assert lightning_ghostnoise.monitor.GhostNoiseMonitor is GhostNoiseMonitor
    assert lightning_ghostnoise.surgery.apply_ghost_noise is convert.apply_ghost_noise


def test_every_schedule_keeps_its_path() -> None:
    import lightning_ghostnoise.schedules as schedules

    for name in ("Schedule", "Constant", "Piecewise", "Linear", "Cosine", "Geometric", "WarmUp", "Sequential",
                 "as_schedule", "to_ghost_batch_size"):  # fmt: skip
        assert name in schedules.__all__ and callable(getattr(schedules, name)), name


# --------------------------------------------------------------------------- #
# LightningCLI: every class path of the callback builds the same callback
# --------------------------------------------------------------------------- #
@pytest.fixture(autouse=True)
def _clean_argv_and_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["cli"])  # pytest's arguments must not reach the CLI
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # LightningCLI's seed_everything sets it: restored afterwards
    monkeypatch.delenv("PL_GLOBAL_SEED")


class CLIModel(pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, 2)
        self.seen: List[type] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(type(self.net[1]))
        x, y = batch
        return F.cross_entropy(self.head(self.net(x).mean((2, 3))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CLIData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(32), batch_size=16, shuffle=False)


@pytest.mark.parametrize(
    "class_path",
    [
        "lightning_ghostnoise.callback.GhostNoise",
        "lightning_ghostnoise.callbacks.GhostNoise",
        "lightning_ghostnoise.GhostNoise",
    ],
)
def test_callback_class_paths_work_in_lightning_cli(class_path: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              accelerator: cpu
              devices: 1
              max_epochs: 1
              logger: false
              enable_progress_bar: false
              enable_model_summary: false
              enable_checkpointing: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: {class_path}
                  init_args:
                    ghost_batch_size: 4
                    method: gbn
                    strength:
                      class_path: lightning_ghostnoise.schedules.Linear
                      init_args: {{start_value: 0.0, end_value: 1.0}}
                - class_path: lightning_ghostnoise.monitor.GhostNoiseMonitor
                  init_args:
                    every_n_steps: 1
            """
        )
    )
    cli = LightningCLI(CLIModel, CLIData, args=["fit", "--config", str(config)], save_config_callback=None)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GhostNoise)]
    assert type(callback) is GhostNoise
    assert callback.method == "gbn" and callback.strength == Linear(0.0, 1.0)
    assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, GhostNoiseMonitor)] == [GhostNoiseMonitor]
    assert cli.model.seen == [GhostBatchNorm2d, GhostBatchNorm2d]  # two batches, both with ghost noise
