"""Ghost noise itself: GNI's shift and scale, the analytic law, and the one fold of the noise into an affine.

Example:
    >>> import torch
    >>> x = torch.randn(32, 8, 4, 4)
    >>> x_hat = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> idx = ghost_indices(32, 16, generator=torch.Generator().manual_seed(0))
    >>> shift, scale = ghost_noise(*per_sample_moments(x_hat), idx)
    >>> apply_noise(x_hat, shift, scale, strength=1.0).shape
    torch.Size([32, 8, 4, 4])
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_ghostnoise.functional._common import StrengthLike, autocast_off
from lightning_ghostnoise.functional.affine import sample_affine, with_affine
from lightning_ghostnoise.functional.moments import per_sample_moments
from lightning_ghostnoise.functional.sampling import (
    analytic_draws,
    ghost_counts,
    ghost_indices,  # noqa: F401  (the docstring examples)
)

__all__ = [
    "NOISE_EPS",
    "GhostDraws",
    "MomentFreeNoise",
    "analytic_noise",
    "analytic_noise_from_draws",
    "apply_noise",
    "ghost_noise",
    "gni_normalized",
    "noise_fold",
]

NoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


#: The paper's epsilon inside the noise scale ``sqrt((ghost_var + eps) / (batch_var + eps))``.
NOISE_EPS = 1e-3


def ghost_noise(
    mean: Tensor,
    var: Tensor,
    indices: Tensor,
    eps: float = NOISE_EPS,
    batch: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """GNI's per-(sample, channel) shift and scale from the per-sample moments of normalized features.

    For sample ``b`` the ghost moments are the means of the first and second moments of the rows
    ``indices[b]``; then ``shift = ghost_mean - batch_mean`` and
    ``scale = sqrt((ghost_var + eps) / (batch_var + eps))``. Carries no gradient.

    Non-finite samples: when ``batch`` is not given (LayerNorm, GroupNorm), a sample's moments that
    are NaN or infinite in a channel are left out of that channel's batch and ghost statistics (a
    ghost batch averages its finite members; one with none gets no noise there: shift 0, scale 1),
    so one bad sample cannot make every other sample's noise non-finite. The bad sample's own output
    stays non-finite, as in the plain layer. This costs a few small ``(P, C)`` operations and no
    host-device synchronization. When ``batch`` is given (BatchNorm) the batch statistics already
    include every sample, as in plain BatchNorm, where one non-finite sample makes that channel
    non-finite for the whole batch.

    Args:
        mean: per-sample means ``(P, C)`` of the pool of ``P`` samples (see :func:`per_sample_moments`).
        var: per-sample biased variances ``(P, C)``.
        indices: ``(B, N)`` indices into the pool (see :func:`ghost_indices`).
        eps: the noise epsilon (the paper's 1e-3).
        batch: the pool's mean and biased variance per channel ``(C,)``, when the caller knows them
            (BatchNorm: in closed form from its batch statistics); by default computed from ``mean``
            and ``var`` (over the finite moments).

    Returns:
        ``(shift, scale)``, each ``(B, C)`` float32.

    Example:
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> shift, scale = ghost_noise(torch.randn(8, 3), torch.rand(8, 3), idx)
        >>> shift.shape, bool((scale > 0).all())
        (torch.Size([8, 3]), True)
    """
    with torch.no_grad(), autocast_off(mean):
        mean, var = mean.float(), var.float()
        pool, n = mean.shape[0], indices.shape[1]
        channels = mean.shape[1]
        m2 = torch.addcmul(var, mean, mean)  # per-sample second moments
        weight: Tensor | None = None  # (P, C): 1 where both moments are finite, when they are masked
        if batch is None:
            finite = torch.isfinite(mean) & torch.isfinite(m2)
            weight = finite.float()
            mean, m2 = mean.where(finite, 0.0), m2.where(finite, 0.0)
            kept = weight.sum(0).clamp_min(1.0)
            batch_m1, batch_m2 = mean.sum(0) / kept, m2.sum(0) / kept
            batch_var = torch.addcmul(batch_m2, batch_m1, batch_m1, value=-1).clamp_min_(0)
        else:
            batch_m1, batch_var = batch[0].float(), batch[1].float()
        if torch.compiler.is_compiling() and n <= pool:
            # gathers reduced over the N members with the noise math as their epilogue: inductor
            # makes it one kernel (one gather of stacked moments, as in eager below, is materialized)
            sum_m1, sum_m2 = mean[indices].sum(1), m2[indices].sum(1)
            members = weight[indices].sum(1) if weight is not None else None
        else:
            parts = [mean, m2] if weight is None else [mean, m2, weight]
            moments = torch.cat(parts, 1)  # (P, 2C or 3C): first and second moments (and weights)
            if n <= pool and moments.device.type != "cpu":
                sums = moments[indices].sum(1)  # gather the N rows and add them up: few kernels on CUDA
            else:
                # count repeats instead of materializing (B, N, 2C): N > P, and CPU, where the gather
                # took 1.6-12x as long (37 us against 25 at B=128, C=16, N=16; 16.4 ms against 1.3
                # at B=256, C=512, N=32)
                sums = ghost_counts(indices, pool) @ moments
            sum_m1, sum_m2 = sums[:, :channels], sums[:, channels : 2 * channels]
            members = sums[:, 2 * channels :] if weight is not None else None
        if members is None:
            ghost_m1, ghost_m2 = sum_m1 / n, sum_m2 / n
        else:
            # mean over the finite members; a ghost batch without one takes the batch moments (no noise)
            some = members > 0
            count = members.clamp_min(1.0)
            ghost_m1 = torch.where(some, sum_m1 / count, batch_m1)
            ghost_m2 = torch.where(some, sum_m2 / count, batch_m2)
        ghost_var = torch.addcmul(ghost_m2, ghost_m1, ghost_m1, value=-1).clamp_min_(0)
        shift = ghost_m1 - batch_m1
        scale = ((ghost_var + eps) / (batch_var + eps)).sqrt()
    return shift, scale


class GhostDraws:
    """A ``noise_fn`` whose random draws are made before the moments are known.

    Either the ghost ``indices`` ``(B, N)`` of GNI (:func:`ghost_indices`), or the ``normal`` and
    ``gamma`` draws of analytic GNI (:func:`analytic_draws`) with its ``ghost_batch_size``. Calling it
    gives the ``(shift, scale)`` noise (:func:`ghost_noise` or :func:`analytic_noise_from_draws`), like
    any ``noise_fn``; because the draws are plain tensors, the fused CUDA path
    (:mod:`lightning_ghostnoise.backends.triton`) computes the noise inside its own kernel.

    Example:
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> shift, scale = GhostDraws(indices=idx)(torch.zeros(8, 3), torch.ones(8, 3))
        >>> shift.shape
        torch.Size([8, 3])
    """

    def __init__(
        self,
        indices: Tensor | None = None,
        eps: float = NOISE_EPS,
        normal: Tensor | None = None,
        gamma: Tensor | None = None,
        ghost_batch_size: int | None = None,
    ) -> None:
        analytic = normal is not None and gamma is not None and ghost_batch_size is not None
        if (indices is None) == (not analytic):
            raise ValueError(
                "GhostDraws takes either indices (GNI) or normal, gamma and ghost_batch_size (analytic GNI)."
            )
        self.indices, self.eps = indices, eps
        #: GNI reads the moments; analytic GNI's noise does not (see :class:`MomentFreeNoise`)
        self.uses_moments = indices is not None
        self.normal, self.gamma, self.ghost_batch_size = normal, gamma, ghost_batch_size

    def __call__(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        return self.noise(mean, var)

    def noise(self, mean: Tensor, var: Tensor, batch: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The ``(shift, scale)`` noise; ``batch``: the pool's moments per channel, if known (see
        :func:`ghost_noise`)."""
        if self.indices is not None:
            return ghost_noise(mean, var, self.indices, self.eps, batch=batch)
        assert self.normal is not None and self.gamma is not None and self.ghost_batch_size is not None
        return analytic_noise_from_draws(self.normal, self.gamma, self.ghost_batch_size)


class MomentFreeNoise:
    """A ``noise_fn`` that reads only the shape and device of the moments it is given, e.g. analytic
    GNI, whose noise does not depend on the data: :func:`normalized_noise` then skips computing the
    per-sample moments (three full-size passes) and passes zeros of their shape.

    Example:
        >>> normal, gamma = analytic_draws(4, 3, 2, generator=torch.Generator().manual_seed(0))
        >>> noise = MomentFreeNoise(lambda m, v: analytic_noise_from_draws(normal, gamma, 2))
        >>> noise.uses_moments, noise(torch.zeros(4, 3), torch.zeros(4, 3))[0].shape
        (False, torch.Size([4, 3]))
    """

    uses_moments = False

    def __init__(self, fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        self.fn = fn

    def __call__(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        return self.fn(mean, var)


def noise_moments(noise_fn: Callable[..., Any], x_hat: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """The per-sample moments of ``x_hat`` for ``noise_fn``; zeros of their shape if it does not read them."""
    if getattr(noise_fn, "uses_moments", True):
        return per_sample_moments(x_hat, channel_dim)
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(x_hat.shape[0], x_hat.shape[channel_dim], device=x_hat.device, dtype=acc)
    return zeros, zeros


def analytic_noise_from_draws(normal: Tensor, gamma: Tensor, ghost_batch_size: int) -> tuple[Tensor, Tensor]:
    """``shift = normal / sqrt(N)`` and ``scale = sqrt(2 gamma / N)`` (``chi2(k) = 2 Gamma(k / 2, 1)``)."""
    n = ghost_batch_size
    return normal / math.sqrt(n), torch.sqrt((2.0 * gamma) / n)


def analytic_noise(
    batch_size: int,
    num_channels: int,
    ghost_batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The paper's "noisy affine transform": ghost noise drawn from its law, without data sampling.

    ``shift ~ Normal(0, 1) / sqrt(N)`` and ``scale = sqrt(chi2(N - 1) / N)``, i.e. GNI's law for one
    value per sample. The scale needs ``N >= 2``: ``chi2(0)`` is zero, so ``N = 1`` returns a zero
    scale, usable only for shift-only noise. The draws are :func:`analytic_draws`.

    Returns:
        ``(shift, scale)``, each ``(batch_size, num_channels)`` float32.

    Example:
        >>> s, k = analytic_noise(4, 3, 16, generator=torch.Generator().manual_seed(0))
        >>> s.shape, bool((k > 0).all())
        (torch.Size([4, 3]), True)
    """
    normal, gamma = analytic_draws(batch_size, num_channels, ghost_batch_size, generator, device, key)
    return analytic_noise_from_draws(normal, gamma, ghost_batch_size)


def apply_noise(
    x_hat: Tensor,
    shift: Tensor,
    scale: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    strength: StrengthLike = 1.0,
    channel_dim: int = 1,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> Tensor:
    """``y = weight * (x_hat - s * shift) / scale**s + bias``, folded into one per-(sample, channel) affine.

    Args:
        x_hat: normalized features (no affine applied yet).
        shift: ``(B, C)`` shift noise (no gradient).
        scale: ``(B, C)`` scale noise (no gradient), positive.
        weight: per-channel gamma (or ``None``).
        bias: per-channel beta (or ``None``).
        strength: ``s``; a float or a 0-dim tensor (a tensor avoids recompilation when it changes).
        channel_dim: the channel dimension of ``x_hat``.
        shift_noise: apply the shift part.
        scale_noise: apply the scale part.

    Returns:
        Tensor like ``x_hat`` (same dtype and memory format).
    """
    inv, off = noise_fold(shift, scale, strength, shift_noise, scale_noise)
    return sample_affine(x_hat, *with_affine(inv, off.neg() if shift_noise else off, weight, bias), channel_dim)


def noise_fold(
    shift: Tensor, scale: Tensor, strength: StrengthLike = 1.0, shift_noise: bool = True, scale_noise: bool = True
) -> tuple[Tensor, Tensor]:
    """The noise as an affine of the normalized features: ``x_hat * inv - off``.

    ``inv = scale**-s`` (ones without ``scale_noise``) and ``off = (s * shift) * inv`` (zeros without
    ``shift_noise``), so that ``(x_hat - s * shift) / scale**s = x_hat * inv - off``. Every path folds
    the noise through this function (the Triton kernels with the same operations in float32).

    Example:
        >>> inv, off = noise_fold(torch.zeros(2, 3), torch.full((2, 3), 2.0), strength=1.0)
        >>> inv[0, 0].item(), off.abs().max().item()
        (0.5, 0.0)
    """
    s = strength if isinstance(strength, Tensor) else torch.tensor(float(strength), dtype=torch.float32)
    s = s.to(device=shift.device, dtype=torch.float32)
    inv = torch.pow(scale, -s) if scale_noise else torch.ones_like(scale)
    off = (s * shift) * inv if shift_noise else torch.zeros_like(shift)
    return inv, off


def gni_normalized(
    x: Tensor,
    normalize: Callable[[Tensor], Tensor],
    noise_fn: NoiseFn,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    strength: StrengthLike = 1.0,
    channel_dim: int = 1,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> Tensor:
    """GNI after a per-sample normalization, in plain autograd: ``x_hat = normalize(x)``, then
    ``apply_noise(x_hat, *noise_fn(moments of x_hat), ...)`` (LayerNorm, GroupNorm without their affine).

    The reference of :func:`lightning_ghostnoise.backends.normalized_noise`, which computes the same
    forward keeping less memory for the backward.

    Example:
        >>> x = torch.randn(8, 5, 6)
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> ln = lambda t: torch.nn.functional.layer_norm(t, (6,))
        >>> gni_normalized(x, ln, GhostDraws(indices=idx), channel_dim=-1).shape
        torch.Size([8, 5, 6])
    """
    x_hat = normalize(x)
    shift, scale = noise_fn(*noise_moments(noise_fn, x_hat.detach(), channel_dim))
    return apply_noise(x_hat, shift, scale, weight, bias, strength, channel_dim, shift_noise, scale_noise)
