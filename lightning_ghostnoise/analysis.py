"""Measure the noise that live ghost layers inject, and compare it with theory.

Per layer, per method and per ghost batch size ``N``, :func:`analyze_noise` runs a copy of the model
with ghost noise in training mode and records the shift and scale each (sample, channel) receives:

* GNI and analytic GNI: the noise itself, recomputed from the layer's input and its own random draws
  (the layer reports them through :attr:`~lightning_ghostnoise.layers.GhostNoiseMixin.noise_observer`),
  with the same functions the layers use (:mod:`lightning_ghostnoise.functional`);
* GBN and XBN: their output decomposed as plain BatchNorm's output plus noise,
  ``y = gamma * (x_hat - shift) / scale + beta`` (:func:`~lightning_ghostnoise.noise_stats.ghost_statistics_noise`).

Every path of the layers (eager, fused, the CUDA kernels) is measured the same way, because the
noise is recomputed from the input and the draws. It then reports moments, the effective ghost
batch size ``N_eff`` (:mod:`lightning_ghostnoise.noise_stats` derives it) and Kolmogorov-Smirnov tests
against the law at ``N`` and at ``N_eff``; :func:`plot_histograms` and :func:`plot_noise_vs_n` draw
the results (matplotlib, the ``plot`` extra). The command ``ghostnoise analyze``
(:mod:`lightning_ghostnoise.analyze`) runs all of it on the bundled model and Fashion-MNIST.

Units: the shift is reported in units of the channel's batch standard deviation of the normalized
features (for BatchNorm that is the shift as injected, to ``1e-5``; analytic GNI's as drawn); the
scale is dimensionless.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    >>> x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    >>> result = analyze_noise(model, x, ghost_batch_sizes=[16], methods=["gni", "gbn"])
    >>> s = result.summary("gni", 16, "1")  # one value per sample: the law at N = 16, shift std 0.25
    >>> abs(s.shift_std - 0.25) < 0.02, round(s.n_eff_shift)
    (True, 16)
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise import noise_stats as NS
from lightning_ghostnoise.layers import METHODS, GhostNoiseMixin
from lightning_ghostnoise.outputs import new_figure, save_figure, write_json
from lightning_ghostnoise.surgery import apply_ghost_noise, find_norm_layers, ghost_layers

__all__ = [
    "LayerNoise",
    "LayerNoiseSummary",
    "NoiseAnalysis",
    "NoiseRecorder",
    "analyze_noise",
    "layer_noise",
    "plot_histograms",
    "plot_noise_vs_n",
]

_BATCH_NORM = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------- one layer, one forward
@dataclass
class LayerNoise:
    """The noise one ghost layer injected in one forward, per (sample, channel).

    Attributes:
        method: the layer's method.
        ghost_batch_size: ``N``.
        shift: ``(B, C)`` shift as the layer forms it, before the strength (GNI: in units of the
            normalized features; GBN/XBN: of the batch standard deviation; analytic: as drawn).
        scale: ``(B, C)`` scale, before the strength.
        m_hat: ``(B, C)`` per-sample means of the layer's normalized features (BatchNorm's output for
            the BatchNorm family, LayerNorm's or GroupNorm's without their affine otherwise).
        v_hat: ``(B, C)`` per-sample variances of the normalized features.
        eps: ``e`` in ``scale**2 = (ghost_var + e) / (batch_var + e)`` (a number or ``(C,)``), see
            :func:`~lightning_ghostnoise.noise_stats.predicted_noise`.
        strength: the layer's strength ``s`` (the layer injects ``s * shift`` and ``scale**s``).
        shift_noise: whether the layer applies the shift.
        scale_noise: whether the layer applies the scale.
        channel_dim: the input's channel dimension.
        positions: values per (sample, channel) in the input (``H * W`` of a feature map, tokens).
    """

    method: str
    ghost_batch_size: int
    shift: Tensor
    scale: Tensor
    m_hat: Tensor
    v_hat: Tensor
    eps: Union[float, Tensor]
    strength: float = 1.0
    shift_noise: bool = True
    scale_noise: bool = True
    channel_dim: int = 1
    positions: int = 1

    @property
    def batch_size(self) -> int:
        return int(self.shift.shape[0])

    def unit(self) -> Tensor:
        """``(C,)`` the unit of the reported shift: the batch standard deviation of the normalized features
        (1 for analytic GNI, whose shift is drawn in these units)."""
        if self.method == "analytic":
            return torch.ones(self.shift.shape[1], dtype=self.shift.dtype, device=self.shift.device)
        m = self.m_hat.double()
        c = m - m.mean(0)
        return (self.v_hat.double() + c.square()).mean(0).sqrt().to(self.shift.dtype)

    def standardized_shift(self) -> Tensor:
        """The shift in units of the batch standard deviation (:meth:`unit`)."""
        return self.shift / self.unit().clamp_min(torch.finfo(self.shift.dtype).tiny)

    def injected(self) -> Tuple[Tensor, Tensor]:
        """What the layer applies: ``s * shift`` (0 without shift noise) and ``scale**s`` (1 without scale noise)."""
        s = self.strength
        shift = self.shift * s if self.shift_noise else torch.zeros_like(self.shift)
        scale = self.scale.pow(s) if self.scale_noise else torch.ones_like(self.scale)
        return shift, scale

    def n_draw(self) -> float:
        """``N'`` of :func:`~lightning_ghostnoise.noise_stats.draw_size`."""
        return NS.draw_size(self.method, self.ghost_batch_size, self.batch_size)

    def prediction(self) -> NS.NoisePrediction:
        """The predicted noise per channel (analytic GNI: its law at ``N``, whatever the data)."""
        if self.method == "analytic":
            n = float(self.ghost_batch_size)
            c = self.shift.shape[1]
            full = lambda v: torch.full((c,), v, dtype=torch.float64, device=self.shift.device)  # noqa: E731
            return NS.NoisePrediction(full(math.nan), full(1 / n), full((n - 1) / n), full(2 * (n - 1) / n**2))
        return NS.predicted_noise(self.m_hat, self.v_hat, self.n_draw(), self.eps)


