"""``GhostNoiseMonitor``: log the noise the ghost layers inject during training.

Also importable from its former path, ``lightning_ghostnoise.monitor``.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from lightning_ghostnoise import GhostNoise, GhostNoiseMonitor
    >>> trainer = Trainer(
    ...     callbacks=[GhostNoise(ghost_batch_size=16), GhostNoiseMonitor(every_n_steps=50)],
    ...     logger=CSVLogger("logs"),
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from lightning_ghostnoise.analysis import LayerNoise, NoiseRecorder
from lightning_ghostnoise.layers.base import GhostNoiseMixin
from lightning_ghostnoise.layers.convert import ghost_layers

__all__ = ["GhostNoiseMonitor", "NoiseStatistics", "STATISTICS"]

#: The statistics logged per layer (``<prefix><layer>/<statistic>``).
STATISTICS: Tuple[str, ...] = ("shift_mean", "shift_std", "scale_mean", "scale_std", "log_scale_mean", "log_scale_std")


class NoiseStatistics(Metric):
    """Sums of the injected noise per layer, mergeable across processes (every state reduces by
    ``sum``, ``min`` or ``max``): moments of the shift, the scale and ``log(scale)``, and fixed-bin
    histograms of the shift and ``log(scale)``.

    Args:
        num_layers: how many layers (rows of every state).
        bins: histogram bins.
        histogram_range: the histograms cover ``[-r, r]``; values outside are counted in the edge bins.

    Example:
        >>> m = NoiseStatistics(num_layers=1, bins=8)
        >>> m.update(0, torch.tensor([[0.1, -0.1]]), torch.tensor([[1.0, 1.0]]))
        >>> {k: round(float(v), 3) for k, v in m.compute().items() if k in ("shift_std", "scale_mean")}
        {'shift_std': 0.1, 'scale_mean': 1.0}
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    count: Tensor
    sums: Tensor
    shift_hist: Tensor
    log_scale_hist: Tensor
    minima: Tensor
    maxima: Tensor

    def __init__(self, num_layers: int, bins: int = 50, histogram_range: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_layers < 1 or bins < 1 or not histogram_range > 0:
            raise ValueError(
                f"NoiseStatistics needs num_layers >= 1, bins >= 1 and histogram_range > 0, got {num_layers}, {bins}, "
                f"{histogram_range}."
            )
        self.num_layers, self.bins, self.histogram_range = num_layers, bins, float(histogram_range)
        dt = torch.float64
        self.add_state("count", torch.zeros(num_layers, dtype=dt), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(num_layers, 6, dtype=dt), dist_reduce_fx="sum")
        self.add_state("shift_hist", torch.zeros(num_layers, bins, dtype=dt), dist_reduce_fx="sum")
        self.add_state("log_scale_hist", torch.zeros(num_layers, bins, dtype=dt), dist_reduce_fx="sum")
        self.add_state("minima", torch.full((num_layers, 2), math.inf, dtype=dt), dist_reduce_fx="min")
        self.add_state("maxima", torch.full((num_layers, 2), -math.inf, dtype=dt), dist_reduce_fx="max")

    def _histogram(self, values: Tensor) -> Tensor:
        r = self.histogram_range
        idx = ((values.clamp(-r, r) + r) * (self.bins / (2 * r))).long().clamp_(0, self.bins - 1)
        return torch.bincount(idx, minlength=self.bins).to(torch.float64)

    def update(self, index: int, shift: Tensor, scale: Tensor) -> None:
        """Add the noise values of layer ``index`` (any shape; empty: nothing to add)."""
        if shift.numel() == 0:
            return
        z = shift.detach().reshape(-1).to(torch.float64)
        s = scale.detach().reshape(-1).to(torch.float64)
        log_s = s.clamp_min(torch.finfo(torch.float64).tiny).log()
        self.count[index] += z.numel()
        self.sums[index] += torch.stack(
            [z.sum(), z.square().sum(), s.sum(), s.square().sum(), log_s.sum(), log_s.square().sum()]
        )
        self.shift_hist[index] += self._histogram(z)
        self.log_scale_hist[index] += self._histogram(log_s)
        self.minima[index] = torch.minimum(self.minima[index], torch.stack([z.min(), log_s.min()]))
        self.maxima[index] = torch.maximum(self.maxima[index], torch.stack([z.max(), log_s.max()]))

    def compute(self) -> Dict[str, Tensor]:
        """Per layer ``(L,)`` (torchmetrics returns 0-dim tensors for one layer): the :data:`STATISTICS`. A layer that injected nothing (noise off, or not
        run) has the values of no noise: shift 0, scale 1, standard deviations 0."""
        n = self.count.clamp_min(1).unsqueeze(1)
        mean = self.sums[:, 0::2] / n
        var = (self.sums[:, 1::2] / n - mean.square()).clamp_min(0)
        none = self.count == 0
        out = {}
        for j, name in enumerate(("shift", "scale", "log_scale")):
            out[f"{name}_mean"] = torch.where(
                none, torch.full_like(mean[:, j], 1.0 if name == "scale" else 0.0), mean[:, j]
            )
            out[f"{name}_std"] = torch.where(none, torch.zeros_like(var[:, j]), var[:, j].sqrt())
        return out

    def bucket_limits(self) -> List[float]:
        """The histogram bins' upper edges."""
        r = self.histogram_range
        return [-r + 2 * r * (i + 1) / self.bins for i in range(self.bins)]


class GhostNoiseMonitor(Callback):
    """Log the shift and scale noise each ghost layer injects, every ``every_n_steps`` training steps.

    On a logging step it watches the ghost layers' forward (the noise is recomputed from each layer's
    input and its own random draws, exactly what the layer applies: ``strength * shift`` and
    ``scale**strength``; see :mod:`lightning_ghostnoise.analysis`), sums the values across all
    processes (:class:`NoiseStatistics`, a torchmetrics ``Metric``) and logs, per layer,
    ``<prefix><layer>/shift_mean``, ``shift_std``, ``scale_mean``, ``scale_std``,
    ``log_scale_mean`` and ``log_scale_std`` through every logger of the Trainer. Loggers whose
    experiment has ``add_histogram_raw`` (TensorBoard) also get histograms of the shift and
    ``log(scale)`` (``<prefix><layer>/shift`` and ``.../log_scale``), merged across processes.

    On every other step it does nothing: no hook is attached and no work is done beyond one modulo.
    With gradient accumulation it measures the first micro-batch of a logging step. The shift is in
    the units the layer adds it (BatchNorm: batch standard deviations). Layers with ``sync=True`` are
    skipped with a warning. The monitor is tested in eager mode. Under ``torch.compile``, the hooks it
    attaches on a logging step change what dynamo guards on, so expect a recompilation around
    logging steps; prefer a large ``every_n_steps``.

    Add it after :class:`~lightning_ghostnoise.callbacks.GhostNoise` (the order only matters for the
    first step: the monitor finds the ghost layers when it first logs).

    Args:
        every_n_steps: log on global steps that are multiples of this; ``0`` turns the monitor off.
        include_names: only layers whose qualified name matches one of these glob patterns.
        exclude_names: never layers whose qualified name matches one of these glob patterns.
        histograms: log histograms where the logger supports them.
        bins: histogram bins.
        histogram_range: the histograms cover ``[-r, r]`` (values outside fall in the edge bins).
        prefix: metric names start with this.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> from lightning_ghostnoise import GhostNoise
        >>> monitor = GhostNoiseMonitor(every_n_steps=100, include_names=["blocks.*"])
        >>> trainer = Trainer(callbacks=[GhostNoise(ghost_batch_size=16), monitor], logger=CSVLogger("logs"))  # doctest: +SKIP

    In YAML (LightningCLI):

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: lightning_ghostnoise.GhostNoise
            - class_path: lightning_ghostnoise.GhostNoiseMonitor
              init_args:
                every_n_steps: 100
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include_names: Optional[List[str]] = None,
        exclude_names: Optional[List[str]] = None,
        histograms: bool = True,
        bins: int = 50,
        histogram_range: float = 1.0,
        prefix: str = "ghostnoise/",
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0 (0 turns the monitor off), got {every_n_steps!r}.")
        for arg, value in (("include_names", include_names), ("exclude_names", exclude_names)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a list of name patterns, e.g. [{value!r}], not a bare string.")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}.")
        if not isinstance(histogram_range, (int, float)) or not math.isfinite(histogram_range) or histogram_range <= 0:
            raise ValueError(f"histogram_range must be a positive number, got {histogram_range!r}.")
        self.every_n_steps = every_n_steps
        self.include_names = list(include_names) if include_names is not None else None
        self.exclude_names = list(exclude_names) if exclude_names is not None else None
        self.histograms = histograms
        self.bins = bins
        self.histogram_range = float(histogram_range)
        self.prefix = prefix
        self._names: List[str] = []
        self._layer_ids: Tuple[int, ...] = ()
        self._metric: Optional[NoiseStatistics] = None
        self._recorder: Optional[NoiseRecorder] = None
        self._step = -1
        self._last_step = -1
        self._warned_empty = False

    # ------------------------------------------------------------------ which layers
    def _selected(self, name: str) -> bool:
        if self.include_names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include_names):
            return False
        return not (self.exclude_names is not None and any(fnmatch.fnmatchcase(name, p) for p in self.exclude_names))

    def _layers(self, pl_module: pl.LightningModule) -> List[Tuple[str, GhostNoiseMixin]]:
        return [(name, layer) for name, layer in ghost_layers(pl_module) if self._selected(name)]

    def _ensure_metric(self, layers: Sequence[Tuple[str, GhostNoiseMixin]], device: torch.device) -> NoiseStatistics:
        ids = tuple(id(layer) for _, layer in layers)
        if self._metric is None or ids != self._layer_ids:
            self._names = [name for name, _ in layers]
            self._layer_ids = ids
            self._metric = NoiseStatistics(len(layers), self.bins, self.histogram_range)
        return self._metric.to(device)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self._last_step or self._recorder is not None:
            return
        layers = self._layers(pl_module)
        if not layers:
            if not self._warned_empty:
                self._warned_empty = True
                rank_zero_warn(
                    "GhostNoiseMonitor found no ghost layer to watch (after include/exclude filters): add the GhostNoise "
                    "callback (before the monitor) or apply_ghost_noise to the model."
                )
            return
        metric = self._ensure_metric(layers, pl_module.device)
        index = {id(layer): i for i, (_, layer) in enumerate(layers)}

        def sink(name: str, layer: GhostNoiseMixin, noise: Optional[LayerNoise]) -> None:
            if noise is not None:
                metric.update(index[id(layer)], *noise.injected())

        self._step = step
        self._recorder = NoiseRecorder(layers, sink).attach()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is None:
            return
        self._detach()
        self._last_step = self._step
        metric = self._metric
        assert metric is not None
        # an empty update: a step where no watched layer ran still syncs, without torchmetrics' warning
        metric.update(0, torch.zeros(0), torch.zeros(0))
        values = metric.compute()  # summed over all processes (every rank takes part); one layer: 0-dim
        histograms = None
        if self.histograms and trainer.is_global_zero and any(self._supports_histograms(lg) for lg in trainer.loggers):
            histograms = (metric.shift_hist.cpu(), metric.log_scale_hist.cpu(), metric.count.cpu(),
                          metric.minima.cpu(), metric.maxima.cpu(), metric.sums.cpu())  # fmt: skip
        metric.reset()
        if not trainer.is_global_zero:
            return
        scalars = {
            f"{self.prefix}{name}/{stat}": float(values[stat].reshape(-1)[i])
            for i, name in enumerate(self._names)
            for stat in STATISTICS
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=self._step)
            if histograms is not None and self._supports_histograms(logger):
                self._log_histograms(logger, histograms, metric.bucket_limits())

    @staticmethod
    def _supports_histograms(logger: Any) -> bool:
        return callable(getattr(getattr(logger, "experiment", None), "add_histogram_raw", None))

    def _log_histograms(self, logger: Any, histograms: Tuple[Tensor, ...], limits: List[float]) -> None:
        shift_hist, log_hist, count, minima, maxima, sums = histograms
        for i, name in enumerate(self._names):
            if count[i] == 0:
                continue
            for j, (what, hist) in enumerate((("shift", shift_hist), ("log_scale", log_hist))):
                logger.experiment.add_histogram_raw(
                    f"{self.prefix}{name}/{what}",
                    min=float(minima[i, j]),
                    max=float(maxima[i, j]),
                    num=int(count[i]),
                    sum=float(sums[i, 4 * j]),
                    sum_squares=float(sums[i, 4 * j + 1]),
                    bucket_limits=limits,
                    bucket_counts=hist[i].tolist(),
                    global_step=self._step,
                )

    def _detach(self) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
