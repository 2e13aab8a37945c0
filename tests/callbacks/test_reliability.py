"""Reliability as a new user meets it: fraction schedules, whole-range validation, strength > 1,
non-finite samples, and the package's torch requirement."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any, List, Tuple

import lightning.pytorch as pl
import pytest
import torch
from helpers.tiny_lightning import BATCHES_PER_EPOCH, BNModel, make_dataset, make_trainer, one_thread  # noqa: F401
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_ghostnoise import GhostNoise, apply_ghost_noise, set_ghost_batch_size, set_strength
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.layers import GhostBatchNorm1d, GhostBatchNorm2d, GhostGroupNorm, GhostLayerNorm
from lightning_ghostnoise.layers import validation as GL
from lightning_ghostnoise.schedules import (
    Constant,
    Cosine,
    Geometric,
    Linear,
    Piecewise,
    Schedule,
    Sequential,
    WarmUp,
    to_ghost_batch_size,
)

ROOT = Path(__file__).resolve().parents[2]


class ValueSpy(pl.Callback):
    """Records the strength and ghost batch size ``bn1`` uses in every training step."""

    def __init__(self) -> None:
        self.seen: List[Tuple[int, int, float, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        layer = pl_module.bn1
        self.seen.append((trainer.current_epoch, batch_idx, layer.strength, layer.ghost_batch_size))


def _fit(tmp_path: Path, callback: GhostNoise, **trainer_args: Any) -> ValueSpy:
    spy = ValueSpy()  # after GhostNoise: it sees the values of the current step
    make_trainer(tmp_path, [callback, spy], **trainer_args).fit(BNModel())
    return spy


# --------------------------------------------------------------------------- #
# 1. unit="fraction" schedules
# --------------------------------------------------------------------------- #
def test_fraction_schedules_follow_max_epochs(tmp_path: Path) -> None:
    """The README's example, with a per-epoch fraction ramp of the ghost batch size for XBN (needs N >= 2)."""
    strength = Linear(0.0, 1.0, start=0, end=0.5, unit="fraction")
    size = Linear(8, 2, start=0.25, end=0.75, unit="fraction", per_step=False)
    spy = _fit(tmp_path, GhostNoise(ghost_batch_size=size, strength=strength, method="xbn"), max_epochs=4)
    steps = BATCHES_PER_EPOCH
    assert [(e, b) for e, b, _, _ in spy.seen] == [(e, b) for e in range(4) for b in range(steps)]
    for epoch, batch_idx, s, n in spy.seen:
        t = epoch + batch_idx / steps  # the run is 4 epochs: the strength ramps over its first 2
        assert s == pytest.approx(min(t / 2.0, 1.0))
        # ghost batch size: 8 until epoch 1, linear to 2 at epoch 3, per epoch
        assert n == to_ghost_batch_size(8 - 6 * min(max(epoch - 1, 0) / 2.0, 1.0))
    assert [n for e, b, _, n in spy.seen if b == 0] == [8, 8, 5, 2]


@pytest.mark.parametrize(
    "trainer_args, run_epochs",
    [
        (dict(max_epochs=-1, max_steps=6), 1.5),  # 6 batches of 4 per epoch
        (dict(max_epochs=-1, max_steps=3, accumulate_grad_batches=2), 1.5),  # 3 optimizer steps of 2 batches
        (dict(max_epochs=3, max_steps=2), 0.5),  # max_steps ends training first
        (dict(max_epochs=1, max_steps=100), 1.0),  # max_epochs ends training first
    ],
)
def test_fraction_schedules_follow_max_steps(tmp_path: Path, trainer_args: dict, run_epochs: float) -> None:
    spy = _fit(tmp_path, GhostNoise(strength=Linear(0.0, 1.0, start=0, end=0.5, unit="fraction")), **trainer_args)
    assert spy.seen
    for epoch, batch_idx, s, _ in spy.seen:
        t = epoch + batch_idx / BATCHES_PER_EPOCH
        assert s == pytest.approx(min(t / (0.5 * run_epochs), 1.0))


