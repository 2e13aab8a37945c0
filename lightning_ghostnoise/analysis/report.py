"""The report of a noise analysis: per layer, method and ``N`` the moments, ``N_eff`` and KS tests.

:class:`LayerNoiseSummary` compares one layer's measured noise with the law at ``N`` and at the
effective ghost batch size ``N_eff`` (:mod:`lightning_ghostnoise.analysis.noise_stats` derives it);
:class:`NoiseAnalysis` holds every summary, the samples for histograms, a plain-text table and the
JSON. :func:`~lightning_ghostnoise.analysis.analyze_noise` fills it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ghostnoise.analysis import analyze_noise
    >>> result = analyze_noise(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(64, 4), [4], ["gni"])
    >>> result.format_table(4).splitlines()[0].split()[:3]
    ['N', 'layer', 'method']
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.analysis import noise_stats as NS
from lightning_ghostnoise.analysis.outputs import write_json
from lightning_ghostnoise.analysis.recorder import LayerNoise

__all__ = ["LayerNoiseSummary", "NoiseAnalysis"]


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
    (:func:`~lightning_ghostnoise.analysis.noise_stats.predicted_noise`). The KS tests at ``N_eff`` test each
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
