"""Observe live ghost layers: the shift and scale each (sample, channel) receives in a forward.

:func:`layer_noise` recomputes one layer's noise from its input and its own random draws, with the
same functions the layers use (:mod:`lightning_ghostnoise.functional`), so every path of the layers
(eager, fused, the CUDA kernels) is measured the same way:

* GNI and analytic GNI: the noise itself (the layer reports its draws through
  :attr:`~lightning_ghostnoise.layers.GhostNoiseMixin.noise_observer`);
* GBN and XBN: their output decomposed as plain BatchNorm's output plus noise,
  ``y = gamma * (x_hat - shift) / scale + beta``
  (:func:`~lightning_ghostnoise.analysis.noise_stats.ghost_statistics_noise`).

:class:`NoiseRecorder` attaches to layers and hands every training-mode forward's noise to a sink
(:func:`~lightning_ghostnoise.analysis.analyze_noise` and
:class:`~lightning_ghostnoise.GhostNoiseMonitor` are its users).

Units: the shift is reported in units of the channel's batch standard deviation of the normalized
features (for BatchNorm that is the shift as injected, to ``1e-5``; analytic GNI's as drawn); the
scale is dimensionless.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import apply_ghost_noise, ghost_layers
    >>> model = apply_ghost_noise(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), 8).train()
    >>> seen = []
    >>> with NoiseRecorder(ghost_layers(model), lambda name, layer, noise: seen.append(noise.shift.shape)):
    ...     _ = model(torch.randn(32, 4))
    >>> seen
    [torch.Size([32, 4])]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.analysis import noise_stats as NS
from lightning_ghostnoise.layers import GhostNoiseMixin

__all__ = ["LayerNoise", "NoiseRecorder", "Sink", "layer_noise"]

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
            :func:`~lightning_ghostnoise.analysis.noise_stats.predicted_noise`.
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
        """``N'`` of :func:`~lightning_ghostnoise.analysis.noise_stats.draw_size`."""
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
        layers: ``(name, layer)`` pairs, e.g. from :func:`~lightning_ghostnoise.ghost_layers`.
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