def test_fraction_schedule_without_run_length_fails_at_setup(tmp_path: Path) -> None:
    model = BNModel()
    cb = GhostNoise(strength=WarmUp(1, Cosine(0.0, 1.0, start=0, end=1, unit="fraction")))
    trainer = make_trainer(tmp_path, [cb], max_epochs=-1)
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(model)
    message = str(info.value)
    for needle in (
        "unit='fraction'",
        "strength=WarmUp",
        "Trainer(max_epochs=...)",
        "Trainer(max_steps=...)",
        "unit='epoch'",
    ):
        assert needle in message, message
    assert not model.losses  # failed before the first step
    assert type(model.bn1) is nn.BatchNorm2d


class _Endless(IterableDataset):
    def __iter__(self) -> Any:
        data = make_dataset()
        while True:
            yield from (data[i] for i in range(len(data)))


def test_fraction_schedule_with_max_steps_and_an_unsized_loader_fails_before_training(tmp_path: Path) -> None:
    model = BNModel()
    model.train_dataloader = lambda: DataLoader(_Endless(), batch_size=16)  # type: ignore[method-assign]
    cb = GhostNoise(strength=Linear(0.0, 1.0, end=1.0, unit="fraction"))
    trainer = make_trainer(tmp_path, [cb], max_epochs=-1, max_steps=4)
    with pytest.raises(MisconfigurationException, match=r"no known length.*dataloader has no length"):
        trainer.fit(model)
    assert not model.losses


class _StopAfterTwoEpochs(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.should_stop = trainer.current_epoch >= 1


def test_epoch_schedules_run_without_a_run_length(tmp_path: Path) -> None:
    """Only fraction schedules need the length: an epoch schedule trains with max_epochs=-1."""
    spy = ValueSpy()
    callbacks = [GhostNoise(strength=Linear(0.0, 1.0, end=1)), spy, _StopAfterTwoEpochs()]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=-1, limit_train_batches=2)
    trainer.fit(BNModel())
    assert [s for _, _, s, _ in spy.seen] == [0.0, 0.5, 1.0, 1.0]


# --------------------------------------------------------------------------- #
# 2. what a large ghost batch size does
# --------------------------------------------------------------------------- #
def test_ghost_batch_size_message_states_what_large_sizes_do() -> None:
    with pytest.raises(ValueError) as info:
        Linear(8, 0.25).validate_for("ghost_batch_size")
    message = str(info.value)
    assert "disables ghost noise" not in message
    assert "gbn with a ghost batch size >= the batch size is plain BatchNorm" in message
    assert "gni, analytic and xbn still add some noise at any size" in message
    assert "xbn and analytic GNI need >= 2" in message
    doc = " ".join((WarmUp.__doc__ or "").split())  # Python 3.13 strips docstrings' indentation, earlier ones keep it
    assert "disables ghost noise" not in doc and "only gbn becomes exactly plain BatchNorm" in doc


@pytest.mark.parametrize("method", ["gni", "analytic", "gbn", "xbn"])
def test_large_ghost_batch_size_is_plain_batchnorm_only_for_gbn(method: str) -> None:
    """What the message says: N >= B is plain BatchNorm for gbn, and still noise for the others."""
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    plain = nn.BatchNorm2d(3)
    ghost = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=32, seed=1)
    same = torch.allclose(ghost(x), plain(x), atol=1e-5)
    assert same == (method == "gbn")


# --------------------------------------------------------------------------- #
# 3. the whole range of a schedule is checked at construction
# --------------------------------------------------------------------------- #
BELOW_TWO: List[Tuple[Schedule, float]] = [
    (Constant(1.0), 1.0),
    (Piecewise({0: 8, 3: 1}), 1.0),
    (Linear(8, 1.2, start=1, end=4), 1.2),
    (Cosine(16, 1, start=0, end=10), 1.0),
    (Geometric(16, 1.4, start=2, end=5), 1.4),
    (WarmUp(2, 8, off_value=1), 1.0),  # the warm-up's own value
    (WarmUp(1, Linear(8, 1, start=1, end=3), off_value=8), 1.0),
    (Sequential([8, Linear(4, 1.3, start=2, end=3)], [2]), 1.3),
    (Linear(8, 1, start=0.5, end=1.0, unit="fraction"), 1.0),
]


