"""Tests of the ``GhostNoise`` Lightning callback with real (tiny, CPU) Trainer runs."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lightning.pytorch as pl
import lightning_utilities.core.rank_zero as rank_zero_module
import pytest
import torch
from helpers.tiny_lightning import (
    BATCHES_PER_EPOCH,
    BNModel,
    ConfigureModelBN,
    LinearModel,
    make_trainer,
    one_thread,  # noqa: F401  (autouse fixture)
    optimizer_param_ids,
    param_ids,
    state_tensors,
    states_equal,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_ghostnoise import GhostNoise, apply_ghost_noise, ghost_layers, set_ghost_batch_size, set_strength
from lightning_ghostnoise.layers import GhostBatchNorm1d, GhostBatchNorm2d
from lightning_ghostnoise.schedules import Linear, Piecewise, to_ghost_batch_size
from lightning_ghostnoise.seeding import derive_seed

_LIGHTNING = tuple(int(p) for p in pl.__version__.split(".")[:2])

PLAIN = (nn.BatchNorm2d, nn.BatchNorm2d)
GHOST = (GhostBatchNorm2d, GhostBatchNorm2d)


@pytest.fixture(autouse=True)
def _no_global_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``seed_everything`` leaves PL_GLOBAL_SEED in the environment, which the callback reads: start
    # every test without it, and put the environment back as it was afterwards
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")


# --------------------------------------------------------------------------- #
# When the layers are rewritten, and when they are put back
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_rewrite_before_configure_optimizers_and_revert_after_fit(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    model = BNModel()
    trainer = make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4, method=method)], max_epochs=1)
    trainer.fit(model)

    # rewritten in setup: configure_optimizers already sees the ghost layers
    assert model.opt_norm_types == [GHOST]
    assert model.opt_ids_at_configure == [True]
    # during training: ghost layers, and the optimizer holds exactly the model's parameters
    assert model.train_norm_types and all(t == GHOST for t in model.train_norm_types)
    assert model.opt_ids_match and all(model.opt_ids_match)
    # after fit: plain layers again, still the optimizer's parameters
    assert (type(model.bn1), type(model.bn2)) == PLAIN
    assert optimizer_param_ids(trainer.optimizers[0]) == param_ids(model.parameters())
    assert not ghost_layers(model)


@pytest.mark.parametrize("method", ["gni", "gbn"])
def test_revert_on_fit_end_false_keeps_ghost_layers(tmp_path: Path, method: str) -> None:
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4, method=method, strength=0.5, revert_on_fit_end=False)
    make_trainer(tmp_path, [cb]).fit(model)
    assert (type(model.bn1), type(model.bn2)) == GHOST
    assert model.bn1.method == method and model.bn1.ghost_batch_size == 4 and model.bn1.strength == 0.5
    assert optimizer_param_ids(model.trainer.optimizers[0]) == param_ids(model.parameters())


def test_validation_during_fit_sees_plain_eval_behaviour(tmp_path: Path) -> None:
    # during fit the validation loop runs the ghost layers in eval mode: same output as the plain model
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4, revert_on_fit_end=False)
    make_trainer(tmp_path, [cb], limit_val_batches=1, num_sanity_val_steps=1).fit(model)
    assert model.val_norm_types and all(t == GHOST for t in model.val_norm_types)
    x = torch.randn(8, 3, 4, 4)
    model.eval()
    with torch.no_grad():
        ghost_out = model(x)
        plain = BNModel()
        plain.load_state_dict(model.state_dict(), strict=True)
        plain.eval()
        assert torch.equal(ghost_out, plain(x))


def test_validate_and_test_do_not_rewrite(tmp_path: Path) -> None:
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4)
    trainer = make_trainer(tmp_path, [cb], limit_val_batches=None)
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    assert model.val_norm_types and all(t == PLAIN for t in model.val_norm_types)
    assert model.test_norm_types and all(t == PLAIN for t in model.test_norm_types)
    assert (type(model.bn1), type(model.bn2)) == PLAIN
    assert not model.train_norm_types


# --------------------------------------------------------------------------- #
# The noise is really there (and really absent at strength 0)
# --------------------------------------------------------------------------- #
def _fit_from_seed(tmp_path: Path, callbacks: List[pl.Callback], seed: int = 7, epochs: int = 1) -> BNModel:
    pl.seed_everything(seed, verbose=False)
    model = BNModel()
    make_trainer(tmp_path, callbacks, max_epochs=epochs).fit(model)
    return model


@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_noise_changes_training_outputs(tmp_path: Path, method: str) -> None:
    plain = _fit_from_seed(tmp_path / "plain", [])
    noisy = _fit_from_seed(tmp_path / method, [GhostNoise(ghost_batch_size=2, method=method, seed=3)])
    assert len(plain.losses) == len(noisy.losses) == BATCHES_PER_EPOCH
    # same initial weights and data: the very first loss already differs through the noise
    assert not torch.equal(plain.losses[0], noisy.losses[0])
    assert not states_equal(state_tensors(plain), state_tensors(noisy))


def test_strength_zero_is_bit_identical_to_plain(tmp_path: Path) -> None:
    plain = _fit_from_seed(tmp_path / "plain", [], epochs=2)
    a = state_tensors(plain)
    for method in ("gni", "gbn", "xbn", "analytic"):
        cb = GhostNoise(ghost_batch_size=4, method=method, strength=0.0)
        zero = _fit_from_seed(tmp_path / method, [cb], epochs=2)
        assert zero.train_norm_types and all(t == GHOST for t in zero.train_norm_types), method
        assert [float(v) for v in plain.losses] == [float(v) for v in zero.losses], method
        b = state_tensors(zero)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)


class _RngProbe(pl.Callback):
    """Draws from the global RNG at every training batch (as dropout or augmentation would)."""

    def __init__(self) -> None:
        self.draws: List[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.draws.append(torch.rand(3))


def test_noise_does_not_touch_the_global_rng(tmp_path: Path) -> None:
    plain_probe, gni_probe = _RngProbe(), _RngProbe()
    _fit_from_seed(tmp_path / "plain", [plain_probe])
    _fit_from_seed(tmp_path / "gni", [GhostNoise(ghost_batch_size=2, seed=1), gni_probe])
    assert len(plain_probe.draws) == len(gni_probe.draws) == BATCHES_PER_EPOCH
    for a, b in zip(plain_probe.draws, gni_probe.draws):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def _ghost_state_entries(ckpt: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return [(k, v) for k, v in ckpt.get("callbacks", {}).items() if "GhostNoise" in k]


def test_ghost_checkpoint_loads_strictly_into_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BNModel()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    cb = GhostNoise(ghost_batch_size=4)
    make_trainer(tmp_path, [cb, ckpt_cb], enable_checkpointing=True, max_epochs=2).fit(model)
    path = tmp_path / "ckpts" / "last.ckpt"
    assert path.exists()
    ckpt = torch.load(path, weights_only=False)
    # saved while the ghost layers were in place: same keys as the plain model, no extra buffers
    assert set(ckpt["state_dict"]) == set(BNModel().state_dict())
    assert not any("ghost" in k for k in ckpt["state_dict"])

    loaded = BNModel.load_from_checkpoint(path, strict=True)
    assert (type(loaded.bn1), type(loaded.bn2)) == PLAIN
    assert states_equal(state_tensors(loaded), state_tensors(model))

    fresh = BNModel()
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert states_equal(state_tensors(fresh), state_tensors(model))


def test_plain_checkpoint_loads_strictly_into_ghost_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BNModel()
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)

    ghost = apply_ghost_noise(BNModel(), ghost_batch_size=4)
    assert (type(ghost.bn1), type(ghost.bn2)) == GHOST
    ghost.load_state_dict(ckpt["state_dict"], strict=True)
    assert states_equal(state_tensors(ghost), state_tensors(model))
    for method in ("gbn", "xbn", "analytic"):
        apply_ghost_noise(ghost, ghost_batch_size=4, method=method).load_state_dict(ckpt["state_dict"], strict=True)

    # and resuming the plain checkpoint with the callback attached works (no GhostNoise state in it)
    resumed = BNModel()
    cb = GhostNoise(ghost_batch_size=4)
    make_trainer(tmp_path, [cb], max_epochs=2).fit(resumed, ckpt_path=path)
    assert resumed.train_norm_types and all(t == GHOST for t in resumed.train_norm_types)
    assert len(resumed.losses) == BATCHES_PER_EPOCH
    assert (type(resumed.bn1), type(resumed.bn2)) == PLAIN


class _SeedProbe(pl.Callback):
    """Records the callback's base seed and every layer's seed at each training step."""

    def __init__(self, ghost: GhostNoise) -> None:
        self.ghost = ghost
        self.rows: List[Tuple[int, int, int, List[int]]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # runs after GhostNoise.on_train_batch_start (callbacks run in list order)
        counter = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        seeds = [layer.seed for _, layer in ghost_layers(pl_module)]
        self.rows.append((self.ghost.base_seed, counter, trainer.global_step, seeds))


def test_resume_restores_callback_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4)  # seed=None and no PL_GLOBAL_SEED: drawn once
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model)
    saved_seed = cb.base_seed
    assert isinstance(saved_seed, int) and 0 <= saved_seed < 2**32
    path = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=False)
    entries = _ghost_state_entries(ckpt)
    assert len(entries) == 1, list(ckpt.get("callbacks", {}))
    assert entries[0][1]["base_seed"] == saved_seed

    new_cb = GhostNoise(ghost_batch_size=4)
    probe = _SeedProbe(new_cb)
    resumed = BNModel()
    make_trainer(tmp_path, [new_cb, probe], max_epochs=4).fit(resumed, ckpt_path=path)
    assert new_cb.base_seed == saved_seed
    # two more epochs were trained, with ghost layers, all reseeded from the restored base seed
    assert len(resumed.losses) == 2 * BATCHES_PER_EPOCH
    assert resumed.train_norm_types and all(t == GHOST for t in resumed.train_norm_types)
    assert len(probe.rows) == 2 * BATCHES_PER_EPOCH
    all_seeds = []
    for base, _, _, seeds in probe.rows:
        assert base == saved_seed
        assert len(seeds) == 2
        all_seeds.extend(seeds)
    assert len(set(all_seeds)) == len(all_seeds)  # a fresh stream per (step, layer)
    # the streams are those the uninterrupted run would use: derived from the restored base seed
    base, counter, _, seeds = probe.rows[0]
    assert seeds == [derive_seed(saved_seed, 0, counter, i) for i in range(2)]
    assert probe.rows[0][2] == 2 * BATCHES_PER_EPOCH  # resumed at global step 8
    assert (type(resumed.bn1), type(resumed.bn2)) == PLAIN


class _SaveAt(pl.Callback):
    """Save a checkpoint at the end of a given global step, or at the end of a given epoch, then stop."""

    def __init__(self, path: Path, global_step: int = -1, epoch_end: int = -1) -> None:
        self.path, self.global_step, self.epoch_end = path, global_step, epoch_end

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.global_step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch_end:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("method", ["gni", "analytic"])
def test_resume_from_epoch_end_reproduces_uninterrupted_run(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Noise is a pure function of (base seed, rank, step, layer): an end-of-epoch resume is exact.

    The uninterrupted and the first run take their base seed from PL_GLOBAL_SEED; the resumed run
    has none, so it gets the same noise only if the base seed is restored from the checkpoint.
    """

    def run(callbacks: List[pl.Callback], root: Path, epochs: int, ckpt_path: Any = None) -> BNModel:
        if ckpt_path is None:
            monkeypatch.setenv("PL_GLOBAL_SEED", "4321")
        else:
            monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
        torch.manual_seed(0)
        model = BNModel(momentum=0.9)
        make_trainer(root, callbacks, max_epochs=epochs).fit(model, ckpt_path=ckpt_path)
        return model

    results = {}
    for name, make_cbs in {
        "plain": lambda: [],
        "ghost": lambda: [GhostNoise(ghost_batch_size=2, method=method)],
    }.items():
        full = run(make_cbs(), tmp_path / name / "full", epochs=3)
        path = tmp_path / name / "epoch1.ckpt"
        run(make_cbs() + [_SaveAt(path, epoch_end=1)], tmp_path / name / "first", epochs=3)
        resumed = run(make_cbs(), tmp_path / name / "resumed", epochs=3, ckpt_path=path)
        assert len(resumed.losses) == BATCHES_PER_EPOCH
        results[name] = (full, resumed)
    # Lightning itself resumes exactly (control); so must the ghost-noise run
    full, resumed = results["plain"]
    assert states_equal(state_tensors(full), state_tensors(resumed))
    full, resumed = results["ghost"]
    assert [float(v) for v in full.losses[-BATCHES_PER_EPOCH:]] == [float(v) for v in resumed.losses]
    assert states_equal(state_tensors(full), state_tensors(resumed))


