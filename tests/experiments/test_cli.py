"""``GhostNoise`` configured through LightningCLI: YAML, command line, schedules, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, List

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("jsonargparse")

from helpers.tiny_lightning import make_dataset, one_thread  # noqa: E402, F401  (one_thread: autouse fixture)
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_ghostnoise import GhostNoise  # noqa: E402
from lightning_ghostnoise.layers import GhostBatchNorm1d, GhostBatchNorm2d  # noqa: E402
from lightning_ghostnoise.schedules import (  # noqa: E402
    Constant,
    Cosine,
    Geometric,
    Piecewise,
    to_ghost_batch_size,
)


@pytest.fixture(autouse=True)
def _clean_argv_and_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest's own arguments must not leak into the CLI (Lightning warns when both are given)
    monkeypatch.setattr("sys.argv", ["cli"])
    # LightningCLI calls seed_everything, which sets PL_GLOBAL_SEED: put the environment back afterwards
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")


class CLIModel(pl.LightningModule):
    """A BatchNorm2d inside ``net`` and a BatchNorm1d outside it (``head_norm``)."""

    def __init__(self, width: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head_norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 2)
        self.seen: List[tuple] = []
        self.seen_values: List[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.net(x).mean((2, 3))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((type(self.net[1]), type(self.head_norm)))
        layer = self.net[1]
        if isinstance(layer, GhostBatchNorm2d):
            self.seen_values.append((self.current_epoch, batch_idx, layer.strength, layer.ghost_batch_size))
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class CLIData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16, num_samples: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.num_samples), batch_size=self.batch_size, shuffle=False)


def _trainer_yaml(tmp_path: Path) -> str:
    return textwrap.dedent(
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
        """
    )


def _write_config(tmp_path: Path, callbacks_yaml: str, name: str = "config.yaml") -> Path:
    text = _trainer_yaml(tmp_path) + textwrap.indent(textwrap.dedent(callbacks_yaml), "  ")
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli(args: List[str], run: bool = False) -> LightningCLI:
    return LightningCLI(CLIModel, CLIData, args=args, run=run, save_config_callback=None)


def _ghost_callbacks(cli: LightningCLI) -> List[GhostNoise]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, GhostNoise)]


def test_yaml_callback_with_values(tmp_path: Path) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              ghost_batch_size: 8
              method: gbn
              strength: 0.5
              seed: 17
        """,
    )
    cli = _cli(["--config", str(cfg)])
    (cb,) = _ghost_callbacks(cli)
    assert cb.method == "gbn"
    assert cb.ghost_batch_size == Constant(8)
    assert cb.strength == Constant(0.5)
    assert cb.seed == 17
    assert cli.trainer.max_epochs == 1


def test_command_line_callback(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path, "")
    cli = _cli(
        [
            "--config",
            str(cfg),
            "--trainer.callbacks+=lightning_ghostnoise.GhostNoise",
            "--trainer.callbacks.ghost_batch_size=8",
            "--trainer.callbacks.method=xbn",
            "--trainer.callbacks.strength=0.25",
        ]
    )
    (cb,) = _ghost_callbacks(cli)
    assert cb.ghost_batch_size == Constant(8)
    assert cb.method == "xbn"
    assert cb.strength == Constant(0.25)
    assert cb.seed is None


def test_yaml_schedules_and_name_filter(tmp_path: Path) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              strength:
                class_path: lightning_ghostnoise.schedules.Cosine
                init_args: {start_value: 0.0, end_value: 1.0, start: 0, end: 3}
              ghost_batch_size:
                class_path: lightning_ghostnoise.schedules.Geometric
                init_args: {start_value: 16, end_value: 4, start: 0, end: 2, per_step: false}
              include_names: ["net.*"]
        """,
    )
    cli = _cli(["--config", str(cfg)])
    (cb,) = _ghost_callbacks(cli)
    assert isinstance(cb.strength, Cosine) and cb.strength == Cosine(0.0, 1.0, start=0, end=3)
    assert isinstance(cb.ghost_batch_size, Geometric)
    assert cb.ghost_batch_size == Geometric(16, 4, start=0, end=2, per_step=False)
    assert cb.include_names == ["net.*"]

    # the configured objects drive a real fit: only net.1 is rewritten, with the scheduled values
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.seen and all(t == (GhostBatchNorm2d, nn.BatchNorm1d) for t in cli.model.seen)
    assert len(cli.model.seen_values) == 4
    for epoch, batch_idx, s, n in cli.model.seen_values:
        assert s == cb.strength(epoch, batch_idx, 4, 1)
        assert n == to_ghost_batch_size(cb.ghost_batch_size(epoch, batch_idx, 4, 1)) == 16
    assert cli.model.seen_values[1][2] == pytest.approx(Cosine(0.0, 1.0, start=0, end=3)(0, 1, 4))
    assert type(cli.model.net[1]) is nn.BatchNorm2d  # reverted after fit