@pytest.mark.parametrize("method", ["xbn", "analytic"])
@pytest.mark.parametrize("schedule, low", BELOW_TWO, ids=lambda v: type(v).__name__)
def test_schedule_below_the_method_minimum_is_refused_at_construction(
    method: str, schedule: Schedule, low: float
) -> None:
    """Most of these start at a valid size and would fail only when the value drops, mid-training."""
    with pytest.raises(ValueError) as info:
        GhostNoise(ghost_batch_size=schedule, method=method)
    message = str(info.value)
    assert f"ghost_batch_size must be >= 2 for method {method!r}" in message
    assert f"{low:g}" in message and "got 1" in message  # which value, and what it rounds to
    assert "Use a ghost batch size >= 2" in message  # how to fix it
    if not isinstance(schedule, Constant):
        assert repr(schedule) in message and "keep every value of the schedule >= 1.5" in message


@pytest.mark.parametrize("method", ["xbn", "analytic"])
def test_schedule_that_rounds_to_two_is_accepted(method: str) -> None:
    GhostNoise(ghost_batch_size=Sequential([8, Geometric(8, 1.5, start=1, end=3)], [1]), method=method)
    GhostNoise(ghost_batch_size=WarmUp(0, 4, off_value=1), method=method)  # no warm-up epoch: off_value unused


def test_analytic_shift_only_accepts_size_one_schedules() -> None:
    GhostNoise(ghost_batch_size=Linear(8, 1, end=3), method="analytic", scale_noise=False)
    GhostNoise(ghost_batch_size=Linear(8, 1, end=3), method="gbn")


def test_accepted_schedule_runs_through_its_whole_range(tmp_path: Path) -> None:
    """The values of an accepted schedule are all usable: a run through its whole range completes."""
    spy = _fit(tmp_path, GhostNoise(ghost_batch_size=Linear(4, 1.5, start=0, end=1), method="xbn"), max_epochs=2)
    assert {n for _, _, _, n in spy.seen} == {4, 3, 2}


def test_set_ghost_batch_size_says_which_layer_method_and_fix() -> None:
    model = apply_ghost_noise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), ghost_batch_size=4, method="xbn")
    with pytest.raises(ValueError) as info:
        set_ghost_batch_size(model, 1)
    message = str(info.value)
    assert "layer '1'" in message and "method 'xbn'" in message and "Use a ghost batch size >= 2" in message
    assert model[1].ghost_batch_size == 4


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf"), True, "1e-3", None])
def test_noise_eps_is_validated_by_the_callback(eps: Any) -> None:
    with pytest.raises(ValueError, match="noise_eps must be a positive finite number"):
        GhostNoise(noise_eps=eps)
    with pytest.raises(ValueError, match="noise_eps must be a positive finite number"):
        GhostBatchNorm1d.from_module(nn.BatchNorm1d(3), noise_eps=eps)
    assert GhostNoise(noise_eps=1e-2).noise_eps == 1e-2


# --------------------------------------------------------------------------- #
# 4. strength > 1
# --------------------------------------------------------------------------- #
def _analytic_output(strength: float) -> torch.Tensor:
    """Analytic GNI with N = 2 on a (256, 64) batch, through the functional formula (no layer checks)."""
    x_hat = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    shift, scale = GF.analytic_noise(256, 64, 2, generator=torch.Generator().manual_seed(1))
    return GF.apply_noise(x_hat, shift, scale, strength=strength)


def test_strength_five_explodes_in_the_formula() -> None:
    """The reason for the bound: scale**-s with scale**2 ~ chi2(1) / 2 has a tail that s = 5 makes enormous."""
    at_one, at_five = _analytic_output(1.0).abs().max().item(), _analytic_output(5.0).abs().max().item()
    assert math.isfinite(at_one) and at_five > 1e12 and at_five > 1e6 * at_one


@pytest.fixture()
def fresh_strength_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GL, "_warned_strength_above_one", False)


