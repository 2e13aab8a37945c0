"""The ``GhostNoise`` Lightning callback: ghost noise for any LightningModule in one line.

Also importable from its former path, ``lightning_ghostnoise.callback``.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning_ghostnoise import GhostNoise
    >>> trainer = Trainer(callbacks=[GhostNoise(ghost_batch_size=16)], logger=False)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.controller import GhostNoiseController
from lightning_ghostnoise.layers.validation import Method
from lightning_ghostnoise.schedules import Schedule

__all__ = ["GhostNoise"]


def _from_controller(name: str, doc: Optional[str] = None) -> Any:
    """A read-only property that reads ``name`` from the callback's :class:`GhostNoiseController`."""
    return property(lambda self: getattr(self.controller, name), doc=doc or f"The controller's ``{name}``.")


class GhostNoise(Callback):
    r"""Rewrite the model's normalization layers with ghost noise for the duration of ``fit``.

    The layers are rewritten in :meth:`setup` (``stage="fit"``), before ``configure_optimizers`` and
    the DDP wrap; layers created in ``configure_model`` are rewritten at ``on_fit_start``. Plain layers
    are put back when fit ends (``revert_on_fit_end``). Parameters and buffers keep their names, so
    checkpoints load strictly into the plain model and back.

    The work is done by a :class:`~lightning_ghostnoise.GhostNoiseController` (the ``controller``
    attribute), the object a Fabric or plain PyTorch loop uses directly: the callback tells it the run's
    length, the global rank and Lightning's batch count, and saves its state in the checkpoint.

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
        self.controller = GhostNoiseController(
            ghost_batch_size=ghost_batch_size,
            strength=strength,
            method=method,
            include_types=include_types,
            exclude_types=exclude_types,
            include_names=include_names,
            exclude_names=exclude_names,
            shift_noise=shift_noise,
            scale_noise=scale_noise,
            noise_eps=noise_eps,
            seed=seed,
            sync=sync,
            fused=fused,
            running_stats=running_stats,
        )
        self.revert_on_fit_end = revert_on_fit_end
        self.log_values = log_values

    # the configuration lives in the controller; read it here as before
    method = _from_controller("method")
    ghost_batch_size = _from_controller("ghost_batch_size")
    strength = _from_controller("strength")
    include_types = _from_controller("include_types")
    exclude_types = _from_controller("exclude_types")
    include_names = _from_controller("include_names")
    exclude_names = _from_controller("exclude_names")
    shift_noise = _from_controller("shift_noise")
    scale_noise = _from_controller("scale_noise")
    noise_eps = _from_controller("noise_eps")
    seed = _from_controller("seed")
    sync = _from_controller("sync")
    fused = _from_controller("fused")
    running_stats = _from_controller("running_stats")
    report = _from_controller("report", "What the rewrite replaced and skipped (a :class:`SurgeryReport`).")
    base_seed = _from_controller("base_seed", "The base seed in use (resolved at ``setup``).")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, include_names=self.include_names, include_types=self.include_types
        )

    # ------------------------------------------------------------------ helpers
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

    def _check_run_length(self, trainer: "pl.Trainer", unknown: bool) -> None:
        """Refuse ``unit="fraction"`` schedules when the run's length is ``unknown``."""
        fractions = self.controller.fraction_schedules()
        if not fractions or not unknown:
            return
        raise MisconfigurationException(
            f"GhostNoise: {' and '.join(fractions)} uses unit='fraction' (a fraction of the run), but this run has "
            f"no known length (Trainer(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})"
            + (", and the training dataloader has no length" if trainer.max_steps > 0 else "")
            + "). Set Trainer(max_epochs=...) or Trainer(max_steps=...), or give the schedule's start and end in "
            "epochs with unit='epoch'."
        )

    def _set_run_length(self, trainer: "pl.Trainer") -> None:
        self.controller.max_epochs = self._training_epochs(trainer)
        batches = trainer.num_training_batches
        self.controller.steps_per_epoch = None if batches in (None, float("inf")) else int(batches)

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
        self._set_run_length(trainer)
        # every process takes rank 0's seed
        self.controller.resolve_seed(broadcast=lambda seed: trainer.strategy.broadcast(seed, src=0))
        # warnings wait for on_fit_start: layers built in ``configure_model`` do not exist yet
        self.controller.apply(pl_module, warn=False)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # layers created in ``configure_model`` did not exist at ``setup``; the parameters are shared
        # with the plain layers, so the optimizer and the DDP wrap keep valid references. The seed is
        # final here (a checkpoint's callback state is loaded after ``setup``).
        before = self.report.num_replaced
        self.controller.apply(pl_module, warn=True)
        if self.report.num_replaced:
            late = self.report.num_replaced - before
            rank_zero_info(
                f"GhostNoise: rewrote {self.report.summary()} with method={self.method}, "
                f"ghost_batch_size={self.ghost_batch_size!r}, strength={self.strength!r}"
                + (", sync=True" if self.sync else "")
                + f" (seed {self.base_seed})"
                + (f"; {late} of them created in configure_model." if late > 0 else ".")
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # ``current_epoch`` is restored only from here on, and the number of batches is known
        self._set_run_length(trainer)
        self._check_run_length(trainer, unknown=self.controller.max_epochs is None)
        self.controller.values = {}
        self.controller.set_values(trainer.current_epoch, 0)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_run_length(trainer)
        self.controller.set_values(trainer.current_epoch, 0)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # one fresh stream per (base seed, global rank, batch, layer): exact on resume, distinct per rank
        values = self.controller.on_step(
            trainer.current_epoch,
            batch_idx,
            rank=trainer.global_rank,
            batch_count=trainer.fit_loop.epoch_loop.batch_progress.total.ready,
        )
        if self.log_values and trainer.logger is not None:
            pl_module.log(
                "ghostnoise/ghost_batch_size", float(values["ghost_batch_size"]), on_step=True, on_epoch=False
            )
            pl_module.log("ghostnoise/strength", float(values["strength"]), on_step=True, on_epoch=False)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.revert_on_fit_end:
            self.controller.revert(pl_module)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.revert_on_fit_end:
            self.controller.revert(pl_module)

    @override
    def state_dict(self) -> Dict[str, Any]:
        return self.controller.state_dict()

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)
