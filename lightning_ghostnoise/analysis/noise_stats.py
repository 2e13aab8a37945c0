"""Pure tensor math of the noise analysis: GBN/XBN noise, the laws of ghost noise, effective ``N``, KS tests.

No module state, no Lightning, no scipy: :mod:`lightning_ghostnoise.analysis` applies these to live
layers, :class:`~lightning_ghostnoise.GhostNoiseMonitor` to training steps.

**The law.** For one value per (sample, channel) of a Gaussian feature, the noise GNI injects is
``shift ~ Normal(0, 1/N)`` and ``scale**2 ~ chi2(N - 1) / N`` (the paper's analysis; analytic GNI
draws exactly this).

**GBN and XBN as noise.** GBN normalizes sample ``b`` by its ghost batch's mean ``gm`` and variance
``gv``; plain BN by the batch's ``bm`` and ``bv``. With ``x_hat = (x - bm) / sqrt(bv + eps)`` (BN's
output before its affine), ``(x - gm) / sqrt(gv + eps) = (x_hat - shift) / scale`` exactly, with
``shift = (gm - bm) / sqrt(bv + eps)`` and ``scale = sqrt((gv + eps) / (bv + eps))``
(:func:`ghost_statistics_noise`): GBN is BN plus a per-(sample, channel) shift and scale, the form
GNI injects. XBN is the same with the leave-one-out statistics of the other ``N - 1`` members.

**Effective N.** For feature maps the ghost moments pool ``N * H * W`` values, so the noise is weaker
than the law at ``N``. Let ``m1[b]``, ``m2[b]`` be the per-sample mean and second moment (about the
batch mean) of the normalized feature of one channel, ``t`` its batch variance, and ``N'`` the number
of independent draws (:func:`draw_size`). A ghost mean averages ``N'`` draws of ``m1``, so
``Var(shift) = Var_b(m1) / N'``: in units of the batch standard deviation ``1 / N_eff`` with
``N_eff = N' / rho`` and ``rho = Var_b(m1) / t``, the fraction of the channel's variance that lies
between samples (1 for one value per sample, ``1 / (H W)`` for independent positions). The ghost
variance ``A - M**2`` (``A``, ``M``: the ghost means of ``m2``, ``m1``) has mean ``t - Var_b(m1) / N'``
and variance ``Var(m2) / N' - 2 Cov(m2, m1**2) / N'**2 + 2 Var(m1)**2 / N'**2 + k4 / N'**3``
(``k4``: the fourth cumulant of ``m1``), exact for draws with replacement (GNI) and a first-order
approximation without (GBN, XBN). :func:`predicted_noise` returns both; the law at ``N_eff`` for the
scale is the scaled chi-square with these two moments, ``scale**2 ~ mean / d * chi2(d)`` with
``d = 2 mean**2 / var``, and ``N_eff`` (scale) ``= d + 1``. For one Gaussian value per sample both
``N_eff`` equal ``N`` and both laws are the law above.

Example:
    >>> import torch
    >>> z = torch.randn(4000, dtype=torch.float64)
    >>> d, p = ks_test(z, normal_cdf)
    >>> bool(p > 0.01)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_ghostnoise import functional as GF

__all__ = [
    "NoisePrediction",
    "bn_normalized_moments",
    "chi2_scale_cdf",
    "draw_size",
    "ghost_statistics_noise",
    "kolmogorov_sf",
    "ks_test",
    "ks_uniform",
    "law_moments",
    "normal_cdf",
    "predicted_noise",
    "shift_cdf",
]

Number = Union[float, Tensor]


# --------------------------------------------------------------------------- noise of GBN and XBN
def bn_normalized_moments(mean: Tensor, var: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample moments of BatchNorm's normalized output, from the per-sample moments of its input.

    Args:
        mean: per-(sample, channel) means ``(B, C)`` of the input (:func:`~lightning_ghostnoise.functional.per_sample_moments`).
        var: per-(sample, channel) biased variances ``(B, C)``.
        eps: BatchNorm's epsilon.

    Returns:
        ``(m_hat, v_hat, batch_mean, batch_var)``: the moments ``(B, C)`` of
        ``x_hat = (x - batch_mean) / sqrt(batch_var + eps)`` and the batch's ``(C,)``.

    Example:
        >>> x = torch.randn(8, 3, 5)
        >>> m, v, _, _ = bn_normalized_moments(*GF.per_sample_moments(x))
        >>> float(m.mean(0).abs().max()) < 1e-5
        True
    """
    batch_mean, batch_var = GF.batch_moments(mean, var)
    rstd = torch.rsqrt(batch_var + eps)
    return (mean - batch_mean) * rstd, var * rstd.square(), batch_mean, batch_var