@pytest.mark.usefixtures("fresh_strength_warning")
def test_strength_above_the_maximum_is_refused_everywhere() -> None:
    assert GL.MAX_STRENGTH == 2.0
    layer = GhostBatchNorm1d.from_module(nn.BatchNorm1d(4), method="analytic", ghost_batch_size=2, strength=0.5)
    with pytest.raises(ValueError) as info:
        layer.strength = 5.0
    message = str(info.value)
    assert "strength must be <= 2 (MAX_STRENGTH), got 5" in message and "smaller ghost_batch_size" in message
    assert layer.strength == 0.5
    with pytest.raises(ValueError, match="MAX_STRENGTH"):
        GhostNoise(strength=5.0)
    with pytest.raises(ValueError, match=r"strength=Linear\(.*\) can reach 3: strength must be <= 2"):
        GhostNoise(strength=Linear(0.0, 3.0, start=5, end=10))
    with pytest.raises(ValueError, match=r"strength=WarmUp\(.*\) can reach 2.5"):
        GhostNoise(strength=WarmUp(1, 1.0, off_value=2.5))
    model = apply_ghost_noise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), strength=0.5)
    with pytest.raises(ValueError, match="MAX_STRENGTH"):
        set_strength(model, 2.5)
    with pytest.raises(ValueError, match="MAX_STRENGTH"):
        apply_ghost_noise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), strength=2.5)
    assert model[1].strength == 0.5


@pytest.mark.usefixtures("fresh_strength_warning")
def test_strength_above_one_warns_once() -> None:
    with pytest.warns(UserWarning, match=r"strength 1.5 > 1 extrapolates beyond method 'analytic'.*keep N >= 16"):
        GhostNoise(strength=Linear(0.0, 1.5, end=4), method="analytic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GhostNoise(strength=2.0)
        GhostBatchNorm1d.from_module(nn.BatchNorm1d(4), strength=1.2)
        GhostNoise(strength=1.0)


@pytest.mark.usefixtures("fresh_strength_warning")
def test_strength_up_to_one_neither_warns_nor_changes_the_formula() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = nn.BatchNorm1d(8, affine=False)
        layer = GhostBatchNorm1d.from_module(plain, method="analytic", ghost_batch_size=2, strength=1.0)
    layer.reseed(3)
    got = layer(x)
    normal, gamma = GF.analytic_draws(64, 8, 2, generator=torch.Generator().manual_seed(3))
    x_hat = nn.functional.batch_norm(x, None, None, training=True)
    want = GF.apply_noise(x_hat, *GF.analytic_noise_from_draws(normal, gamma, 2), strength=1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # the method itself, heavy tail included


# --------------------------------------------------------------------------- #
# 5. one non-finite sample
# --------------------------------------------------------------------------- #
def _with_bad_sample(shape: Tuple[int, ...], bad: float, row: int = 3) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[(row,) + (1,) * (len(shape) - 1)] = bad
    return x


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda: GhostLayerNorm.from_module(nn.LayerNorm(6), ghost_batch_size=4),
        lambda: GhostGroupNorm.from_module(nn.GroupNorm(1, 5), ghost_batch_size=4),
    ],
    ids=["LayerNorm", "GroupNorm"],
)
def test_layer_norm_gni_keeps_a_bad_sample_to_itself(make: Any, fused: bool, bad: float) -> None:
    layer = make()
    layer.fused = fused
    x = _with_bad_sample((8, 5, 6), bad)
    plain = layer.to_plain()
    finite_rows = torch.isfinite(layer(x)).flatten(1).all(1)
    assert finite_rows.tolist() == torch.isfinite(plain(x)).flatten(1).all(1).tolist()  # as the plain layer
    assert finite_rows.tolist() == [True, True, True, False, True, True, True, True]