# --------------------------------------------------------------------------- #
# configure_model, frozen BN, subclasses, SyncBN
# --------------------------------------------------------------------------- #
def test_layers_created_in_configure_model_are_rewritten(tmp_path: Path) -> None:
    model = ConfigureModelBN()
    cb = GhostNoise(ghost_batch_size=4)
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model)
    assert model.train_norm_types
    assert all(t == (GhostBatchNorm2d, GhostBatchNorm1d) for t in model.train_norm_types)
    assert all(model.opt_ids_match)
    assert model.norm_types() == (nn.BatchNorm2d, nn.BatchNorm1d)


def test_configure_model_layers_give_no_spurious_no_effect_warning(tmp_path: Path) -> None:
    # the model's norm layers exist only after configure_model; the callback does rewrite them, so
    # a warning that ghost noise "has no effect on this model" would be false
    model = ConfigureModelBN()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)], max_epochs=1).fit(model)
    assert all(t == (GhostBatchNorm2d, GhostBatchNorm1d) for t in model.train_norm_types)
    no_effect = [str(w.message) for w in caught if "no effect" in str(w.message)]
    assert not no_effect, no_effect


class _CustomBNInConfigureModel(ConfigureModelBN):
    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        assert self.net is not None
        self.net[1] = MyBN(4)