def ghost_statistics_noise(
    mean: Tensor, var: Tensor, ghost_batch_size: int, exclusive: bool = False, eps: float = 1e-5
) -> Tuple[Tensor, Tensor]:
    """GBN's (or, ``exclusive``, XBN's) normalization written as BatchNorm plus noise.

    ``shift = (ghost_mean - batch_mean) / sqrt(batch_var + eps)`` and
    ``scale = sqrt((ghost_var + eps) / (batch_var + eps))`` per (sample, channel), so that
    ``(x - ghost_mean) / sqrt(ghost_var + eps) == (x_hat - shift) / scale`` with ``x_hat`` BatchNorm's
    normalized output. Ghost batches follow the library's rule (:func:`~lightning_ghostnoise.functional.ghost_groups`:
    consecutive samples, the ``B mod N`` remainder joins the last ghost batch); XBN's statistics are
    those of the *other* members (:func:`~lightning_ghostnoise.functional.ghost_averaging_matrix`).

    Args:
        mean: per-(sample, channel) means ``(B, C)`` of the layer's input.
        var: per-(sample, channel) biased variances ``(B, C)``.
        ghost_batch_size: ``N``.
        exclusive: XBN's leave-one-out statistics.
        eps: the BatchNorm layer's epsilon.

    Returns:
        ``(shift, scale)``, each ``(B, C)``, without gradient.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> shift, scale = ghost_statistics_noise(*GF.per_sample_moments(x), 4)
        >>> shift.shape, bool((scale > 0).all())
        (torch.Size([8, 3]), True)
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    with torch.no_grad():
        batch = mean.shape[0]
        centre = mean.mean(0)  # a shift for numerically stable variances
        c = mean - centre
        second = var + c * c  # per-sample second moments about the centre
        avg = GF.ghost_averaging_matrix(batch, ghost_batch_size, exclusive, device=mean.device, dtype=mean.dtype)
        ghost_mean = avg @ c
        ghost_var = (avg @ second - ghost_mean.square()).clamp_min(0)
        batch_mean = c.mean(0)
        batch_var = (second.mean(0) - batch_mean.square()).clamp_min(0)
        shift = (ghost_mean - batch_mean) * torch.rsqrt(batch_var + eps)
        scale = torch.sqrt((ghost_var + eps) / (batch_var + eps))
    return shift, scale


# --------------------------------------------------------------------------- effective N
def draw_size(method: str, ghost_batch_size: int, batch_size: int) -> float:
    """``N'``: the number of independent draws a ghost statistic averages, finite batch included.

    GNI draws ``N`` members with replacement: ``N' = N``. GBN's ``N`` members are distinct samples of
    the batch of ``B``, so the ghost mean varies less, by the finite-population factor
    ``(B - N) / (B - 1)``: ``N' = N (B - 1) / (B - N)`` (infinite at ``N = B``: no noise). XBN averages
    the ``n = N - 1`` other members, drawn from the other ``B - 1`` samples:
    ``N' = n (B - 2) / (B - 1 - n)``. Analytic GNI does not sample: ``N' = N``. The larger
    remainder ghost batch (``B mod N``) is not accounted for.

    Example:
        >>> draw_size("gni", 16, 256), round(draw_size("gbn", 16, 256), 2)
        (16.0, 17.0)
    """
    n, b = float(ghost_batch_size), float(batch_size)
    if method in ("gni", "analytic"):
        return n
    if method == "gbn":
        n = min(n, b)
        return math.inf if n >= b else n * (b - 1) / (b - n)
    if method == "xbn":
        n = min(n, b) - 1
        return math.inf if n >= b - 1 or b <= 2 else n * (b - 2) / (b - 1 - n)
    raise ValueError(f"Unknown ghost noise method {method!r}: choose one of gni, gbn, xbn, analytic.")


@dataclass
class NoisePrediction:
    """Predicted noise per channel (tensors ``(C,)``), in the units the analysis reports.

    Attributes:
        rho: the between-sample fraction ``Var_b(m1) / t`` of each channel's batch variance ``t``.
        shift_var: predicted variance of ``shift / sqrt(t)`` (``1 / N_eff`` for the shift).
        scale2_mean: predicted mean of ``scale**2``.
        scale2_var: predicted variance of ``scale**2``.
    """

    rho: Tensor
    shift_var: Tensor
    scale2_mean: Tensor
    scale2_var: Tensor

    @property
    def n_eff_shift(self) -> Tensor:
        """``N_eff`` of the shift: ``1 / shift_var``."""
        return self.shift_var.reciprocal()

    @property
    def n_eff_scale(self) -> Tensor:
        """``N_eff`` of the scale: ``d + 1`` for the moment-matched ``scale**2 ~ mean / d * chi2(d)``."""
        return 2 * self.scale2_mean.square() / self.scale2_var + 1


def predicted_noise(m_hat: Tensor, v_hat: Tensor, n_draw: float, eps: Number = 0.0) -> NoisePrediction:
    """Predict each channel's shift and scale noise from the per-sample moments of its normalized features.

    The derivation is in this module's docstring. ``scale**2`` is taken as ``(ghost_var + e) / (t + e)``
    with ``e = eps``: GNI's noise epsilon, or for GBN/XBN ``eps / (batch_var + eps)`` of the raw input
    (per channel), which makes it ``ghost_var + e`` in normalized units.

    Args:
        m_hat: per-(sample, channel) means ``(B, C)`` of the normalized features.
        v_hat: per-(sample, channel) biased variances ``(B, C)`` of the normalized features.
        n_draw: ``N'``, see :func:`draw_size` (``inf``: no noise).
        eps: ``e`` above, a number or ``(C,)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = torch.randn(4096, 8, generator=g, dtype=torch.float64)   # one value per sample
        >>> p = predicted_noise(m, torch.zeros_like(m), 16)
        >>> [round(float(v)) for v in (p.n_eff_shift.mean(), p.n_eff_scale.mean())]
        [16, 16]
    """
    with torch.no_grad():
        m = m_hat.double()
        c = m - m.mean(0)
        s11 = c.square().mean(0)
        m2 = v_hat.double() + c.square()  # second moments about the batch mean
        t = m2.mean(0)  # the batch variance of the normalized features
        s22 = (m2 - t).square().mean(0)
        cov = ((m2 - t) * (c.square() - s11)).mean(0)
        k4 = c.pow(4).mean(0) - 3 * s11.square()
        e = torch.as_tensor(eps, dtype=torch.float64, device=m.device)
        tiny = torch.finfo(torch.float64).tiny
        if math.isinf(n_draw):
            zero = torch.zeros_like(t)
            return NoisePrediction(s11 / t.clamp_min(tiny), zero, torch.ones_like(t), zero)
        n = float(n_draw)
        ghost_var = s22 / n - 2 * cov / n**2 + 2 * s11.square() / n**2 + k4 / n**3
        return NoisePrediction(
            rho=s11 / t.clamp_min(tiny),
            shift_var=s11 / n / t.clamp_min(tiny),
            scale2_mean=(t - s11 / n + e) / (t + e),
            scale2_var=ghost_var.clamp_min(0) / (t + e).square(),
        )


# --------------------------------------------------------------------------- laws
def normal_cdf(x: Tensor) -> Tensor:
    """The standard normal CDF (``torch.special.ndtr``)."""
    return torch.special.ndtr(x)


def shift_cdf(x: Tensor, n: Number) -> Tensor:
    """CDF of the shift's law ``Normal(0, 1 / n)`` at ``x`` (``n`` a number or broadcastable tensor)."""
    return torch.special.ndtr(x * torch.sqrt(torch.as_tensor(n, dtype=x.dtype, device=x.device)))


