"""Figures of a noise analysis: histograms with the laws overlaid, and noise strength against ``N``.

Both take a :class:`~lightning_ghostnoise.analysis.report.NoiseAnalysis` and write a PNG through
:mod:`lightning_ghostnoise.analysis.outputs` (matplotlib's object API, no pyplot state; the ``plot``
extra).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ghostnoise.analysis import analyze_noise
    >>> r = analyze_noise(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(64, 4), [4, 8], ["gni"])
    >>> plot_noise_vs_n(r, "/tmp/noise.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_ghostnoise.analysis import noise_stats as NS
from lightning_ghostnoise.analysis.outputs import new_figure, save_figure
from lightning_ghostnoise.analysis.report import NoiseAnalysis

__all__ = ["plot_histograms", "plot_noise_vs_n"]

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
        >>> from lightning_ghostnoise.analysis import analyze_noise
        >>> r = analyze_noise(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(64, 4), [4], ["gni"])
        >>> plot_histograms(r, "/tmp/hist.png", 4)  # doctest: +SKIP
    """
    methods = [
        m for m in (methods or analysis.methods) if (m, ghost_batch_size, analysis.layers[0]) in analysis.samples
    ]
    if not methods:
        raise ValueError(f"plot_histograms: no results for ghost_batch_size={ghost_batch_size}.")
    layers = list(layers or analysis.layers)
    fig = new_figure(figsize=(8.0, 1.7 * len(layers) + 0.6))
    axes = fig.subplots(len(layers), 2, squeeze=False)
    n = ghost_batch_size
    for row, name in enumerate(layers):
        shift_all = torch.cat([analysis.samples[(m, n, name)][0] for m in methods if (m, n, name) in analysis.samples])
        lim = max(
            float(shift_all.abs().quantile(0.999)) if shift_all.numel() < 16_000_000 else 4 / math.sqrt(n),
            3 / math.sqrt(n),
        )
        scale_all = torch.cat([analysis.samples[(m, n, name)][1] for m in methods if (m, n, name) in analysis.samples])
        top = max(float(scale_all.quantile(0.999)) if scale_all.numel() < 16_000_000 else 2.0, 1.5)
        ax_shift, ax_scale = axes[row]
        for m in methods:
            if (m, n, name) not in analysis.samples:
                continue
            z, s = analysis.samples[(m, n, name)]
            kw = dict(
                bins=100,
                density=True,
                histtype="step",
                color=_COLORS.get(m),
                label=m.upper() if m != "analytic" else "analytic",
            )
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
                ax_shift.plot(
                    xs.numpy(),
                    _normal_pdf(xs, 1 / g.n_eff_shift).numpy(),
                    color="0.45",
                    lw=1.2,
                    label="GNI law at N_eff",
                )
                ax_scale.plot(
                    ss.numpy(),
                    _scale_pdf(ss, g.n_eff_scale, g.scale2_mean_predicted).numpy(),
                    color="0.45",
                    lw=1.2,
                    label="GNI law at N_eff",
                )
                row_title += (
                    f"  (C={g.channels}, {g.positions} positions; N_eff {g.n_eff_shift:.0f} / {g.n_eff_scale:.0f})"
                )
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
        >>> from lightning_ghostnoise.analysis import analyze_noise
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
            pts = [
                (s.ghost_batch_size, getattr(s, quantity))
                for s in analysis.summaries
                if s.method == m and s.layer == name
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(
                    xs, ys, "o-", ms=3, lw=1, color=_COLORS.get(m), label=m.upper() if m != "analytic" else "analytic"
                )
        ax.plot(sizes, [NS.law_moments(n)[quantity].item() for n in sizes], "k--", lw=1, label="law at N")
        eff = [
            (s.ghost_batch_size, s.law_eff.get(quantity))
            for s in analysis.summaries
            if s.method == "gni" and s.layer == name
        ]
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