def test_custom_bn_subclass_created_in_configure_model_warns(tmp_path: Path) -> None:
    # "never fail silently": a skipped custom layer must be reported wherever the model builds it
    model = _CustomBNInConfigureModel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)], max_epochs=1).fit(model)
    assert model.train_norm_types and all(t == (MyBN, GhostBatchNorm1d) for t in model.train_norm_types)
    named = [str(w.message) for w in caught if "MyBN" in str(w.message)]
    assert named, [str(w.message) for w in caught]


class _FailingModel(BNModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise RuntimeError("boom at batch 2")
        return super().training_step(batch, batch_idx)


def test_exception_during_fit_reverts_layers(tmp_path: Path) -> None:
    model = _FailingModel()
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)], max_epochs=1).fit(model)
    assert len(model.train_norm_types) == 2 and all(t == GHOST for t in model.train_norm_types)
    assert (type(model.bn1), type(model.bn2)) == PLAIN
    # the plain model still works and its state dict is the usual one
    model.load_state_dict(BNModel().state_dict(), strict=True)


@pytest.mark.parametrize("method", ["gni", "gbn", "xbn", "analytic"])
def test_bf16_true_precision_fit(tmp_path: Path, method: str) -> None:
    # precision plugins cast the module (and set the default dtype in forward) after setup
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4, method=method)
    make_trainer(tmp_path, [cb], precision="bf16-true", max_epochs=1).fit(model)
    assert len(model.losses) == BATCHES_PER_EPOCH
    assert all(t == GHOST for t in model.train_norm_types)
    assert torch.isfinite(torch.stack([v.float() for v in model.losses])).all()