def chi2_scale_cdf(scale: Tensor, n: Number, mean: Optional[Number] = None) -> Tensor:
    """CDF of the scale's law at ``scale``: ``scale**2 ~ mean / (n - 1) * chi2(n - 1)``.

    With the default ``mean = (n - 1) / n`` this is the law ``scale**2 ~ chi2(n - 1) / n``; a ``mean``
    gives the moment-matched law at ``N_eff`` (see :class:`NoisePrediction`). ``n > 1``; any real ``n``.

    Example:
        >>> float(chi2_scale_cdf(torch.tensor([1e6]), 16))
        1.0
    """
    n_t = torch.as_tensor(n, dtype=scale.dtype, device=scale.device)
    k = n_t - 1
    mean_t = k / n_t if mean is None else torch.as_tensor(mean, dtype=scale.dtype, device=scale.device)
    return torch.special.gammainc(k / 2, k * scale.square() / (2 * mean_t))


def law_moments(n: Number, scale2_mean: Optional[Number] = None) -> Dict[str, Tensor]:
    """Moments of the law at ``n``: std of the shift; mean and std of the scale and of ``log(scale)``.

    ``scale**2 ~ mean / d * chi2(d)`` with ``d = n - 1`` and ``mean = (n - 1) / n`` unless given, so
    ``log(scale)`` has mean ``(digamma(d / 2) + log(2 mean / d)) / 2`` and std ``sqrt(trigamma(d / 2)) / 2``,
    and ``E[scale] = sqrt(2 mean / d) Gamma((d + 1) / 2) / Gamma(d / 2)``.

    Example:
        >>> {k: round(float(v), 3) for k, v in law_moments(16).items()}
        {'shift_std': 0.25, 'scale_mean': 0.952, 'scale_std': 0.175, 'log_scale_mean': -0.066, 'log_scale_std': 0.189}
    """
    n_t = torch.as_tensor(n, dtype=torch.float64)
    d = n_t - 1
    mean = d / n_t if scale2_mean is None else torch.as_tensor(scale2_mean, dtype=torch.float64)
    a = torch.sqrt(2 * mean / d)
    scale_mean = a * torch.exp(torch.lgamma((d + 1) / 2) - torch.lgamma(d / 2))
    return {
        "shift_std": torch.rsqrt(n_t),
        "scale_mean": scale_mean,
        "scale_std": torch.sqrt((mean - scale_mean.square()).clamp_min(0)),
        "log_scale_mean": (torch.special.digamma(d / 2) + torch.log(2 * mean / d)) / 2,
        "log_scale_std": torch.sqrt(torch.special.polygamma(1, d / 2)) / 2,
    }


