"""``GhostNoiseController``: ghost noise for a training loop of your own (Lightning Fabric, plain PyTorch).

The controller owns everything the :class:`~lightning_ghostnoise.GhostNoise` callback does, without the
Trainer: it rewrites the model's normalization layers, evaluates the schedules, reseeds every ghost
layer at each training batch from ``(seed, global rank, batch count, layer index)``, puts the plain
layers back, and saves its state for a checkpoint. The callback is built on it, so for the same seed,
batches and steps a loop with a controller injects the same noise as a Trainer with the callback.

A training loop calls :meth:`GhostNoiseController.on_step` once per training batch, before the forward::

    controller = GhostNoiseController(ghost_batch_size=16, strength=Cosine(0.0, 1.0, end=5), seed=0)
    model = controller.apply(model, max_epochs=10, steps_per_epoch=len(loader))
    for epoch in range(10):
        for batch_idx, batch in enumerate(loader):
            controller.on_step(epoch, batch_idx)
            loss = model(batch) ...
    model = controller.revert(model)

With several processes, call :meth:`~GhostNoiseController.apply` before wrapping the model (``DDP(...)``,
``fabric.setup(...)``): it tells DDP not to broadcast the layers' per-rank noise state.

Example:
    >>> import torch
    >>> controller = GhostNoiseController(ghost_batch_size=4, seed=0)
    >>> model = controller.apply(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8)))
    >>> controller.on_step(epoch=0, batch_idx=0)
    {'ghost_batch_size': 4, 'strength': 1.0}
    >>> out = model(torch.randn(16, 3))
    >>> model = controller.revert(model)
    >>> type(model[1]).__name__
    'BatchNorm1d'
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Callable, Dict, List, Literal, Optional, Union

import torch.distributed as dist
from torch import nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.distributed import rank_zero_warn
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

__all__ = ["GhostNoiseController"]

#: The attribute DDP (``torch.nn.parallel.DistributedDataParallel``) reads to leave buffers out of its broadcast.
_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"
_STATE_VERSION = 2


class GhostNoiseController:
    r"""Ghost noise for one model in any training loop: rewrite, schedules, per-step reseeding, revert, state.

    Args:
        ghost_batch_size: ``N``, a number or a :class:`~lightning_ghostnoise.schedules.Schedule`
            (rounded with :func:`~lightning_ghostnoise.schedules.to_ghost_batch_size`). Every value the
            schedule can produce is checked here: ``>= 1``, and ``>= 2`` for ``"xbn"`` and ``"analytic"``
            (with ``scale_noise``).
        strength: the noise strength ``0 <= s <= 2`` (0: plain layer, 1: the method), a number or a
            schedule. Above 1 the noise is extrapolated beyond the method, with a warning.
        method: ``"gni"`` (Ghost Noise Injection, default), ``"gbn"`` (Ghost Batch Norm), ``"xbn"``
            (Exclusive Batch Norm) or ``"analytic"`` (GNI's noise drawn from its law).
        include_types: only these layer types, e.g. ``["BatchNorm2d"]`` (``"BatchNorm"`` = all three).
        exclude_types: never these layer types.
        include_names: only layers whose qualified name matches one of these glob patterns.
        exclude_names: never layers whose qualified name matches one of these glob patterns.
        shift_noise: inject the shift (mean) part of the noise.
        scale_noise: inject the scale (variance) part of the noise.
        noise_eps: GNI's epsilon in the noise scale (the paper's 1e-3), finite and ``> 0``.
        seed: base seed of the noise, in ``[0, 2**32 - 1]``. ``None``: the global seed of Lightning's
            ``seed_everything`` (``PL_GLOBAL_SEED``) when set, else drawn once from the OS and shared by
            every process (broadcast from rank 0 when a process group is up). Saved by :meth:`state_dict`.
        sync: draw ghost batches from the *global* batch across processes with global normalization
            statistics (SyncBatchNorm semantics; ``"gni"`` and ``"analytic"`` only); ``False`` draws per
            process from its local batch, with a different noise stream per global rank.
        fused: the fused autograd paths (first-order gradients only); ``False`` for double backward.
        running_stats: where BatchNorm's running statistics come from in training: ``"ghost"`` (GBN as
            published) or ``"batch"``; ``None``: ``"ghost"`` for ``"gbn"``, ``"batch"`` for the others.

    Attributes:
        max_epochs: the run's length in epochs, needed by schedules with ``unit="fraction"``.
        steps_per_epoch: training batches per epoch, for schedules that move within an epoch (``None``:
            they move once per epoch).
        report: what the last :meth:`apply` replaced and skipped.
        values: the ghost batch size and strength set by the last :meth:`on_step`.

    Example:
        >>> from lightning_ghostnoise.schedules import Linear
        >>> controller = GhostNoiseController(strength=Linear(0.0, 1.0, end=4), seed=1)
        >>> controller.schedule_values(epoch=2)
        {'ghost_batch_size': 16, 'strength': 0.5}
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
        running_stats: Optional[Literal["ghost", "batch"]] = None,
    ) -> None:
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
        self.max_epochs: Optional[float] = None
        self.steps_per_epoch: Optional[int] = None
        self.report = SurgeryReport()
        self.values: Dict[str, Any] = {}
        self._base_seed: Optional[int] = self.seed
        self._batches = 0
        self._layers: List[GhostNoiseMixin] = []
        self._applied = False
        self._ddp_ignored: List[str] = []

    # ------------------------------------------------------------------ seed
    @property
    def base_seed(self) -> Optional[int]:
        """The base seed of the noise: ``seed``, or the one :meth:`resolve_seed` chose (``None`` until then)."""
        return self._base_seed

    @property
    def batches(self) -> int:
        """Training batches :meth:`on_step` has counted (saved by :meth:`state_dict`)."""
        return self._batches

    def resolve_seed(self, broadcast: Optional[Callable[[int], int]] = None) -> int:
        """Fix the base seed, once: ``seed``, else ``PL_GLOBAL_SEED``, else drawn from the OS.

        Every process must end with the same seed. A drawn seed is replaced by rank 0's through
        ``broadcast`` (a function that returns rank 0's value of its argument, e.g.
        ``lambda s: fabric.broadcast(s, src=0)``), else through ``torch.distributed`` when a process
        group with several processes is up. Call it on every process (it may run a collective).

        Returns:
            the base seed.
        """
        if self._base_seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            if env is not None:
                self._base_seed = validate_seed(int(env))
            else:
                # drawn from the OS (never the global torch RNG) and saved in the state
                self._base_seed = secrets.randbelow(2**32)
                if broadcast is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    shared: List[Any] = [self._base_seed]
                    dist.broadcast_object_list(shared, src=0)
                    self._base_seed = int(shared[0])
        if broadcast is not None:
            self._base_seed = int(broadcast(self._base_seed))
        return self._base_seed

    # ------------------------------------------------------------------ schedules
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

    def fraction_schedules(self) -> List[str]:
        """The schedules (as ``name=repr``) that need the run's length (``unit="fraction"``)."""
        schedules = {"ghost_batch_size": self.ghost_batch_size, "strength": self.strength}
        return [f"{name}={schedule!r}" for name, schedule in schedules.items() if schedule.uses_fraction]

    def schedule_values(self, epoch: int, batch_idx: int = 0) -> Dict[str, Any]:
        """The ghost batch size (rounded) and strength the schedules give at ``(epoch, batch_idx)``.

        Raises:
            ValueError: a schedule has ``unit="fraction"`` and :attr:`max_epochs` is not set.
        """
        if self.max_epochs is None and self.fraction_schedules():
            raise ValueError(
                f"{' and '.join(self.fraction_schedules())} uses unit='fraction' (a fraction of the run), but the "
                "controller does not know the run's length: pass apply(model, max_epochs=...) or set "
                "controller.max_epochs, or give the schedule's start and end in epochs with unit='epoch'."
            )
        steps = self.steps_per_epoch
        n = self.ghost_batch_size(epoch, batch_idx, steps, self.max_epochs)
        s = self.strength(epoch, batch_idx, steps, self.max_epochs)
        return {"ghost_batch_size": to_ghost_batch_size(n), "strength": s}

    # ------------------------------------------------------------------ model
    def apply(
        self,
        model: nn.Module,
        *,
        max_epochs: Optional[float] = None,
        steps_per_epoch: Optional[int] = None,
        warn: bool = True,
    ) -> nn.Module:
        """Rewrite ``model``'s normalization layers with ghost noise, in place; returns ``model``.

        Parameters and buffers are shared with the plain layers, so an optimizer built before or after
        keeps valid references and ``state_dict`` keys do not change. Applying again reconfigures the
        layers in place. Resolves the seed (:meth:`resolve_seed`) if that has not happened, and lists the
        layers' per-rank noise buffers in ``model._ddp_params_and_buffers_to_ignore`` so that DDP, if it
        wraps the model afterwards, does not overwrite them with rank 0's.

        Args:
            model: any module.
            max_epochs: the run's length in epochs (needed by ``unit="fraction"`` schedules).
            steps_per_epoch: training batches per epoch (schedules then move within an epoch).
            warn: warn about skipped layers and about a model without target layers.
        """
        if max_epochs is not None:
            self.max_epochs = float(max_epochs)
        if steps_per_epoch is not None:
            self.steps_per_epoch = int(steps_per_epoch)
        seed = self.resolve_seed()
        # a schedule's value at position 0 never depends on the run's length (ramps start at a
        # fraction >= 0), so a placeholder length serves while the real one is unknown
        length = self.max_epochs or 1.0
        report = SurgeryReport()
        model = apply_ghost_noise(
            model,
            ghost_batch_size=to_ghost_batch_size(self.ghost_batch_size(0, 0, None, length)),
            method=self.method,
            strength=self.strength(0, 0, None, length),
            shift_noise=self.shift_noise,
            scale_noise=self.scale_noise,
            noise_eps=self.noise_eps,
            seed=seed,
            fused=self.fused,
            running_stats=self.running_stats,
            include_types=self.include_types,
            exclude_types=self.exclude_types,
            include_names=self.include_names,
            exclude_names=self.exclude_names,
            warn=warn,
            report=report,
        )
        self.report = report
        self._layers = [layer for _, layer in ghost_layers(model)]
        self._applied = True
        for layer in self._layers:
            layer.sync = self.sync
        self.values = {}
        self._hide_buffers_from_ddp(model)
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Put the plain normalization layers back (same parameters and buffers); returns the model."""
        model = revert_ghost_noise(model)
        self._layers = []
        self._applied = False
        self.values = {}
        ignored = getattr(model, _DDP_IGNORE, None)
        if ignored is not None and self._ddp_ignored:
            dropped = set(self._ddp_ignored)
            setattr(model, _DDP_IGNORE, [n for n in ignored if n not in dropped])
        self._ddp_ignored = []
        return model

    @property
    def layers(self) -> List[GhostNoiseMixin]:
        """The ghost layers of the model :meth:`apply` rewrote last, in module order (their index seeds them)."""
        return list(self._layers)

    def _hide_buffers_from_ddp(self, model: nn.Module) -> None:
        # DDP broadcasts rank 0's buffers every step: the per-rank noise state must stay per rank
        names = {f"{name}.{buf}" if name else buf for name, _ in ghost_layers(model) for buf in GHOST_BUFFERS}
        existing = set(getattr(model, _DDP_IGNORE, []))
        self._ddp_ignored = sorted(set(self._ddp_ignored) | (names - existing))
        setattr(model, _DDP_IGNORE, sorted(existing | names))

    # ------------------------------------------------------------------ per step
    def set_values(self, epoch: int, batch_idx: int = 0) -> Dict[str, Any]:
        """Set the schedules' ghost batch size and strength at ``(epoch, batch_idx)`` on the layers.

        The noise streams are not touched (:meth:`on_step` does both). Layers are written only when
        a value changed since the last call; clear :attr:`values` to force a write.

        Returns:
            the values set.
        """
        values = self.schedule_values(epoch, batch_idx)
        if values != self.values:
            n, s = values["ghost_batch_size"], values["strength"]
            for layer in self._layers:
                if layer.ghost_batch_size != n:
                    layer.ghost_batch_size = n
                if layer.strength != s:
                    layer.strength = s
            self.values = values
        return dict(values)

    def on_step(
        self,
        epoch: int,
        batch_idx: int,
        *,
        rank: Optional[int] = None,
        batch_count: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Prepare the ghost layers for one training batch: schedule values, then fresh noise streams.

        Call it once per training batch, before the forward. Each layer's stream is reseeded with
        ``derive_seed(base_seed, rank, batch_count, layer_index)`` (rank 0 for every process with
        ``sync=True``), so the noise is reproducible, different per global rank, and exact on resume.

        Args:
            epoch: the current epoch (from 0).
            batch_idx: the batch's index within the epoch (from 0).
            rank: the process's *global* rank; ``None``: ``torch.distributed``'s rank when a process group
                is up, else 0.
            batch_count: the number of training batches begun in the run, this one included (Lightning's
                ``fit_loop.epoch_loop.batch_progress.total.ready``). ``None``: the controller's own count,
                advanced by one per call and saved by :meth:`state_dict`.

        Returns:
            the ghost batch size and strength now set on the layers.

        Raises:
            RuntimeError: :meth:`apply` was not called (or the model was reverted since).
        """
        if not self._applied:
            raise RuntimeError(
                "GhostNoiseController.on_step: no model to drive. Call model = controller.apply(model) before "
                "training (and again after controller.revert(model))."
            )
        values = self.set_values(epoch, batch_idx)
        if batch_count is None:
            self._batches += 1
            batch_count = self._batches
        else:
            self._batches = int(batch_count)
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        rank = 0 if self.sync else int(rank)
        base = self._base_seed if self._base_seed is not None else self.resolve_seed()
        for index, layer in enumerate(self._layers):
            layer.reseed(derive_seed(base, rank, batch_count, index))
        return values

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint needs to continue the same noise: the base seed and the batch count.

        Example:
            >>> GhostNoiseController(seed=3).state_dict()
            {'base_seed': 3, 'method': 'gni', 'batches': 0, 'version': 2}
        """
        return {
            "base_seed": self._base_seed,
            "method": self.method,
            "batches": self._batches,
            "version": _STATE_VERSION,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (also the callback's state in a Lightning checkpoint).

        The saved base seed is kept unless this controller was given another ``seed``; then its own seed
        stays, with a warning that resuming will not reproduce the uninterrupted noise.
        """
        self._batches = int(state_dict.get("batches", self._batches))
        saved = state_dict.get("base_seed")
        if saved is None:
            return
        if self.seed is not None and self.seed != saved:
            rank_zero_warn(
                f"Ghost noise: the checkpoint was trained with noise seed {saved}, this run has seed={self.seed}; "
                f"keeping seed={self.seed} (resume will not reproduce the uninterrupted noise)."
            )
            return
        self._base_seed = int(saved)