class FrozenBN1(BNModel):
    """``bn1`` is frozen (eval mode) during training; ``bn2`` trains normally."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1_checks: List[bool] = []
        self.bn2_noisy: List[bool] = []
        self.frozen_stats: Dict[str, torch.Tensor] = {}

    def running_stats(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self.bn1, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}

    def on_train_epoch_start(self) -> None:
        self.bn1.eval()
        if not self.frozen_stats:
            self.frozen_stats = self.running_stats()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            h1 = self.conv1(x)
            eval_out = nn.functional.batch_norm(
                h1,
                self.bn1.running_mean,
                self.bn1.running_var,
                self.bn1.weight,
                self.bn1.bias,
                False,
                0.0,
                self.bn1.eps,
            )
            self.bn1_checks.append(torch.equal(self.bn1(h1), eval_out))
            # bn2 in train mode: the ghost layer's output differs from plain batch norm
            h2 = self.conv2(torch.relu(eval_out))
            plain_train = nn.functional.batch_norm(
                h2, None, None, self.bn2.weight, self.bn2.bias, True, 0.0, self.bn2.eps
            )
            self.bn2_noisy.append(not torch.allclose(self.bn2(h2), plain_train, atol=1e-6))
        return super().training_step(batch, batch_idx)


def test_frozen_bn_gets_no_noise(tmp_path: Path) -> None:
    model = FrozenBN1()
    bn2_before = model.bn2.running_mean.clone()
    make_trainer(tmp_path, [GhostNoise(ghost_batch_size=2, revert_on_fit_end=False)], max_epochs=2).fit(model)
    assert isinstance(model.bn1, GhostBatchNorm2d) and not model.bn1.training
    assert len(model.bn1_checks) == 2 * BATCHES_PER_EPOCH and all(model.bn1_checks)
    # running statistics of the frozen layer never change
    assert model.frozen_stats
    for k, v in model.running_stats().items():
        assert torch.equal(v, model.frozen_stats[k]), k
    # control: the non-frozen layer does get noise and does update its statistics
    assert all(model.bn2_noisy)
    assert not torch.equal(model.bn2.running_mean, bn2_before)


class MyBN(nn.BatchNorm2d):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x) * 1.0


class SubclassBNModel(BNModel):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = MyBN(4)


def test_custom_bn_subclass_is_skipped_with_warning(tmp_path: Path) -> None:
    model = SubclassBNModel()
    custom = model.bn1
    MyBN.calls = 0
    with pytest.warns(UserWarning, match="MyBN"):
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)], max_epochs=1).fit(model)
    assert model.train_norm_types
    assert all(t == (MyBN, GhostBatchNorm2d) for t in model.train_norm_types)
    assert model.bn1 is custom  # left alone, and still used
    assert MyBN.calls >= BATCHES_PER_EPOCH
    assert type(model.bn2) is nn.BatchNorm2d  # the other layer was reverted


def test_sync_batchnorm_layer_sync_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    trainer = make_trainer(tmp_path, sync_batchnorm=True)
    # a single-device strategy has no layer sync; DDP/FSDP get ``_layer_sync`` from the connector
    # (DDP itself is tested out of process): emulate it
    assert trainer._accelerator_connector._layer_sync is not None
    trainer.strategy._layer_sync = TorchSyncBatchNorm()
    model = BNModel()
    cb = GhostNoise(ghost_batch_size=4)
    with pytest.raises(MisconfigurationException, match="sync_batchnorm") as info:
        cb.setup(trainer, model, "fit")
    assert "sync=True" in str(info.value)
    assert (type(model.bn1), type(model.bn2)) == PLAIN  # refused before touching anything


def test_sync_batchnorm_on_single_device_keeps_ghost_layers(tmp_path: Path) -> None:
    # a single-device strategy never converts to SyncBatchNorm: the ghost layers must stay in place
    model = BNModel()
    make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)], sync_batchnorm=True).fit(model)
    assert model.train_norm_types and all(t == GHOST for t in model.train_norm_types)


# --------------------------------------------------------------------------- #
# Messages and logging
# --------------------------------------------------------------------------- #
def test_model_without_norm_layers_warns_no_effect(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no effect"):
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4)]).fit(LinearModel())


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_summary_line_is_logged_at_info(tmp_path: Path) -> None:
    # rank_zero_info is lightning_utilities'; importing Lightning points that module's logger at
    # "lightning.pytorch.utilities.rank_zero", under Lightning's own INFO console handler
    logger = rank_zero_module.log
    assert logger.isEnabledFor(logging.INFO)  # visible to users by default
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4, seed=5)]).fit(BNModel())
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in handler.records if r.levelno == logging.INFO]
    summary = [m for m in messages if m.startswith("GhostNoise: rewrote")]
    assert len(summary) == 1, messages
    assert "GhostNoise: rewrote 2 BatchNorm2d" in summary[0]
    assert "method=gni" in summary[0] and "seed 5" in summary[0]


def _read_csv_metrics(log_dir: str) -> List[Dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_scheduled_values_are_logged(tmp_path: Path) -> None:
    strength = Linear(0.0, 1.0, start=0, end=2, per_step=True)
    gbs = Piecewise({0: 8, 1: 4})
    logger = CSVLogger(tmp_path, name="logs")
    model = BNModel()
    make_trainer(
        tmp_path,
        [GhostNoise(ghost_batch_size=gbs, strength=strength)],
        logger=logger,
        log_every_n_steps=1,
        max_epochs=2,
    ).fit(model)
    rows = _read_csv_metrics(logger.log_dir)
    assert rows and "ghostnoise/strength" in rows[0] and "ghostnoise/ghost_batch_size" in rows[0]
    logged = {
        int(r["step"]): (float(r["ghostnoise/strength"]), float(r["ghostnoise/ghost_batch_size"]))
        for r in rows
        if r.get("ghostnoise/strength")
    }
    assert sorted(logged) == list(range(2 * BATCHES_PER_EPOCH))
    for step, (s, n) in logged.items():
        epoch, batch = divmod(step, BATCHES_PER_EPOCH)
        assert s == pytest.approx(strength(epoch, batch, BATCHES_PER_EPOCH, 2))
        assert n == to_ghost_batch_size(gbs(epoch, batch, BATCHES_PER_EPOCH, 2))


def test_log_values_false_logs_nothing(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    make_trainer(tmp_path, [GhostNoise(ghost_batch_size=4, log_values=False)], logger=logger, log_every_n_steps=1).fit(
        BNModel()
    )
    path = Path(logger.log_dir) / "metrics.csv"
    if path.exists():
        rows = _read_csv_metrics(logger.log_dir)
        assert not any(k.startswith("ghostnoise/") for r in rows for k in r)


# --------------------------------------------------------------------------- #
# Bad input at construction
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "foo"}, r"Unknown ghost noise method 'foo'.*gni"),
        ({"ghost_batch_size": 0}, r"ghost_batch_size"),
        ({"ghost_batch_size": -4}, r"ghost_batch_size"),
        ({"strength": -0.5}, r"strength"),
        ({"seed": -1}, r"seed.*4294967295"),
        ({"seed": 2**32}, r"seed.*4294967295"),
        ({"sync": True, "method": "gbn"}, r"sync=True.*'gbn'"),
        ({"sync": True, "method": "xbn"}, r"sync=True.*'xbn'"),
        ({"method": "xbn", "ghost_batch_size": 1}, r">= 2.*xbn"),
        ({"strength": Linear(1.0, -1.0)}, r"strength"),
        ({"ghost_batch_size": Piecewise({0: 8, 2: 0})}, r"ghost_batch_size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GhostNoise(**kwargs)


def test_good_arguments_are_accepted() -> None:
    cb = GhostNoise(ghost_batch_size=8, method="GBN", seed=2**32 - 1, sync=False)
    assert cb.method == "gbn" and cb.seed == 2**32 - 1
    assert GhostNoise(method="analytic", sync=True, seed=0).sync is True


# --------------------------------------------------------------------------- #
# Schedules through the callback
# --------------------------------------------------------------------------- #
class _ValueRecorder(pl.Callback):
    """Records (epoch, batch_idx, strength, ghost_batch_size) of every ghost layer in training_step."""

    def __init__(self) -> None:
        self.rows: List[Tuple[int, int, float, int]] = []
        self.info: Dict[str, Any] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        layers = [layer for _, layer in ghost_layers(pl_module)]
        assert len(layers) == 2
        assert len({(g.strength, g.ghost_batch_size) for g in layers}) == 1
        self.rows.append((trainer.current_epoch, batch_idx, layers[0].strength, layers[0].ghost_batch_size))
        self.info = {"steps": trainer.num_training_batches, "max_epochs": trainer.max_epochs}


def _schedule_callback() -> GhostNoise:
    return GhostNoise(
        ghost_batch_size=Piecewise({0: 32, 1: 8}), strength=Linear(0.0, 1.0, start=0, end=2, per_step=True)
    )


@pytest.fixture(scope="module")
def uninterrupted_schedule_run(tmp_path_factory: pytest.TempPathFactory) -> Tuple[GhostNoise, _ValueRecorder]:
    cb = _schedule_callback()
    rec = _ValueRecorder()
    make_trainer(tmp_path_factory.mktemp("full"), [cb, rec], max_epochs=3).fit(BNModel())
    return cb, rec


def test_schedules_set_layer_values_per_step(uninterrupted_schedule_run: Tuple[GhostNoise, _ValueRecorder]) -> None:
    cb, rec = uninterrupted_schedule_run
    assert len(rec.rows) == 3 * BATCHES_PER_EPOCH
    steps, max_epochs = rec.info["steps"], rec.info["max_epochs"]
    assert (steps, max_epochs) == (BATCHES_PER_EPOCH, 3)
    for epoch, batch_idx, s, n in rec.rows:
        assert s == cb.strength(epoch, batch_idx, steps, max_epochs)
        assert n == to_ghost_batch_size(cb.ghost_batch_size(epoch, batch_idx, steps, max_epochs))
    # the schedule really moves: per step within epochs, and the ghost batch size changes at epoch 1
    assert [r[2] for r in rec.rows[:5]] == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert [r[3] for r in rec.rows] == [32] * 4 + [8] * 8
    assert rec.rows[-1][2] == 1.0


@pytest.mark.parametrize(
    "save",
    [
        pytest.param({"global_step": 6}, id="mid-epoch"),
        pytest.param({"epoch_end": 0}, id="epoch-end"),
    ],
)
def test_schedules_continue_exactly_after_resume(
    tmp_path: Path, save: Dict[str, int], uninterrupted_schedule_run: Tuple[GhostNoise, _ValueRecorder]
) -> None:
    _, full = uninterrupted_schedule_run
    expected = {(e, b): (s, n) for e, b, s, n in full.rows}
    assert len(expected) == 3 * BATCHES_PER_EPOCH

    path = tmp_path / "interrupted.ckpt"
    make_trainer(tmp_path / "first", [_schedule_callback(), _SaveAt(path, **save)], max_epochs=3).fit(BNModel())
    assert path.exists()

    resumed = _ValueRecorder()
    make_trainer(tmp_path / "resumed", [_schedule_callback(), resumed], max_epochs=3).fit(BNModel(), ckpt_path=path)
    first = (1, 2) if "global_step" in save else (1, 0)
    if "global_step" in save and _LIGHTNING < (2, 5):
        first = (1, 1)  # Lightning < 2.5 repeats the batch whose end saved the checkpoint
    assert resumed.rows and tuple(resumed.rows[0][:2]) == first
    assert (resumed.rows[-1][0], resumed.rows[-1][1]) == (2, BATCHES_PER_EPOCH - 1)
    for epoch, batch_idx, s, n in resumed.rows:
        assert (s, n) == expected[(epoch, batch_idx)], (epoch, batch_idx)


# --------------------------------------------------------------------------- #
# torch.compile: schedules must not cause a recompilation per value
# --------------------------------------------------------------------------- #
class _CountingBackend:
    """An eager dynamo backend that counts the graphs it is asked to compile."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return gm.forward