def test_yaml_piecewise_milestones(tmp_path: Path) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              ghost_batch_size:
                class_path: lightning_ghostnoise.schedules.Piecewise
                init_args:
                  milestones: {0: 32, 2: 8}
              exclude_types: [BatchNorm1d]
        """,
    )
    cli = _cli(["--config", str(cfg)])
    (cb,) = _ghost_callbacks(cli)
    assert cb.ghost_batch_size == Piecewise({0: 32, 2: 8})
    assert cb.exclude_types == ["BatchNorm1d"]


def test_cli_fit_subcommand_completes(tmp_path: Path) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              ghost_batch_size: 4
              method: gni
              strength: 1.0
        """,
    )
    cli = _cli(
        ["fit", "--config", str(cfg), "--trainer.max_epochs=2", "--data.batch_size=8", "--seed_everything=3"], run=True
    )
    assert cli.trainer.state.finished
    assert cli.trainer.current_epoch == 2
    assert len(cli.model.seen) == 2 * 8
    assert all(t == (GhostBatchNorm2d, GhostBatchNorm1d) for t in cli.model.seen)
    (cb,) = _ghost_callbacks(cli)
    assert cb.base_seed == 3  # Lightning's global seed from the CLI
    assert type(cli.model.net[1]) is nn.BatchNorm2d and type(cli.model.head_norm) is nn.BatchNorm1d


def _expect_cli_error(args: List[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    with pytest.raises((SystemExit, ValueError)) as info:
        _cli(args)
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
        text = capsys.readouterr().err
    else:  # pragma: no cover - reported as a failure below
        text = str(info.value)
    for needle in needles:
        assert needle in text, text
    return text


def test_bad_method_in_yaml_exits_with_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              method: foo
        """,
    )
    with pytest.raises(SystemExit) as info:
        _cli(["--config", str(cfg)])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "method" in err and "foo" in err, err


def test_unknown_argument_in_yaml_exits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              ghost_batch: 8
        """,
    )
    with pytest.raises(SystemExit) as info:
        _cli(["--config", str(cfg)])
    assert info.value.code not in (0, None)
    assert "ghost_batch" in capsys.readouterr().err


def test_bad_schedule_value_in_yaml_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              strength:
                class_path: lightning_ghostnoise.schedules.Linear
                init_args: {start_value: 1.0, end_value: -1.0}
        """,
    )
    _expect_cli_error(["--config", str(cfg)], capsys, "strength")


def test_yaml_fraction_schedule_fits_with_max_epochs(tmp_path: Path) -> None:
    """``unit="fraction"`` ramps are measured against the Trainer's max_epochs (here 4 epochs of 4 steps)."""
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              method: xbn
              strength:
                class_path: lightning_ghostnoise.schedules.Linear
                init_args: {start_value: 0.0, end_value: 1.0, start: 0, end: 0.5, unit: fraction}
              ghost_batch_size:
                class_path: lightning_ghostnoise.schedules.Geometric
                init_args: {start_value: 8, end_value: 2, start: 0.5, end: 1.0, unit: fraction, per_step: false}
        """,
    )
    cli = _cli(["fit", "--config", str(cfg), "--trainer.max_epochs=4"], run=True)
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 4
    assert [(e, b) for e, b, _, _ in cli.model.seen_values] == [(e, b) for e in range(4) for b in range(4)]
    for epoch, batch_idx, s, n in cli.model.seen_values:
        assert s == pytest.approx(min((epoch + batch_idx / 4) / 2, 1.0))  # ramp over the first 2 of 4 epochs
        assert n == to_ghost_batch_size(8 * 0.25 ** min(max(epoch - 2, 0) / 2, 1.0))  # 8 until epoch 2, then down
    assert [n for _, b, _, n in cli.model.seen_values if b == 0] == [8, 8, 8, 4]


def test_yaml_schedule_below_the_method_minimum_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A schedule that reaches N = 1 late in training is refused when the CLI builds the callback."""
    cfg = _write_config(
        tmp_path,
        """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              method: xbn
              ghost_batch_size:
                class_path: lightning_ghostnoise.schedules.Linear
                init_args: {start_value: 8, end_value: 1, start: 5, end: 10}
        """,
    )
    _expect_cli_error(
        ["--config", str(cfg)], capsys, "ghost_batch_size must be >= 2 for method 'xbn'", "Use a ghost batch size >= 2"
    )


def test_lightning_cli_reads_running_stats(monkeypatch, tmp_path):
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr("sys.argv", ["cli"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")
    callbacks = """\
        callbacks:
          - class_path: lightning_ghostnoise.GhostNoise
            init_args:
              method: gbn
              running_stats: batch
        """
    (cb,) = _ghost_callbacks(_cli(["--config", str(_write_config(tmp_path, callbacks))]))
    assert cb.running_stats == "batch"
    with pytest.raises(SystemExit):  # jsonargparse refuses a value outside the Literal
        _cli(["--config", str(_write_config(tmp_path, callbacks.replace("batch", "full"), "bad.yaml"))])
