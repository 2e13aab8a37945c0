"""The BatchNorm family's statistics: ghost batches, their averages, and each method's coefficients.

Every method is a per-(sample, channel) affine ``y = x * A + D`` of the input whose coefficients come
from the per-sample moments (:func:`lightning_ghostnoise.functional.affine.moment_affine`):
:func:`noise_coefficients` for GNI (BatchNorm, then noise, then the affine) and
:func:`ghost_statistics_coefficients` for GBN and XBN (each sample normalized by its ghost batch's
statistics). :func:`gni_batch_norm` and :func:`ghost_statistics_batch_norm` are the plain-autograd
references of the fused layers in :mod:`lightning_ghostnoise.backends`.

Example:
    >>> import torch
    >>> y = ghost_statistics_batch_norm(torch.randn(10, 3, 4, 4), 4, exclusive=False)
    >>> y.shape
    torch.Size([10, 3, 4, 4])
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from lightning_ghostnoise.functional._common import (
    StrengthLike,
    as_strength,
    autocast_off,
    spatial_count,
)
from lightning_ghostnoise.functional.affine import moment_affine, with_affine
from lightning_ghostnoise.functional.moments import batch_moments
from lightning_ghostnoise.functional.noise import noise_fold
from lightning_ghostnoise.functional.running_stats import (
    update_ghost_running_stats,
    update_running_stats,
)

__all__ = [
    "effective_statistics",
    "ghost_averaging_matrix",
    "ghost_groups",
    "ghost_statistics_batch_norm",
    "ghost_statistics_coefficients",
    "gni_batch_norm",
    "gni_coeff_fn",
    "noise_coefficients",
]

NoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
StatsFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int]]


def ghost_groups(
    batch_size: int, ghost_batch_size: int, device: torch.device | str | None = None
) -> tuple[Tensor, int]:
    """Assign consecutive samples to ghost batches; the remainder rule of GBN and XBN.

    Samples ``0..N-1`` form ghost batch 0, ``N..2N-1`` ghost batch 1, and so on. The ``r = B mod N``
    trailing samples are merged into the last full ghost batch (which then has ``N + r`` members), so
    no ghost batch is ever smaller than ``N``; a batch smaller than ``N`` is one ghost batch.

    Returns:
        ``(group, num_groups)``: a long tensor ``(B,)`` of ghost batch ids and their count.

    Example:
        >>> ghost_groups(7, 3)
        (tensor([0, 0, 0, 1, 1, 1, 1]), 2)
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    num_groups = max(batch_size // ghost_batch_size, 1)
    group = torch.arange(batch_size, device=device) // ghost_batch_size
    return group.clamp_max_(num_groups - 1), num_groups


def ghost_averaging_matrix(
    batch_size: int,
    ghost_batch_size: int,
    exclusive: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``M`` (``B x B``) with ``(M @ values)[b]`` = the mean of ``values`` over sample ``b``'s ghost batch.

    Ghost batches follow :func:`ghost_groups`. With ``exclusive`` the mean is over the *other* members
    (XBN's leave-one-out); a ghost batch of one sample then keeps the sample's own value.

    Example:
        >>> ghost_averaging_matrix(4, 2)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    group, _ = ghost_groups(batch_size, ghost_batch_size, device=device)
    same = (group.unsqueeze(0) == group.unsqueeze(1)).to(dtype)
    size = same.sum(1, keepdim=True)
    if not exclusive:
        return same / size
    eye = torch.eye(batch_size, device=device, dtype=dtype)
    others = same - eye
    return torch.where(size > 1, others / (size - 1).clamp_min(1), eye)


_MATRIX_CACHE_MAX_BATCH = 1024  # cache ghost averaging matrices up to 4 MiB (float32)


@functools.lru_cache(maxsize=16)
def cached_ghost_matrix(
    batch: int, ghost_batch_size: int, exclusive: bool, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """:func:`ghost_averaging_matrix`, built once per arguments (read-only: it is shared).

    At most 16 matrices of at most ``1024 x 1024`` (4 MiB in float32) are kept, on the devices they
    were asked for; :func:`lightning_ghostnoise.config.clear_caches` frees them."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, also if first asked for in inference mode
        return ghost_averaging_matrix(batch, ghost_batch_size, exclusive, device, dtype)


def ghost_matrix(batch: int, ghost_batch_size: int, exclusive: bool, like: Tensor) -> Tensor | None:
    """The ghost averaging matrix for :func:`ghost_average`, or ``None`` where a reshape does its work
    (GBN under ``torch.compile`` with equal ghost batches). Eager mode takes the matrix from a bounded
    cache (:func:`cached_ghost_matrix`); why each form is used where: docs/performance.md."""
    n = ghost_batch_size
    compiling = torch.compiler.is_compiling()
    if compiling and batch % n == 0 and not exclusive:
        return None
    build = ghost_averaging_matrix if compiling or batch > _MATRIX_CACHE_MAX_BATCH else cached_ghost_matrix
    return build(batch, n, exclusive, like.device, like.dtype)


def ghost_average(
    first: Tensor, second: Tensor, avg: Tensor | None, ghost_batch_size: int, exclusive: bool
) -> tuple[Tensor, Tensor]:
    """``(avg @ first, avg @ second)`` for ``(B, C)`` values: per sample the means over its ghost batch
    (``exclusive``: over the others in it). ``avg`` is symmetric, so these are also its transpose's
    products (the backward's). ``avg=None`` (GBN, equal ghost batches, see :func:`ghost_matrix`): as
    a reshape, each row separately, which inductor reduces in one kernel."""
    channels = first.shape[1]
    if avg is not None:
        with autocast_off(avg):
            both = avg @ torch.cat([first, second], 1)  # one product
        return both[:, :channels], both[:, channels:]
    if exclusive:
        raise ValueError("XBN's leave-one-out average takes the matrix (see _ghost_matrix).")
    batch, n = first.shape[0], ghost_batch_size

    def average(values: Tensor) -> Tensor:
        means = values.reshape(batch // n, n, channels).mean(1, keepdim=True)
        return means.expand(batch // n, n, channels).reshape(batch, channels)

    return average(first), average(second)


def group_statistics(mean: Tensor, var: Tensor, ghost_batch_size: int, exclusive: bool) -> tuple[Tensor, Tensor]:
    """Per-sample ghost mean and biased variance: of its ghost batch, or (``exclusive``) of the others in it."""
    batch, _channels = mean.shape
    centre = mean.detach().mean(0)  # shift for a numerically stable variance
    c = mean - centre
    avg = ghost_matrix(batch, ghost_batch_size, exclusive, mean)
    g_mean, g_second = ghost_average(c, var + c * c, avg, ghost_batch_size, exclusive)
    return g_mean + centre, (g_second - g_mean * g_mean).clamp_min(0)


def noise_coefficients(
    mean: Tensor,
    var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    noise_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(A, D)`` of GNI on BatchNorm: ``y = x * A + D = w * ((x - mu) * rstd - s * shift) / scale**s + b``.

    ``noise_fn(m_hat, v_hat)`` receives the per-sample moments of the normalized features (no
    gradient) and returns ``(shift, scale)`` (e.g. :func:`ghost_noise` over drawn indices, or
    :func:`analytic_noise`). Gradients flow through the batch statistics and the affine only.
    """
    rstd = torch.rsqrt(batch_var + eps)
    with torch.no_grad():
        r = rstd.detach()
        shift, scale = noise_fn((mean.detach() - batch_mean.detach()) * r, var.detach() * r * r)
        inv, offset = noise_fold(shift, scale, strength, shift_noise, scale_noise)
    a = rstd * inv.to(rstd.dtype)
    d = -batch_mean * a - offset.to(rstd.dtype)
    return with_affine(a, d, weight, bias)


def ghost_statistics_coefficients(
    mean: Tensor,
    var: Tensor,
    ghost_mean: Tensor,
    ghost_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(A, D)`` normalizing each sample by statistics between the batch's (``s = 0``) and its ghost's (``s = 1``).

    With ``shift = ghost_mean - batch_mean`` and ``ratio = std_ghost / std_batch`` the sample is
    normalized by ``batch_mean + s * shift`` and ``std_batch * ratio**s``: at ``s = 1`` exactly by its
    ghost statistics (GBN, XBN). All arguments may carry gradients.
    """
    del mean, var
    std_b = torch.sqrt(batch_var + eps)
    s = as_strength(strength, ghost_mean)
    mean_eff = batch_mean + s * (ghost_mean - batch_mean) if shift_noise else batch_mean.expand_as(ghost_mean)
    std_eff = std_b * torch.pow(torch.sqrt(ghost_var + eps) / std_b, s) if scale_noise else std_b.expand_as(ghost_var)
    a = 1.0 / std_eff
    return with_affine(a, -mean_eff * a, weight, bias)


def effective_statistics(
    gm: Tensor,
    ge2: Tensor,
    bm: Tensor,
    bvar_raw: Tensor,
    centre: Tensor,
    s: Tensor,
    w: Tensor | None,
    eps: float,
    shift_noise: bool,
    scale_noise: bool,
) -> tuple[Tensor, ...]:
    """GBN's and XBN's effective statistics in closed form (no autograd), as the fused layers compute them.

    From the ghost means ``gm`` of ``c = mean - centre`` and ``ge2`` of ``e2 = var + c**2`` ``(B, C)``
    and the batch's ``bm``, ``bvar_raw`` ``(C,)``: ``mean_eff = lerp(bm, gm, s)``,
    ``std_eff = std_b * (std_g / std_b)**s``, ``A = w / std_eff``.

    Returns:
        ``(gvar_raw, A, std_eff, std_b, std_g, mean_eff + centre)``.

    Example:
        >>> gm, ge2 = torch.zeros(4, 3), torch.ones(4, 3)
        >>> out = effective_statistics(gm, ge2, torch.zeros(3), torch.ones(3), torch.zeros(3), torch.tensor(1.0), None, 1e-5, True, True)
        >>> out[1].shape
        torch.Size([4, 3])
    """
    gvar_raw = torch.addcmul(ge2, gm, gm, value=-1)
    std_b = bvar_raw.clamp_min(0).add_(eps).sqrt_()
    std_g = gvar_raw.clamp_min(0).add_(eps).sqrt_()
    mean_eff = torch.lerp(bm.expand_as(gm), gm, s) if shift_noise else bm.expand_as(gm)
    std_eff = std_b * (std_g / std_b).pow_(s) if scale_noise else std_b.expand_as(gm)
    a = std_eff.reciprocal() if w is None else w / std_eff
    return gvar_raw, a, std_eff, std_b, std_g, mean_eff + centre


def gni_coeff_fn(
    x: Tensor,
    noise_fn: NoiseFn,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    strength: StrengthLike,
    shift_noise: bool,
    scale_noise: bool,
    channel_dim: int,
    stats_fn: StatsFn | None = None,
) -> Callable[..., tuple[Tensor, Tensor]]:
    """GNI's ``coeff_fn(mean, var, weight, bias) -> (A, D)`` for :func:`moment_affine`: batch statistics
    (this batch's, or ``stats_fn``'s), the running statistics' update, then :func:`noise_coefficients`.

    Example:
        >>> fn = gni_coeff_fn(torch.zeros(4, 2, 3), lambda m, v: (m * 0, v * 0 + 1), None, None, 0.1, 1e-5, 1.0, True, True, 1)
        >>> [t.shape for t in fn(torch.randn(4, 2), torch.rand(4, 2), None, None)]
        [torch.Size([4, 2]), torch.Size([4, 2])]
    """
    local_count = x.numel() // max(x.shape[channel_dim], 1)

    def coeffs(mean: Tensor, var: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
        if stats_fn is None:
            batch_mean, batch_var = batch_moments(mean, var)
            count = local_count
        else:
            batch_mean, batch_var, count = stats_fn(mean, var)
        update_running_stats(running_mean, running_var, batch_mean.detach(), batch_var.detach(), count, momentum)
        return noise_coefficients(
            mean, var, batch_mean, batch_var, noise_fn, w, b, eps, strength, shift_noise, scale_noise
        )

    return coeffs


def gni_batch_norm(
    x: Tensor,
    noise_fn: NoiseFn,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
    stats_fn: StatsFn | None = None,
) -> Tensor:
    """GNI on BatchNorm in plain autograd: :func:`noise_coefficients` applied by :func:`moment_affine`.

    The reference of :func:`lightning_ghostnoise.backends.ghost_noise_batch_norm` (same arguments but
    ``fused``). ``stats_fn``: ``(mean, var) -> (batch_mean, batch_var, count)``, e.g. the global batch's
    moments with ``sync=True``; by default this batch's (:func:`batch_moments`).

    Example:
        >>> from lightning_ghostnoise.functional.noise import GhostDraws
        >>> from lightning_ghostnoise.functional.sampling import ghost_indices
        >>> idx = ghost_indices(16, 8, generator=torch.Generator().manual_seed(0))
        >>> gni_batch_norm(torch.randn(16, 3, 4, 4), GhostDraws(indices=idx)).shape
        torch.Size([16, 3, 4, 4])
    """
    coeffs = gni_coeff_fn(
        x, noise_fn, running_mean, running_var, momentum, eps, strength, shift_noise, scale_noise, channel_dim, stats_fn
    )
    return moment_affine(x, coeffs, (weight, bias), channel_dim)


def ghost_statistics_batch_norm(
    x: Tensor,
    ghost_batch_size: int,
    exclusive: bool,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
    ghost_running: bool = False,
) -> Tensor:
    """GBN (``exclusive=False``) and XBN in plain autograd: :func:`ghost_statistics_coefficients`.

    The reference of :func:`lightning_ghostnoise.backends.ghost_batch_norm` and
    :func:`~lightning_ghostnoise.backends.exclusive_batch_norm`. ``ghost_running``: the running
    statistics from the ghost batches (:func:`~lightning_ghostnoise.functional.running_stats.ghost_running_targets`), else from the full batch.

    Example:
        >>> ghost_statistics_batch_norm(torch.randn(8, 3, 4, 4), 4, exclusive=True).shape
        torch.Size([8, 3, 4, 4])
    """
    count = x.numel() // max(x.shape[channel_dim], 1)
    spatial = spatial_count(x, channel_dim)

    def coeffs(mean: Tensor, var: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
        batch_mean, batch_var = batch_moments(mean, var)
        if ghost_running:
            update_ghost_running_stats(running_mean, running_var, mean, var, ghost_batch_size, spatial, momentum)
        else:
            update_running_stats(running_mean, running_var, batch_mean.detach(), batch_var.detach(), count, momentum)
        g_mean, g_var = group_statistics(mean, var, ghost_batch_size, exclusive)
        return ghost_statistics_coefficients(
            mean, var, g_mean, g_var, batch_mean, batch_var, w, b, eps, strength, shift_noise, scale_noise
        )

    with autocast_off(x):
        return moment_affine(x, coeffs, (weight, bias), channel_dim)