def test_compile_does_not_recompile_per_strength_or_ghost_batch_size() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        model = apply_ghost_noise(model, ghost_batch_size=4, method="gni", strength=0.1)
        ((_, layer),) = ghost_layers(model)
        # under torch.compile the draws come from the counter-based generator; the eager reference
        # below uses it too, so both see the same noise
        layer.counter_rng = True
        backend = _CountingBackend()
        compiled = torch.compile(model, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(16, 3, 4, 4)

        def step(seed: int) -> torch.Tensor:
            # as the callback does: a fresh noise stream per step, then one training step
            layer.reseed(seed)
            out = compiled(x)
            with torch.no_grad():
                layer.reseed(seed)
                eager = model(x)
            # the compiled model computes what the eager one does, with the current strength
            assert torch.allclose(out, eager, atol=1e-6)
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            return out.detach()

        after_first = None
        for i in range(12):
            set_strength(model, round(0.1 * (i + 1), 6))
            step(i)
            if i == 0:
                after_first = backend.graphs
        assert after_first is not None and after_first >= 1
        # twelve strength values (and twelve reseeds), not one more compilation than for the first
        assert backend.graphs == after_first

        # strength 0 is a documented Python-level switch (the plain layer): at most one more set
        set_strength(model, 0.0)
        step(100)
        set_strength(model, 0.5)
        step(101)
        after_zero = backend.graphs
        assert after_zero <= 2 * after_first

        # three ghost batch sizes: at most one compilation each (plus one), none when cycling again
        for n in (2, 8, 4):
            set_ghost_batch_size(model, n)
            step(200 + n)
        after_sizes = backend.graphs
        assert after_sizes - after_zero <= 3 * after_first + after_first
        for n in (2, 8, 4, 2, 8, 4):
            set_ghost_batch_size(model, n)
            step(300 + n)
        assert backend.graphs == after_sizes
    finally:
        torch._dynamo.reset()