# --------------------------------------------------------------------------- Kolmogorov-Smirnov
def kolmogorov_sf(x: Tensor) -> Tensor:
    """The Kolmogorov distribution's survival function ``P(K > x)`` (float64).

    ``2 sum_k (-1)**(k-1) exp(-2 k**2 x**2)`` for ``x >= 1``; for smaller ``x`` the series converges
    slowly and the equivalent ``1 - sqrt(2 pi) / x sum_k exp(-(2k - 1)**2 pi**2 / (8 x**2))`` is used.

    Example:
        >>> round(float(kolmogorov_sf(torch.tensor(1.36))), 3)
        0.049
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    k = torch.arange(1, 101, dtype=torch.float64)
    xs = x.unsqueeze(-1)
    large = 2 * ((-1.0) ** (k - 1) * torch.exp(-2 * k.square() * xs.square())).sum(-1)
    safe = xs.clamp_min(1e-3)
    small = 1 - math.sqrt(2 * math.pi) / safe.squeeze(-1) * torch.exp(
        -((2 * k - 1) ** 2) * math.pi**2 / (8 * safe.square())
    ).sum(-1)
    out = torch.where(x >= 1, large, small)
    return torch.where(x <= 0, torch.ones_like(out), out).clamp(0, 1)


def ks_uniform(u: Tensor, correction: bool = True) -> Tuple[float, float]:
    """Two-sided one-sample KS test of values ``u`` (CDF values, i.e. probability integral transforms)
    against ``Uniform(0, 1)``: ``(statistic D, p-value)``. ``(nan, nan)`` for no values.

    The p-value is the asymptotic Kolmogorov distribution's ``P(K > lambda)`` with Stephens' (1970)
    finite-sample correction ``lambda = (sqrt(n) + 0.12 + 0.11 / sqrt(n)) D``: against scipy's exact
    p-values (``scipy.stats.kstwo``) it is off by less than 1e-4 where ``p <= 0.05`` (``n >= 20``) and
    by less than 0.01 elsewhere for ``n >= 100``. ``correction=False`` gives the plain asymptotic
    ``P(K > sqrt(n) D)`` (scipy's ``method="asymp"``), which overstates p by up to 0.02 at ``n = 300``.

    Example:
        >>> d, p = ks_uniform(torch.rand(1000, generator=torch.Generator().manual_seed(0)))
        >>> bool(d < 0.05 and p > 0.05)
        True
    """
    u = u.detach().reshape(-1).double()
    u = u[~torch.isnan(u)]
    n = u.numel()
    if n == 0:
        return math.nan, math.nan
    u, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=u.device)
    d_plus = (i / n - u).max()
    d_minus = (u - (i - 1) / n).max()
    d = float(torch.maximum(d_plus, d_minus))
    root = math.sqrt(n)
    lam = d * (root + 0.12 + 0.11 / root) if correction else d * root
    return d, float(kolmogorov_sf(torch.tensor(lam, dtype=torch.float64)))


def ks_test(values: Tensor, cdf: Callable[[Tensor], Tensor], correction: bool = True) -> Tuple[float, float]:
    """Two-sided one-sample KS test of ``values`` against the law with CDF ``cdf``: ``(statistic, p-value)``
    (see :func:`ks_uniform`).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> d, p = ks_test(torch.randn(2000, generator=g, dtype=torch.float64) / 4, lambda x: shift_cdf(x, 16))
        >>> bool(p > 0.01)
        True
    """
    return ks_uniform(cdf(values.detach().reshape(-1).double()), correction)