def _pooled_reference(
    mean: torch.Tensor, var: torch.Tensor, idx: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ghost noise over the finite (sample, channel) moments only, one value at a time."""
    m2 = var + mean**2
    ok = torch.isfinite(mean) & torch.isfinite(m2)
    shift = torch.empty(idx.shape[0], mean.shape[1], dtype=mean.dtype)
    scale = torch.empty_like(shift)
    for c in range(mean.shape[1]):
        kept = ok[:, c]
        b1, b2 = mean[kept, c].mean(), m2[kept, c].mean()
        for b, row in enumerate(idx.tolist()):
            members = [j for j in row if kept[j]]
            g1, g2 = (mean[members, c].mean(), m2[members, c].mean()) if members else (b1, b2)
            shift[b, c] = g1 - b1
            scale[b, c] = ((g2 - g1**2 + eps) / (b2 - b1**2 + eps)).sqrt()
    return shift, scale


def test_ghost_noise_leaves_non_finite_rows_out_of_its_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g) + 0.5
    mean[2, 1], var[4, 0], mean[2, 0] = float("nan"), float("inf"), float("-inf")
    idx = torch.tensor([[0, 1, 2, 3], [2, 2, 4, 4], [5, 5, 5, 5], [1, 2, 3, 4], [0, 0, 2, 5], [4, 4, 4, 4]])
    want_shift, want_scale = _pooled_reference(mean.double(), var.double(), idx, 1e-3)
    compiled = torch.compile(GF.ghost_noise, backend="eager", fullgraph=True)  # its own gather path
    for fn in (GF.ghost_noise, compiled):
        shift, scale = fn(mean, var, idx)
        torch.testing.assert_close(shift.double(), want_shift, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scale.double(), want_scale, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(shift).all() and torch.isfinite(scale).all()
    # a ghost batch whose members are all bad in a channel gets no noise there: rows 2 and 4 in
    # channels 1 and 0; channel 2 of the same ghost batch, all finite, gets its noise
    assert shift[1, 0] == 0.0 and scale[1, 0] == 1.0 and shift[5, 0] == 0.0 and scale[5, 0] == 1.0
    assert shift[1, 2] != 0.0


def test_ghost_noise_with_finite_rows_is_unchanged_by_the_masking() -> None:
    """All rows finite: the ghost statistics are the plain means over the N members (N > pool too)."""
    g = torch.Generator().manual_seed(1)
    mean, var = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g)
    for n in (3, 8):
        idx = GF.ghost_indices(5, n, generator=g)
        torch.testing.assert_close(GF.ghost_noise(mean, var, idx), _pooled_reference(mean, var, idx, 1e-3))


@pytest.mark.parametrize("method", ["gni", "analytic", "gbn", "xbn"])
@pytest.mark.parametrize("fused", [True, False])
def test_batchnorm_ghost_layers_spread_a_bad_sample_like_plain_batchnorm(method: str, fused: bool) -> None:
    """Honest: BatchNorm's batch statistics carry one NaN sample into its channel of every sample (and the
    running statistics); the ghost BatchNorm layers do exactly the same, no more and no less."""
    x = _with_bad_sample((8, 3, 4, 4), float("nan"))  # the NaN is in channel 1 of sample 3
    plain = nn.BatchNorm2d(3)
    ghost = GhostBatchNorm2d.from_module(nn.BatchNorm2d(3), method=method, ghost_batch_size=4, fused=fused)
    want, got = torch.isfinite(plain(x)), torch.isfinite(ghost(x))
    assert torch.equal(got, want)
    assert not want[:, 1].any() and want[:, [0, 2]].all()
    assert torch.equal(torch.isfinite(ghost.running_mean), torch.isfinite(plain.running_mean))
    assert torch.equal(torch.isfinite(ghost.running_var), torch.isfinite(plain.running_var))


# --------------------------------------------------------------------------- #
# 6. the package's torch requirement
# --------------------------------------------------------------------------- #
def test_torch_requirement_has_a_floor_and_no_cap_below_the_current_release() -> None:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert torch_req.specifier.contains("2.15.0") and torch_req.specifier.contains("2.13.0")
    assert not torch_req.specifier.contains("2.3.1")  # a lower bound: torch.library.custom_op needs 2.4
    assert hasattr(torch.library, "custom_op")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    # the tested CPU wheel is installed first and held by a constraint while the package installs
    assert 'TORCH_PIN="torch==2.13.0"' in setup and '-c "$constraints"' in setup