def _normalized(layer: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
    """LayerNorm's or GroupNorm's normalized features (no affine) and the channel dimension."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps), -1
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, None, None, layer.eps), 1
    raise TypeError(f"layer_noise: unsupported layer type {type(layer).__name__}.")


def layer_noise(layer: GhostNoiseMixin, x: Tensor, draws: Optional[GF.GhostDraws] = None) -> LayerNoise:
    """The shift and scale ``layer`` injects into input ``x`` (training mode), per (sample, channel).

    Args:
        layer: a ghost layer (:mod:`lightning_ghostnoise.layers`).
        x: the layer's input.
        draws: GNI's and analytic GNI's random draws for this input, as the layer made them (see
            :class:`NoiseRecorder`). ``None`` draws them now from the layer's own generator, advancing
            it as a forward would: a layer freshly reseeded then gives the draws of its next forward.

    Raises:
        NotImplementedError: a layer with ``sync=True`` in a process group (its GNI noise is drawn from
            the global batch, which this function does not gather).

    Example:
        >>> import torch
        >>> from lightning_ghostnoise.layers import GhostBatchNorm2d
        >>> layer = GhostBatchNorm2d.from_module(torch.nn.BatchNorm2d(3), method="gbn", ghost_batch_size=4)
        >>> noise = layer_noise(layer, torch.randn(16, 3, 5, 5))
        >>> noise.shift.shape, noise.method
        (torch.Size([16, 3]), 'gbn')
    """
    method, n = layer.method, layer.ghost_batch_size
    if layer._sync_world():
        raise NotImplementedError(
            "layer_noise does not support sync=True in a process group: the layer draws its ghost batches from the "
            "global batch. Measure with sync=False (the same law when each process's batch is large)."
        )
    channel_dim = 1
    with torch.no_grad():
        x = x.detach()
        eps: Union[float, Tensor] = layer.noise_eps
        if isinstance(layer, _BATCH_NORM):
            mean, var = GF.per_sample_moments(x, 1)
            m_hat, v_hat, _, batch_var = NS.bn_normalized_moments(mean, var, layer.eps)
            if method in ("gbn", "xbn"):
                shift, scale = NS.ghost_statistics_noise(mean, var, n, method == "xbn", layer.eps)
                eps = layer.eps / (batch_var + layer.eps)
        else:
            x_hat, channel_dim = _normalized(layer, x)
            m_hat, v_hat = GF.per_sample_moments(x_hat, channel_dim)
        if method in ("gni", "analytic"):
            if draws is None:
                draws = layer._draws(m_hat.shape[0], m_hat.shape[1], m_hat.device)
            shift, scale = draws(m_hat, v_hat)
    return LayerNoise(
        method=method,
        ghost_batch_size=n,
        shift=shift,
        scale=scale,
        m_hat=m_hat,
        v_hat=v_hat,
        eps=eps,
        strength=layer.strength,
        shift_noise=layer.shift_noise,
        scale_noise=layer.scale_noise,
        channel_dim=channel_dim,
        positions=max(x.numel() // max(m_hat.numel(), 1), 1),
    )


# --------------------------------------------------------------------------- recording live layers
Sink = Callable[[str, GhostNoiseMixin, Optional[LayerNoise]], None]


class NoiseRecorder:
    """Watch ghost layers while attached: every training-mode forward's noise goes to ``sink``.

    Attaching sets each layer's :attr:`~lightning_ghostnoise.layers.GhostNoiseMixin.noise_observer`
    (to receive its random draws) and a forward hook (to read its input); detaching removes both, so
    a detached recorder costs nothing. ``sink(name, layer, noise)`` receives a :class:`LayerNoise`,
    or ``None`` when the layer injected no noise in that forward (strength 0, or in eval mode).
    Layers with ``sync=True`` in a process group are skipped with a warning (see :func:`layer_noise`).

    Args:
        layers: ``(name, layer)`` pairs, e.g. from :func:`~lightning_ghostnoise.surgery.ghost_layers`.
        sink: receives each forward's noise.
        plain_output: replace each watched layer's output by the plain layer's (training mode, batch
            statistics): the noise is still measured, but not passed on, so every layer sees the input
            of the plain network (``mode="isolated"`` of :func:`analyze_noise`).

    Example:
        >>> import torch
        >>> from lightning_ghostnoise import apply_ghost_noise, ghost_layers
        >>> model = apply_ghost_noise(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), 8).train()
        >>> seen = []
        >>> with NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.append(name)):
        ...     _ = model(torch.randn(32, 4))
        >>> seen
        ['0']
    """

    def __init__(self, layers: Iterable[Tuple[str, GhostNoiseMixin]], sink: Sink, plain_output: bool = False) -> None:
        self.layers = list(layers)
        self.sink = sink
        self.plain_output = plain_output
        self._handles: List[Any] = []
        self._previous: Dict[int, Any] = {}
        self._pending: Dict[int, List[GF.GhostDraws]] = {}
        self._warned: set = set()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "NoiseRecorder":
        """Start watching (idempotent)."""
        if self._handles:
            return self
        for name, layer in self.layers:
            self._previous[id(layer)] = layer.__dict__.get("noise_observer")
            layer.noise_observer = functools.partial(self._observe, self._previous[id(layer)])
            self._handles.append(layer.register_forward_hook(functools.partial(self._hook, name)))
        return self

    def detach(self) -> None:
        """Stop watching; restores any observer the layers had before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for _, layer in self.layers:
            previous = self._previous.pop(id(layer), None)
            if previous is None:
                layer.__dict__.pop("noise_observer", None)
            else:
                layer.noise_observer = previous
        self._pending.clear()

    def __enter__(self) -> "NoiseRecorder":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _observe(self, previous: Optional[Callable[..., None]], layer: GhostNoiseMixin, draws: GF.GhostDraws) -> None:
        self._pending.setdefault(id(layer), []).append(draws)
        if previous is not None:
            previous(layer, draws)

    def _warn_once(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(f"Ghost noise analysis skips layer {name!r}: {why}")

    def _hook(self, name: str, layer: GhostNoiseMixin, args: Tuple[Any, ...], output: Any) -> Any:
        self._record(name, layer, args[0])
        if self.plain_output:
            return layer._base.forward(layer, args[0])  # the plain layer's own forward
        return None

    def _record(self, name: str, layer: GhostNoiseMixin, x: Tensor) -> None:
        pending = self._pending.pop(id(layer), [])
        if not layer._noise_active():
            self.sink(name, layer, None)
            return
        if layer.sync and layer._sync_world():
            self._warn_once(name, "it uses sync=True, whose ghost batches span all processes.")
            return
        draws = pending[-1] if pending else None
        if layer.method in ("gni", "analytic") and draws is None:
            self._warn_once(name, "its forward made no draws the recorder could see.")
            return
        self.sink(name, layer, layer_noise(layer, x, draws))


# --------------------------------------------------------------------------- summaries
def _ks(u: Tensor) -> Tuple[float, float]:
    return NS.ks_uniform(u) if u.numel() else (math.nan, math.nan)


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


@dataclass
class LayerNoiseSummary:
    """The measured noise of one layer for one method and ``N``, against the law at ``N`` and at ``N_eff``.

    Moments are over every (sample, channel) of the analyzed batches (``count`` values); the shift is
    standardized (see the module docstring). The KS tests need independent values: they use all of
    GNI's and analytic GNI's, but one per ghost batch and channel for GBN (whose ``N`` members share
    one shift and scale) and XBN (whose members' values derive from the same ``N`` samples):
    ``ks_count`` values. ``n_eff_shift`` is ``1 / mean_c(predicted Var(shift))``; ``n_eff_scale`` is
    ``d + 1`` of the scaled chi-square whose mean and variance are the channels' mean predicted ones
    (:func:`~lightning_ghostnoise.noise_stats.predicted_noise`). The KS tests at ``N_eff`` test each
    value against its own channel's predicted law (probability integral transform); channels without
    between-sample variance (no noise) are left out. Each KS result is ``(statistic, p-value)``.
    """

    layer: str
    layer_type: str
    method: str
    mode: str
    ghost_batch_size: int
    batch_size: int
    channels: int
    positions: int
    count: int
    ks_count: int
    n_draw: float
    shift_mean: float
    shift_std: float
    scale_mean: float
    scale_std: float
    log_scale_mean: float
    log_scale_std: float
    rho: float
    n_eff_shift: float
    n_eff_scale: float
    scale2_mean_predicted: float
    law: Dict[str, float] = field(default_factory=dict)
    law_eff: Dict[str, float] = field(default_factory=dict)
    ks_shift: Tuple[float, float] = (math.nan, math.nan)
    ks_scale: Tuple[float, float] = (math.nan, math.nan)
    ks_shift_eff: Tuple[float, float] = (math.nan, math.nan)
    ks_scale_eff: Tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (``nan``/``inf`` become ``None``)."""
        return _finite_or_none(asdict(self))


def _independent_rows(noise: LayerNoise) -> Tensor:
    """The samples whose noise values are independent draws: all of them for GNI (independent given the
    batch) and analytic GNI; the first member of each ghost batch for GBN (whose members share one
    shift and scale) and XBN (whose members' values are functions of the same ``N`` samples)."""
    batch = noise.batch_size
    if noise.method not in ("gbn", "xbn"):
        return torch.arange(batch, device=noise.shift.device)
    group, _ = GF.ghost_groups(batch, noise.ghost_batch_size, device=noise.shift.device)
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    return first.nonzero().reshape(-1)


class _Accumulator:
    """Per (method, N, layer): the values and probability integral transforms of the analyzed batches."""

    def __init__(self) -> None:
        self.shift: List[Tensor] = []
        self.scale: List[Tensor] = []
        self.u: Dict[str, List[Tensor]] = {"shift": [], "scale": [], "shift_eff": [], "scale_eff": []}
        self.pred: List[NS.NoisePrediction] = []
        self.batch_size = 0
        self.channels = 0
        self.positions = 1
        self.layer_type = ""
        self.n_draw = math.nan

    def add(self, layer: nn.Module, noise: LayerNoise) -> None:
        n = noise.ghost_batch_size
        z = noise.standardized_shift().double()
        scale = noise.scale.double()
        pred = noise.prediction()
        self.shift.append(z.cpu())
        self.scale.append(scale.cpu())
        self.pred.append(pred)
        rows = _independent_rows(noise)
        z_ind, scale_ind = z[rows], scale[rows]
        self.u["shift"].append(NS.shift_cdf(z_ind, n).reshape(-1).cpu())
        self.u["scale"].append(NS.chi2_scale_cdf(scale_ind, n).reshape(-1).cpu())
        with torch.no_grad():
            u_shift = NS.shift_cdf(z_ind, pred.n_eff_shift.to(z))  # nan where a channel has no noise
            u_scale = NS.chi2_scale_cdf(scale_ind, pred.n_eff_scale.to(z), pred.scale2_mean.to(z))
        self.u["shift_eff"].append(u_shift.reshape(-1).cpu())
        self.u["scale_eff"].append(u_scale.reshape(-1).cpu())
        self.batch_size = noise.batch_size
        self.channels = noise.shift.shape[1]
        self.positions = noise.positions
        self.layer_type = getattr(type(layer), "_base", type(layer)).__name__
        self.n_draw = noise.n_draw()

    def summarize(self, name: str, method: str, n: int, mode: str) -> LayerNoiseSummary:
        z = torch.cat([t.reshape(-1) for t in self.shift])
        scale = torch.cat([t.reshape(-1) for t in self.scale])
        log_scale = scale.clamp_min(torch.finfo(torch.float64).tiny).log()
        u = {k: torch.cat(v) for k, v in self.u.items()}
        shift_var = torch.stack([p.shift_var.cpu() for p in self.pred]).mean()
        s2_mean = torch.stack([p.scale2_mean.cpu() for p in self.pred]).mean()
        s2_var = torch.stack([p.scale2_var.cpu() for p in self.pred]).mean()
        rho = torch.stack([p.rho.cpu() for p in self.pred]).mean()
        n_eff_shift = float(1 / shift_var) if shift_var > 0 else math.inf
        n_eff_scale = float(2 * s2_mean.square() / s2_var + 1) if s2_var > 0 else math.inf
        law = {k: float(v) for k, v in NS.law_moments(n).items()}
        if math.isfinite(n_eff_shift) and math.isfinite(n_eff_scale) and n_eff_scale > 1:
            eff = NS.law_moments(n_eff_scale, s2_mean)
            eff["shift_std"] = torch.sqrt(shift_var)
            law_eff = {k: float(v) for k, v in eff.items()}
        else:
            law_eff = {k: 0.0 if k.endswith("std") or k == "log_scale_mean" else 1.0 for k in law}
        return LayerNoiseSummary(
            layer=name,
            layer_type=self.layer_type,
            method=method,
            mode=mode,
            ghost_batch_size=n,
            batch_size=self.batch_size,
            channels=self.channels,
            positions=self.positions,
            count=int(z.numel()),
            ks_count=int(u["shift"].numel()),
            n_draw=self.n_draw,
            shift_mean=float(z.mean()),
            shift_std=float(z.std(correction=0)),
            scale_mean=float(scale.mean()),
            scale_std=float(scale.std(correction=0)),
            log_scale_mean=float(log_scale.mean()),
            log_scale_std=float(log_scale.std(correction=0)),
            rho=float(rho),
            n_eff_shift=n_eff_shift,
            n_eff_scale=n_eff_scale,
            scale2_mean_predicted=float(s2_mean),
            law=law,
            law_eff=law_eff,
            ks_shift=_ks(u["shift"]),
            ks_scale=_ks(u["scale"]),
            ks_shift_eff=_ks(u["shift_eff"]),
            ks_scale_eff=_ks(u["scale_eff"]),
        )


@dataclass
class NoiseAnalysis:
    """The result of :func:`analyze_noise`.

    Attributes:
        summaries: one :class:`LayerNoiseSummary` per (method, ``N``, layer).
        samples: ``{(method, N, layer): (shift, scale)}``, the measured values (standardized shift),
            at most ``max_samples`` of each, for histograms.
        layers: the analyzed layer names, in model order.
        skipped: ``{method: why}`` for methods that do not apply to the model.
        meta: free-form information about the run (model, data, ...), written to the JSON.
    """

    summaries: List[LayerNoiseSummary] = field(default_factory=list)
    samples: Dict[Tuple[str, int, str], Tuple[Tensor, Tensor]] = field(default_factory=dict)
    layers: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> List[str]:
        return list(dict.fromkeys(s.method for s in self.summaries))

    @property
    def ghost_batch_sizes(self) -> List[int]:
        return sorted({s.ghost_batch_size for s in self.summaries})

    def summary(self, method: str, ghost_batch_size: int, layer: str) -> LayerNoiseSummary:
        """The summary of one (method, ``N``, layer); ``KeyError`` if it was not analyzed."""
        for s in self.summaries:
            if s.method == method and s.ghost_batch_size == ghost_batch_size and s.layer == layer:
                return s
        raise KeyError(f"no result for method={method!r}, ghost_batch_size={ghost_batch_size}, layer={layer!r}.")

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the samples, JSON-ready."""
        return {
            "meta": _finite_or_none(self.meta),
            "layers": self.layers,
            "methods": self.methods,
            "ghost_batch_sizes": self.ghost_batch_sizes,
            "skipped": self.skipped,
            "results": [s.to_dict() for s in self.summaries],
        }

    def save_json(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_dict` as JSON (strict: no NaN)."""
        write_json(path, self.to_dict(), indent=1, allow_nan=False)

    def format_table(self, ghost_batch_size: Optional[int] = None) -> str:
        """A plain-text table: per (N, layer, method) the shift std, the law's, ``N_eff`` and the KS statistics."""
        head = (
            f"{'N':>4} {'layer':<16} {'method':<8} {'shift std':>9} {'law':>6} {'at Neff':>7} {'N_eff':>7} "
            f"{'KS(N)':>6} {'KS(Neff)':>8} {'log-scale std':>13} {'law':>6} {'at Neff':>7} {'KS(N)':>6} {'KS(Neff)':>8}"
        )
        lines = [head, "-" * len(head)]
        for s in self.summaries:
            if ghost_batch_size is not None and s.ghost_batch_size != ghost_batch_size:
                continue
            f = lambda v, w=6, p=3: f"{v:>{w}.{p}f}" if v is not None and math.isfinite(v) else f"{'-':>{w}}"  # noqa: E731
            lines.append(
                f"{s.ghost_batch_size:>4} {s.layer[-16:]:<16} {s.method:<8} {f(s.shift_std, 9)} {f(s.law['shift_std'])} "
                f"{f(s.law_eff['shift_std'], 7)} {f(s.n_eff_shift, 7, 1)} {f(s.ks_shift[0])} {f(s.ks_shift_eff[0], 8)} "
                f"{f(s.log_scale_std, 13)} {f(s.law['log_scale_std'])} {f(s.law_eff['log_scale_std'], 7)} "
                f"{f(s.ks_scale[0])} {f(s.ks_scale_eff[0], 8)}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- the analysis
def _inputs(data: Any, num_batches: int) -> List[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    out: List[Tensor] = []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"analyze_noise: a batch must be a tensor or a (input, ...) tuple, got {type(batch).__name__}. "
                "Pass one input tensor, or an iterable of batches (e.g. a DataLoader; wrap a single (x, y) in a list)."
            )
        out.append(x)
        if len(out) >= num_batches:
            break
    if not out:
        raise ValueError("analyze_noise: the data gave no batch.")
    return out


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def analyze_noise(
    model: nn.Module,
    data: Union[Tensor, Iterable[Any]],
    ghost_batch_sizes: Sequence[int] = (4, 8, 16, 32, 64),
    methods: Sequence[str] = METHODS,
    num_batches: int = 1,
    seed: int = 0,
    include_names: Optional[Sequence[str]] = None,
    exclude_names: Optional[Sequence[str]] = None,
    max_samples: int = 200_000,
    mode: str = "live",
) -> NoiseAnalysis:
    """Measure, per layer, the noise each method injects at each ghost batch size, and compare it with theory.

    For every (method, ``N``) a copy of ``model`` gets ghost noise at strength 1
    (:func:`~lightning_ghostnoise.surgery.apply_ghost_noise` with ``seed``) and runs the batches in
    training mode without gradients; a :class:`NoiseRecorder` records each layer's noise. ``model``
    itself is not changed.

    Two modes: ``"live"``, the network with ghost noise in every layer, so each layer sees the input
    that the noise of the layers before it shaped (what training with the method does); ``"isolated"``,
    each layer's noise on the input of the plain network (every layer passes on the plain layer's
    output), so that all methods are compared on the same inputs. They differ most for GBN: its
    ghost batches are the same samples at every layer, and each GBN layer standardizes every ghost
    batch, so the next layers' ghost batches have nearly the batch's statistics and their measured
    noise shrinks (see the docs page on noise analysis).

    Args:
        model: a model with BatchNorm, LayerNorm or GroupNorm layers (plain or ghost layers).
        data: one input tensor, or an iterable of batches (tensors or ``(input, ...)`` tuples, e.g. a
            ``DataLoader``); the first ``num_batches`` are used, moved to the model's device.
        ghost_batch_sizes: the ``N`` to analyze (each ``>= 2``: the scale's law has ``N - 1`` degrees of freedom).
        methods: among ``"gni"``, ``"gbn"``, ``"xbn"``, ``"analytic"``; GBN and XBN apply to
            BatchNorm layers only (a model without any is reported in ``skipped``).
        num_batches: how many batches of ``data`` to use.
        seed: the ghost layers' seed.
        include_names: analyze only layers matching one of these glob patterns.
        exclude_names: never layers matching one of these glob patterns.
        max_samples: keep at most this many values per (method, ``N``, layer) for histograms.
        mode: ``"live"`` or ``"isolated"``, see above.

    Returns:
        A :class:`NoiseAnalysis`.
    """
    sizes = list(ghost_batch_sizes)
    if not sizes:
        raise ValueError("analyze_noise: ghost_batch_sizes is empty; pass e.g. [4, 16, 64].")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"analyze_noise: ghost batch sizes must be integers >= 2 (the scale's law has N - 1 degrees of freedom), "
                f"got {n!r}."
            )
    methods = [m.lower() for m in methods]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"analyze_noise: unknown method {m!r}: choose from {', '.join(METHODS)}.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"analyze_noise: num_batches must be a positive integer, got {num_batches!r}.")
    if mode not in ("live", "isolated"):
        raise ValueError(f"analyze_noise: mode must be 'live' or 'isolated', got {mode!r}.")
    device = _device(model)
    inputs = [x.to(device) for x in _inputs(data, num_batches)]
    result = NoiseAnalysis(meta={"mode": mode, "batches": len(inputs), "batch_size": int(inputs[0].shape[0]), "seed": seed})
    for method in methods:
        targets, _ = find_norm_layers(
            model, ["BatchNorm"] if method in ("gbn", "xbn") else None, None, include_names, exclude_names
        )
        if not targets:
            result.skipped[method] = (
                "no BatchNorm layer (GBN and XBN split batch statistics)" if method in ("gbn", "xbn") else "no norm layer"
            )
            continue
        for n in sizes:
            net = apply_ghost_noise(
                copy.deepcopy(model), n, method, strength=1.0, seed=seed, include_types=None if method in ("gni", "analytic") else ["BatchNorm"],
                include_names=include_names, exclude_names=exclude_names, warn=False,
            )  # fmt: skip
            layers = ghost_layers(net)
            acc: Dict[str, _Accumulator] = {}

            def sink(name: str, layer: GhostNoiseMixin, noise: Optional[LayerNoise]) -> None:
                if noise is not None:
                    acc.setdefault(name, _Accumulator()).add(layer, noise)

            net.train()
            with torch.no_grad(), NoiseRecorder(layers, sink, plain_output=mode == "isolated"):
                for x in inputs:
                    net(x)
            for name, _ in layers:
                if name not in acc:
                    continue
                if name not in result.layers:
                    result.layers.append(name)
                a = acc[name]
                result.summaries.append(a.summarize(name, method, n, mode))
                z = torch.cat([t.reshape(-1) for t in a.shift])[:max_samples].float()
                s = torch.cat([t.reshape(-1) for t in a.scale])[:max_samples].float()
                result.samples[(method, n, name)] = (z, s)
    order = {name: i for i, name in enumerate(result.layers)}
    result.summaries.sort(key=lambda s: (s.ghost_batch_size, order.get(s.layer, 0), methods.index(s.method)))
    return result


# --------------------------------------------------------------------------- plots
_COLORS = {"gni": "tab:blue", "gbn": "tab:orange", "xbn": "tab:green", "analytic": "tab:purple"}


def _normal_pdf(x: Tensor, var: float) -> Tensor:
    return torch.exp(-x.square() / (2 * var)) / math.sqrt(2 * math.pi * var)


def _scale_pdf(s: Tensor, n: float, mean: Optional[float] = None) -> Tensor:
    """Density of ``scale`` when ``scale**2 ~ mean / d * chi2(d)``, ``d = n - 1`` (default mean ``d / n``)."""
    d = n - 1
    a = (d / n if mean is None else mean) / d  # scale**2 = a * chi2(d)
    y = s.square() / a
    log_chi2 = (d / 2 - 1) * torch.log(y) - y / 2 - (d / 2) * math.log(2) - math.lgamma(d / 2)
    return torch.exp(log_chi2) * 2 * s / a


def _grid(count: int, cols: int) -> Tuple[int, int]:
    cols = min(cols, count)
    return (count + cols - 1) // cols, cols


def plot_histograms(
    analysis: NoiseAnalysis,
    path: Union[str, os.PathLike],
    ghost_batch_size: int,
    methods: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[str]] = None,
    dpi: int = 100,
    title: str = "",
) -> None:
    """Histograms of the shift and the scale per layer (rows), one outline per method, with the law at
    ``N`` (black, dashed) and GNI's predicted law at ``N_eff`` (grey) overlaid; a PNG at ``path``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> r = analyze_noise(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(64, 4), [4], ["gni"])
        >>> plot_histograms(r, "/tmp/hist.png", 4)  # doctest: +SKIP
    """
    methods = [m for m in (methods or analysis.methods) if (m, ghost_batch_size, analysis.layers[0]) in analysis.samples]
    if not methods:
        raise ValueError(f"plot_histograms: no results for ghost_batch_size={ghost_batch_size}.")
    layers = list(layers or analysis.layers)
    fig = new_figure(figsize=(8.0, 1.7 * len(layers) + 0.6))
    axes = fig.subplots(len(layers), 2, squeeze=False)
    n = ghost_batch_size
    for row, name in enumerate(layers):
        shift_all = torch.cat([analysis.samples[(m, n, name)][0] for m in methods if (m, n, name) in analysis.samples])
        lim = max(float(shift_all.abs().quantile(0.999)) if shift_all.numel() < 16_000_000 else 4 / math.sqrt(n), 3 / math.sqrt(n))
        scale_all = torch.cat([analysis.samples[(m, n, name)][1] for m in methods if (m, n, name) in analysis.samples])
        top = max(float(scale_all.quantile(0.999)) if scale_all.numel() < 16_000_000 else 2.0, 1.5)
        ax_shift, ax_scale = axes[row]
        for m in methods:
            if (m, n, name) not in analysis.samples:
                continue
            z, s = analysis.samples[(m, n, name)]
            kw = dict(bins=100, density=True, histtype="step", color=_COLORS.get(m), label=m.upper() if m != "analytic" else "analytic")
            ax_shift.hist(z.clamp(-lim, lim).numpy(), range=(-lim, lim), **kw)
            ax_scale.hist(s.clamp(0, top).numpy(), range=(0, top), **kw)
        xs = torch.linspace(-lim, lim, 400, dtype=torch.float64)
        ss = torch.linspace(top / 400, top, 400, dtype=torch.float64)
        ax_shift.plot(xs.numpy(), _normal_pdf(xs, 1 / n).numpy(), "k--", lw=1, label=f"law at N={n}")
        ax_scale.plot(ss.numpy(), _scale_pdf(ss, n).numpy(), "k--", lw=1, label=f"law at N={n}")
        row_title = name
        if "gni" in methods:
            g = analysis.summary("gni", n, name)
            if math.isfinite(g.n_eff_shift) and math.isfinite(g.n_eff_scale) and g.n_eff_scale > 1:
                ax_shift.plot(xs.numpy(), _normal_pdf(xs, 1 / g.n_eff_shift).numpy(), color="0.45", lw=1.2, label="GNI law at N_eff")
                ax_scale.plot(ss.numpy(), _scale_pdf(ss, g.n_eff_scale, g.scale2_mean_predicted).numpy(), color="0.45", lw=1.2, label="GNI law at N_eff")
                row_title += f"  (C={g.channels}, {g.positions} positions; N_eff {g.n_eff_shift:.0f} / {g.n_eff_scale:.0f})"
        ax_shift.set_title(row_title, fontsize=8, loc="left")
        ax_shift.tick_params(labelsize=7)
        ax_scale.tick_params(labelsize=7)
        ax_shift.set_yticks([])
        ax_scale.set_yticks([])
        if row == len(layers) - 1:
            ax_shift.set_xlabel("shift (units of the batch std)", fontsize=8)
            ax_scale.set_xlabel("scale", fontsize=8)
    axes[0][1].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"Ghost noise per layer, N = {n}" + (f" ({title})" if title else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi)


def plot_noise_vs_n(
    analysis: NoiseAnalysis,
    path: Union[str, os.PathLike],
    quantity: str = "shift_std",
    layers: Optional[Sequence[str]] = None,
    dpi: int = 100,
    cols: int = 4,
    title: str = "",
) -> None:
    """One panel per layer: ``quantity`` (``"shift_std"``, ``"log_scale_std"``, ``"scale_std"``) against
    ``N`` for each method, with the law at ``N`` (black, dashed) and GNI's law at ``N_eff`` (grey); a PNG.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> r = analyze_noise(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(64, 4), [4, 8], ["gni"])
        >>> plot_noise_vs_n(r, "/tmp/noise.png")  # doctest: +SKIP
    """
    labels = {"shift_std": "std of shift", "log_scale_std": "std of log(scale)", "scale_std": "std of scale"}
    if quantity not in labels:
        raise ValueError(f"plot_noise_vs_n: quantity must be one of {', '.join(labels)}, got {quantity!r}.")
    layers = list(layers or analysis.layers)
    sizes = analysis.ghost_batch_sizes
    rows, ncols = _grid(len(layers), cols)
    fig = new_figure(figsize=(2.6 * ncols, 2.3 * rows + 0.5))
    from matplotlib import ticker  # (importable: new_figure checked matplotlib)

    axes = fig.subplots(rows, ncols, squeeze=False)
    for i, name in enumerate(layers):
        ax = axes[i // ncols][i % ncols]
        for m in analysis.methods:
            pts = [(s.ghost_batch_size, getattr(s, quantity)) for s in analysis.summaries if s.method == m and s.layer == name]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", ms=3, lw=1, color=_COLORS.get(m), label=m.upper() if m != "analytic" else "analytic")
        ax.plot(sizes, [NS.law_moments(n)[quantity].item() for n in sizes], "k--", lw=1, label="law at N")
        eff = [(s.ghost_batch_size, s.law_eff.get(quantity)) for s in analysis.summaries if s.method == "gni" and s.layer == name]
        eff = [(n, v) for n, v in eff if v is not None and math.isfinite(v) and v > 0]
        if eff:
            xs, ys = zip(*eff)
            ax.plot(xs, ys, ":", color="0.45", lw=1.5, label="GNI law at N_eff")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        if i % ncols == 0:
            ax.set_ylabel(labels[quantity], fontsize=8)
        if i // ncols == rows - 1:
            ax.set_xlabel("ghost batch size N", fontsize=8)
    for j in range(len(layers), rows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{labels[quantity]} against the ghost batch size" + (f" ({title})" if title else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi)
