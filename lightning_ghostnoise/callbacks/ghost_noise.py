"""The ``GhostNoise`` Lightning callback: ghost noise for any LightningModule in one line.

Also importable from its former path, ``lightning_ghostnoise.callback``.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_ghostnoise import GhostNoise
    >>> trainer = Trainer(callbacks=[GhostNoise(ghost_batch_size=16)], logger=False)
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any, Dict, List, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.layers.base import GHOST_BUFFERS, GhostNoiseMixin
from lightning_ghostnoise.layers.convert import SurgeryReport, apply_ghost_noise, ghost_layers, revert_ghost_noise
from lightning_ghostnoise.layers.validation import (
    Method,
    min_ghost_batch_size,
    validate_ghost_batch_size,
    validate_method,
    validate_noise_eps,
    validate_running_stats,
    validate_strength,
)
from lightning_ghostnoise.schedules import Constant, Schedule, as_schedule, to_ghost_batch_size
from lightning_ghostnoise.seeding import derive_seed, validate_seed

__all__ = ["GhostNoise"]


class GhostNoise(Callback):
    r"""Rewrite the model's normalization layers with ghost noise for the duration of ``fit``.

    The layers are rewritten in :meth:`setup` (``stage="fit"``), before ``configure_optimizers`` and
    the DDP wrap; layers created in ``configure_model`` are rewritten at ``on_fit_start``. Plain layers
    are put back when fit ends (``revert_on_fit_end``). Parameters and buffers keep their names, so
    checkpoints load strictly into the plain model and back.

    Args:
        ghost_batch_size: ``N``, a number or a :class:`~lightning_ghostnoise.schedules.Schedule`
            (rounded with :func:`~lightning_ghostnoise.schedules.to_ghost_batch_size`). Every value the
            schedule can produce is checked here: ``>= 1``, and ``>= 2`` for ``"xbn"`` and ``"analytic"``
            (with ``scale_noise``).
        strength: the noise strength ``0 <= s <= 2`` (0: plain layer, 1: the method), a number or a
            schedule. Above 1 the noise is extrapolated beyond the method, with a warning: the scale
            noise enters as ``scale**-s`` and its rare small scales grow fast at small ``N``.
        method: ``"gni"`` (Ghost Noise Injection, default), ``"gbn"`` (Ghost Batch Norm), ``"xbn"``
            (Exclusive Batch Norm) or ``"analytic"`` (GNI's noise drawn from its law).
        include_types: only these layer types, e.g. ``["BatchNorm2d"]`` (``"BatchNorm"`` = all three).
        exclude_types: never these layer types.
        include_names: only layers whose qualified name matches one of these glob patterns.
        exclude_names: never layers whose qualified name matches one of these glob patterns.
        shift_noise: inject the shift (mean) part of the noise.
        scale_noise: inject the scale (variance) part of the noise.
        noise_eps: GNI's epsilon in the noise scale (the paper's 1e-3), finite and ``> 0``.
        seed: base seed of the noise, in ``[0, 2**32 - 1]``. ``None``: Lightning's global seed when
            ``seed_everything`` was called, else drawn once and saved in the checkpoint.
        sync: draw ghost batches from the *global* batch across processes with global normalization
            statistics (SyncBatchNorm semantics); ``False`` draws per process from its local batch.
        fused: the fused autograd paths (BatchNorm methods: fast; LayerNorm/GroupNorm: the plain layer's
            activation memory; first-order gradients only); ``False`` for double backward (gradient
            penalties).
        revert_on_fit_end: put the plain layers back when fit ends.
        log_values: log the current ghost batch size and strength through the Trainer's logger.
        running_stats: where the BatchNorm layers' running statistics (used in eval) come from in
            training. ``"ghost"``: the mean over ghost batches of their means and unbiased variances, GBN
            as published (Hoffer et al.; Keras's ``virtual_batch_size``), so eval normalizes at the scale
            training did. ``"batch"``: the full batch's, as plain BatchNorm (GBN's former behaviour).
            ``None``: the method's default, ``"ghost"`` for ``"gbn"`` and
            ``"batch"`` for the others, which allow only ``"batch"`` (XBN's leave-one-out statistics are
            no batch's own; GNI normalizes with the full batch's statistics before its noise).

    Schedules with ``unit="fraction"`` measure the run by its length in epochs: ``Trainer(max_epochs=...)``,
    or ``max_steps`` converted to epochs (``max_steps / ceil(num_training_batches /
    accumulate_grad_batches)``) when that ends training first or ``max_epochs=-1``. A run with neither
    is refused at ``setup``.

    Example:
        >>> from lightning_ghostnoise.schedules import Cosine
        >>> cb = GhostNoise(ghost_batch_size=16, strength=Cosine(0.0, 1.0, start=0, end=5))
    """

    def __init__(
        self,
        ghost_batch_size: Union[int, float, Schedule] = 16,
        strength: Union[float, Schedule] = 1.0,
        method: Method = "gni",
        include_types: Optional[List[str]] = None,
        exclude_types: Optional[List[str]] = None,
        include_names: Optional[List[str]] = None,
        exclude_names: Optional[List[str]] = None,
        shift_noise: bool = True,
        scale_noise: bool = True,
        noise_eps: float = GF.NOISE_EPS,
        seed: Optional[int] = None,
        sync: bool = False,
        fused: bool = True,
        revert_on_fit_end: bool = True,
        log_values: bool = True,
        running_stats: Optional[Literal["ghost", "batch"]] = None,
    ) -> None:
        super().__init__()
        self.method = validate_method(method)
        validate_running_stats(running_stats, self.method)
        self.running_stats = running_stats
        self.ghost_batch_size = as_schedule(ghost_batch_size).validate_for("ghost_batch_size")
        self.strength = as_schedule(strength).validate_for("strength")
        self._check_schedule_ranges(scale_noise)
        self.include_types = include_types
        self.exclude_types = exclude_types
        self.include_names = include_names
        self.exclude_names = exclude_names
        self.shift_noise = shift_noise
        self.scale_noise = scale_noise
        self.noise_eps = validate_noise_eps(noise_eps)
        self.seed = None if seed is None else validate_seed(seed)
        if sync and self.method in ("gbn", "xbn"):
            raise ValueError(
                f"sync=True supports the methods 'gni' and 'analytic': {self.method!r} forms its ghost batches inside "
                "each process's batch (identical to a global split when the per-process batch is a multiple of "
                "ghost_batch_size). Use sync=False."
            )
        self.sync = bool(sync)
        self.fused = bool(fused)
        self.revert_on_fit_end = revert_on_fit_end
        self.log_values = log_values
        self._base_seed: Optional[int] = self.seed
        self._current: Dict[str, float] = {}
        self._run_epochs: Optional[float] = None
        self._layers: List[GhostNoiseMixin] = []
        self._ddp_ignored: List[str] = []
        self.report = SurgeryReport()

    # ------------------------------------------------------------------ helpers
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, include_names=self.include_names, include_types=self.include_types
        )

    @property
    def base_seed(self) -> Optional[int]:
        """The base seed in use (resolved at ``setup``)."""
        return self._base_seed

    def _resolve_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        if self._base_seed is not None:
            return self._base_seed
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None:
            return validate_seed(int(env))
        # drawn once from the OS (never the global torch RNG) and saved in the checkpoint; rank 0's
        # value is broadcast in setup so every process agrees
        return secrets.randbelow(2**32)

    def _check_schedule_ranges(self, scale_noise: bool) -> None:
        """Check every value the schedules can produce, so that no value fails in the middle of training."""
        low = self.ghost_batch_size.value_range()[0]
        rounded = to_ghost_batch_size(low)
        needed = min_ghost_batch_size(self.method, scale_noise)
        if not isinstance(self.ghost_batch_size, Constant):
            source = (
                f" (the smallest value of ghost_batch_size={self.ghost_batch_size!r} is {low:g}, rounded half up to "
                f"{rounded}; keep every value of the schedule >= {needed - 0.5:g})"
            )
        else:
            source = f" (rounded half up from {low:g})" if rounded != low else ""
        validate_ghost_batch_size(rounded, self.method, scale_noise, source=source)
        high = self.strength.value_range()[1]
        try:
            validate_strength(high, self.method)
        except ValueError as err:
            if isinstance(self.strength, Constant):
                raise
            raise ValueError(f"strength={self.strength!r} can reach {high:g}: {err}") from None

    @staticmethod
    def _training_epochs(trainer: "pl.Trainer") -> Optional[float]:
        """The run's length in epochs for ``unit="fraction"`` schedules, or ``None`` while unknown.

        ``max_epochs``, or ``max_steps`` in epochs when that ends training first; ``max_steps`` needs the
        number of batches per epoch, known from ``on_train_start``.
        """
        max_epochs = trainer.max_epochs
        epochs = float(max_epochs) if max_epochs is not None and max_epochs > 0 else None
        max_steps = trainer.max_steps
        batches = trainer.num_training_batches
        if max_steps is not None and max_steps > 0 and batches is not None and 0 < batches < float("inf"):
            from_steps = max_steps / math.ceil(batches / max(1, trainer.accumulate_grad_batches))
            epochs = from_steps if epochs is None else min(epochs, from_steps)
        return epochs

    def _fraction_schedules(self) -> List[str]:
        schedules = {"ghost_batch_size": self.ghost_batch_size, "strength": self.strength}
        return [f"{name}={schedule!r}" for name, schedule in schedules.items() if schedule.uses_fraction]

    def _check_run_length(self, trainer: "pl.Trainer", unknown: bool) -> None:
        """Refuse ``unit="fraction"`` schedules when the run's length is ``unknown``."""
        fractions = self._fraction_schedules()
        if not fractions or not unknown:
            return
        raise MisconfigurationException(
            f"GhostNoise: {' and '.join(fractions)} uses unit='fraction' (a fraction of the run), but this run has "
            f"no known length (Trainer(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})"
            + (", and the training dataloader has no length" if trainer.max_steps > 0 else "")
            + "). Set Trainer(max_epochs=...) or Trainer(max_steps=...), or give the schedule's start and end in "
            "epochs with unit='epoch'."
        )

    def _apply(self, pl_module: nn.Module, warn: bool) -> SurgeryReport:
        report = SurgeryReport()
        # a schedule's value at position 0 never depends on the run's length (ramps start at a
        # fraction >= 0), so a placeholder length serves until ``on_train_start`` knows the real one
        length = self._run_epochs or 1.0
        apply_ghost_noise(
            pl_module,
            ghost_batch_size=self._value("ghost_batch_size", 0, 0, None, length),
            method=self.method,
            strength=self._value("strength", 0, 0, None, length),
            shift_noise=self.shift_noise,
            scale_noise=self.scale_noise,
            noise_eps=self.noise_eps,
            seed=self._base_seed or 0,
            fused=self.fused,
            running_stats=self.running_stats,
            include_types=self.include_types,
            exclude_types=self.exclude_types,
            include_names=self.include_names,
            exclude_names=self.exclude_names,
            warn=warn,
            report=report,
        )
        for _, layer in ghost_layers(pl_module):
            layer.sync = self.sync
        return report

    def _value(self, which: str, epoch: int, step: int, steps: Optional[int], max_epochs: Optional[float]) -> Any:
        schedule = self.ghost_batch_size if which == "ghost_batch_size" else self.strength
        value = schedule(epoch, step, steps, max_epochs)
        return to_ghost_batch_size(value) if which == "ghost_batch_size" else value

    def _set_values(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> None:
        batches = trainer.num_training_batches
        steps = None if batches in (None, float("inf")) else int(batches)
        n = self._value("ghost_batch_size", trainer.current_epoch, batch_idx, steps, self._run_epochs)
        s = self._value("strength", trainer.current_epoch, batch_idx, steps, self._run_epochs)
        if self._current.get("ghost_batch_size") != n or self._current.get("strength") != s:
            for layer in self._layers:
                if layer.ghost_batch_size != n:
                    layer.ghost_batch_size = n
                if layer.strength != s:
                    layer.strength = s
            self._current = {"ghost_batch_size": n, "strength": s}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
        if layer_sync is not None:
            raise MisconfigurationException(
                "GhostNoise cannot be combined with Trainer(sync_batchnorm=True): Lightning converts every BatchNorm "
                "into a plain SyncBatchNorm after callbacks are set up, which would silently drop the ghost noise. "
                "Use GhostNoise(sync=True) instead: it synchronizes the normalization statistics across processes "
                "(SyncBatchNorm semantics) and draws ghost batches from the global batch."
            )
        others = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GhostNoise) and cb is not self]
        if others:
            rank_zero_warn(
                "Several GhostNoise callbacks are attached: the noise is not stacked, the later one reconfigures the "
                "layers the earlier one rewrote. Give them disjoint include/exclude filters or keep one."
            )
        no_length = (trainer.max_epochs is None or trainer.max_epochs <= 0) and not trainer.max_steps > 0
        self._check_run_length(trainer, unknown=no_length)
        self._run_epochs = self._training_epochs(trainer)
        seed = self._resolve_seed()
        self._base_seed = int(trainer.strategy.broadcast(seed, src=0))
        # warnings wait for on_fit_start: layers built in ``configure_model`` do not exist yet
        self.report = self._apply(pl_module, warn=False)
        self._current = {}
        self._hide_buffers_from_ddp(pl_module)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # layers created in ``configure_model`` did not exist at ``setup``; the parameters are shared
        # with the plain layers, so the optimizer and the DDP wrap keep valid references. The seed is
        # final here (a checkpoint's callback state is loaded after ``setup``).
        before = self.report.num_replaced
        self.report = self._apply(pl_module, warn=True)
        if self.report.num_replaced:
            late = self.report.num_replaced - before
            rank_zero_info(
                f"GhostNoise: rewrote {self.report.summary()} with method={self.method}, "
                f"ghost_batch_size={self.ghost_batch_size!r}, strength={self.strength!r}"
                + (", sync=True" if self.sync else "")
                + f" (seed {self._base_seed})"
                + (f"; {late} of them created in configure_model." if late > 0 else ".")
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # ``current_epoch`` is restored only from here on, and the number of batches is known
        self._run_epochs = self._training_epochs(trainer)
        self._check_run_length(trainer, unknown=self._run_epochs is None)
        self._layers = [layer for _, layer in ghost_layers(pl_module)]
        self._current = {}
        self._set_values(trainer, pl_module, 0)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_values(trainer, pl_module, 0)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._set_values(trainer, pl_module, batch_idx)
        # one fresh stream per (base seed, rank, batch, layer): exact on resume, distinct per rank
        counter = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        rank = 0 if self.sync else trainer.global_rank
        for index, layer in enumerate(self._layers):
            layer.reseed(derive_seed(self._base_seed or 0, rank, counter, index))
        if self.log_values and trainer.logger is not None:
            pl_module.log(
                "ghostnoise/ghost_batch_size", float(self._current["ghost_batch_size"]), on_step=True, on_epoch=False
            )
            pl_module.log("ghostnoise/strength", float(self._current["strength"]), on_step=True, on_epoch=False)

    def _hide_buffers_from_ddp(self, pl_module: "pl.LightningModule") -> None:
        # DDP broadcasts rank 0's buffers every step: the per-rank noise state must stay per rank
        names = {f"{name}.{buf}" if name else buf for name, _ in ghost_layers(pl_module) for buf in GHOST_BUFFERS}
        existing = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        self._ddp_ignored = sorted(names - existing)
        pl_module._ddp_params_and_buffers_to_ignore = sorted(existing | names)  # type: ignore[assignment]  # DDP reads this list

    def _revert(self, pl_module: "pl.LightningModule") -> None:
        revert_ghost_noise(pl_module)
        self._layers = []
        ignored = getattr(pl_module, "_ddp_params_and_buffers_to_ignore", None)
        if ignored is not None and self._ddp_ignored:
            kept = [n for n in ignored if n not in set(self._ddp_ignored)]
            pl_module._ddp_params_and_buffers_to_ignore = kept  # type: ignore[assignment]  # DDP reads this list
            self._ddp_ignored = []

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.revert_on_fit_end:
            self._revert(pl_module)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.revert_on_fit_end:
            self._revert(pl_module)

    @override
    def state_dict(self) -> Dict[str, Any]:
        return {"base_seed": self._base_seed, "method": self.method, "version": 1}

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict.get("base_seed")
        if saved is None:
            return
        if self.seed is not None and self.seed != saved:
            rank_zero_warn(
                f"GhostNoise: the checkpoint was trained with noise seed {saved}, this callback has seed={self.seed}; "
                f"keeping seed={self.seed} (resume will not reproduce the uninterrupted noise)."
            )
            return
        self._base_seed = int(saved)
