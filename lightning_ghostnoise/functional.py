"""Pure tensor math of ghost noise: no module state, no Lightning.

Every formula of the methods lives here once; the layers in :mod:`lightning_ghostnoise.layers` only
choose which function to call and keep the norm layer's parameters and buffers.

Notation: ``x`` has a batch dimension 0 and a channel dimension (``channel_dim``, 1 for BatchNorm and
GroupNorm, -1 for LayerNorm over the last dimension); every other dimension is "spatial" (pixels,
time steps, tokens). Per-sample moments are taken over the spatial dimensions, in float32.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import functional as GF
    >>> x = torch.randn(32, 8, 4, 4)
    >>> x_hat = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> g = torch.Generator().manual_seed(0)
    >>> idx = GF.ghost_indices(32, 16, generator=g)
    >>> shift, scale = GF.ghost_noise(*GF.per_sample_moments(x_hat), idx)
    >>> y = GF.apply_noise(x_hat, shift, scale, strength=1.0)
    >>> y.shape
    torch.Size([32, 8, 4, 4])
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_ghostnoise import counter_rng, kernels, ops

__all__ = [
    "NOISE_EPS",
    "analytic_draws",
    "analytic_noise",
    "analytic_noise_from_draws",
    "apply_noise",
    "broadcast_channels",
    "exclusive_batch_norm",
    "batch_moments",
    "GhostDraws",
    "MomentFreeNoise",
    "NativeGroupNorm",
    "NativeLayerNorm",
    "NativeNorm",
    "ghost_averaging_matrix",
    "ghost_batch_norm",
    "ghost_groups",
    "ghost_noise_batch_norm",
    "ghost_running_targets",
    "ghost_statistics_coefficients",
    "moment_affine",
    "noise_coefficients",
    "normalized_noise",
    "ghost_indices",
    "ghost_noise",
    "per_sample_moments",
    "RUNNING_STATS",
    "resolve_running_stats",
    "sample_affine",
    "update_ghost_running_stats",
    "update_running_stats",
]

#: The paper's epsilon inside the noise scale ``sqrt((ghost_var + eps) / (batch_var + eps))``.
NOISE_EPS = 1e-3

StrengthLike = Union[float, Tensor]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled while it is on: the small statistics math (matrix products included) stays in float32."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


def _spatial_dims(x: Tensor, channel_dim: int) -> Tuple[int, ...]:
    channel_dim = channel_dim % x.dim()
    return tuple(d for d in range(1, x.dim()) if d != channel_dim)


def broadcast_channels(values: Tensor, x: Tensor, channel_dim: int = 1) -> Tensor:
    """View a per-(sample, channel) tensor ``(B, C)`` so that it broadcasts against ``x``.

    Example:
        >>> x = torch.zeros(2, 3, 5, 5)
        >>> broadcast_channels(torch.ones(2, 3), x).shape
        torch.Size([2, 3, 1, 1])
    """
    channel_dim = channel_dim % x.dim()
    shape = [1] * x.dim()
    shape[0] = values.shape[0]
    shape[channel_dim] = values.shape[1]
    return values.view(shape)


def _coefficients_inner_broadcast(x: Tensor, channel_dim: int, *others: Tensor) -> bool:
    """Whether per-(sample, channel) coefficients broadcast along the innermost dimension of ``x`` on CPU.

    PyTorch's CPU elementwise kernels vectorize the innermost loop only when at most one operand is
    broadcast along it. ``torch.addcmul(d, x, a)`` with ``a`` and ``d`` of shape ``(B, C, 1, 1)`` on
    a contiguous (not channels-last) ``x`` broadcasts two, and ran 2-4x slower on a 2-core CPU than
    ``x * a`` followed by ``+= d``, two passes of one broadcast operand each (float32 and bfloat16,
    ``benchmarks/overhead.py`` layer case). With channels last the coefficients vary along the
    innermost dimension and the single ``addcmul`` is the faster one, as it is on CUDA.
    """
    if x.device.type != "cpu" or x.dim() < 3 or x.shape[-1] == 1 or channel_dim % x.dim() == x.dim() - 1:
        return False
    return x.is_contiguous() and all(t.is_contiguous() for t in others)


def sample_affine(x: Tensor, a: Tensor, d: Tensor, channel_dim: int = 1) -> Tensor:
    """``x * a[b, c] + d[b, c]``: the per-(sample, channel) affine every method ends with (in ``x``'s dtype).

    Example:
        >>> x = torch.ones(2, 3, 4)
        >>> sample_affine(x, torch.full((2, 3), 2.0), torch.ones(2, 3)).unique()
        tensor([3.])
    """
    return _sample_affine(x, a, d, channel_dim)


def _sample_affine(x: Tensor, a: Tensor, d: Tensor, channel_dim: int, in_place: bool = False) -> Tensor:
    """:func:`sample_affine`; ``in_place``: written over ``x`` (a temporary of the caller, no autograd)."""
    a, d = broadcast_channels(a.to(x.dtype), x, channel_dim), broadcast_channels(d.to(x.dtype), x, channel_dim)
    if _coefficients_inner_broadcast(x, channel_dim):
        return (x.mul_(a) if in_place else torch.mul(x, a)).add_(d)
    return torch.addcmul(d, x, a, out=x) if in_place else torch.addcmul(d, x, a)


def _fits(scratch: Optional[Tensor], like: Tensor) -> bool:
    """Whether ``scratch`` can take a result shaped like ``like`` (same shape and dtype)."""
    return scratch is not None and scratch.shape == like.shape and scratch.dtype == like.dtype


def _affine_input_grad(
    grad_y: Tensor, x: Tensor, a: Tensor, p: Tensor, q: Tensor, channel_dim: int, out: Optional[Tensor] = None
) -> Tensor:
    """``grad_y * a + x * p + q``: the input gradient of ``y = x * A + D`` when ``A`` and ``D`` depend on
    ``x`` through its moments. ``a`` is ``(B, C)``; ``p`` and ``q`` are ``(B, C)`` or per channel ``(C,)``.
    ``out``: a scratch tensor to write it into (used when it has ``x``'s shape and dtype, in eager mode)."""

    def expand(t: Tensor) -> Tensor:
        if t.dim() == 2:
            return broadcast_channels(t.to(x.dtype), x, channel_dim)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return t.to(x.dtype).view(shape)

    if not _fits(out, x) or torch.compiler.is_compiling():
        out = None  # a new tensor (dynamo breaks the graph at an `out=` tensor that is not contiguous)
    if _coefficients_inner_broadcast(x, channel_dim, grad_y):  # one broadcast operand per op (see there)
        return torch.mul(grad_y, expand(a), out=out).addcmul_(x, expand(p)).add_(expand(q))
    return torch.addcmul(expand(q), x, expand(p), out=out).addcmul_(grad_y, expand(a))


def per_sample_moments(x: Tensor, channel_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and (biased) variance over the spatial dimensions, in float32.

    Args:
        x: input of shape ``(B, C, *spatial)`` (``channel_dim=1``) or ``(B, *spatial, C)``
            (``channel_dim=-1``). Any memory format; low precision inputs are accumulated in float32.
        channel_dim: the channel dimension.

    Returns:
        ``(mean, var)``, each of shape ``(B, C)`` and dtype float32 (float64 for float64 inputs). With
        no spatial dimension the variance is zero.

    Example:
        >>> m, v = per_sample_moments(torch.ones(4, 3, 2, 2))
        >>> m.shape, float(v.abs().max())
        (torch.Size([4, 3]), 0.0)
    """
    if not x.is_floating_point():
        raise TypeError(f"ghost noise needs a floating point input, got dtype {x.dtype}.")
    dims = _spatial_dims(x, channel_dim)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not dims:
        mean = x.reshape(x.shape[0], -1).to(acc)
        return mean, torch.zeros_like(mean)
    if x.dtype == torch.float64 or (x.is_cuda and x.dtype == torch.float32):
        # Welford: stable, and fast on CUDA
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    else:
        # CPU (where var_mean is ~50x slower than a plain sum) and half precision on CUDA: two
        # float32-accumulating reductions, no copy of x. Relative error of the variance is about
        # 1e-7 * (1 + mean**2 / var), far below what training notices.
        count = x.numel() // (x.shape[0] * x.shape[channel_dim])
        mean = x.mean(dims, dtype=acc)
        if x.device.type == "cpu" and x.stride(channel_dim) == 1 and x.shape[channel_dim] > 1:
            # channels innermost in memory (channels-last, LayerNorm's (B, T, D)): the CPU norm kernel
            # does not vectorize a reduction over outer dimensions (1.4-2.1 ms against 0.2 ms for
            # square-then-sum on 2M values); the temporary is freed at once
            second = _square_sums(x, dims, acc).div_(count)
        else:
            second = torch.linalg.vector_norm(x, 2, dims, dtype=acc).square().div_(count)
        var = torch.addcmul(second, mean, mean, value=-1).clamp_min_(0)
    return mean.reshape(x.shape[0], -1), var.reshape(x.shape[0], -1)


#: CPU full-size temporaries above this many bytes are made in chunks of the batch (see
#: :func:`_square_sums`); each chunk holds about ``_CHUNK_BYTES``.
_TEMPORARY_LIMIT = 16 << 20
_CHUNK_BYTES = 4 << 20


def _batch_chunks(x: Tensor, itemsize: int) -> int:
    """Samples per chunk of ``x`` when a full-size temporary of ``itemsize`` bytes per element is too
    large to allocate at once on CPU (in eager mode), else ``x.shape[0]`` (one chunk).

    Fresh allocations above glibc's largest mmap threshold (32 MiB) are mapped afresh every time, and
    their page faults cost more than the arithmetic: square-then-sum over ``(128, 196, 384)`` took
    13.5 ms in one piece against 1.5 ms in 4 MiB chunks (16 MiB: 0.73 ms against 0.86; 24 MiB: 1.7
    against 1.05).
    """
    if x.device.type != "cpu" or x.numel() * itemsize <= _TEMPORARY_LIMIT or x.shape[0] <= 1:
        return x.shape[0]
    if torch.compiler.is_compiling():  # inductor plans its own buffers; a loop would be unrolled into the graph
        return x.shape[0]
    return max(1, _CHUNK_BYTES // max(x[0].numel() * itemsize, 1))


def _square_sums(x: Tensor, dims: Tuple[int, ...], acc: torch.dtype) -> Tensor:
    """``(x**2).sum(dims)`` accumulated in ``acc``, through a bounded temporary (:func:`_batch_chunks`)."""
    itemsize = torch.empty((), dtype=acc).element_size()
    n = _batch_chunks(x, itemsize)
    if n >= x.shape[0]:
        return (x.square() if x.dtype == acc else x.to(acc).square_()).sum(dims)
    out = x.new_empty([x.shape[0]] + [x.shape[d] for d in range(1, x.dim()) if d not in dims], dtype=acc)
    buf = torch.empty_like(x[:n], dtype=acc)
    for i in range(0, x.shape[0], n):
        part, b = x[i : i + n], buf[: min(n, x.shape[0] - i)]
        if x.dtype == acc:
            torch.mul(part, part, out=b)
        else:
            b.copy_(part).square_()
        torch.sum(b, dims, out=out[i : i + n])
    return out


def ghost_indices(
    batch_size: int,
    ghost_batch_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
    num_rows: Optional[int] = None,
    key: Optional[Tensor] = None,
) -> Tensor:
    """Draw, for each sample, the ``N`` members of its ghost batch (uniform, with replacement).

    Args:
        batch_size: ``B``, the number of samples to draw from (the pool).
        ghost_batch_size: ``N``, members per ghost batch; any ``N >= 1`` (``N`` may exceed ``B``).
        generator: the random generator to draw from (on ``device``). ``None`` uses the global one.
        device: where to draw; defaults to the generator's device.
        num_rows: how many ghost batches to draw (defaults to ``batch_size``).
        key: draw from the counter-based generator (:mod:`lightning_ghostnoise.counter_rng`) with this
            int64 key tensor instead of ``generator`` (what the layers use under ``torch.compile``).

    Returns:
        Long tensor of shape ``(num_rows, N)`` with values in ``[0, B)``.

    Example:
        >>> ghost_indices(8, 4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 4])
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    rows = batch_size if num_rows is None else num_rows
    if key is not None:
        return counter_rng.uniform_ints(key, (rows, ghost_batch_size), batch_size, device=key.device)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randint(0, batch_size, (rows, ghost_batch_size), generator=generator, device=device)


def _ghost_counts(indices: Tensor, pool_size: int) -> Tensor:
    """``counts[b, j]``: how often sample ``j`` is in the ghost batch of sample ``b`` (float32)."""
    counts = torch.zeros(indices.shape[0], pool_size, device=indices.device, dtype=torch.float32)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float32))


def ghost_noise(
    mean: Tensor,
    var: Tensor,
    indices: Tensor,
    eps: float = NOISE_EPS,
    batch: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
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
    with torch.no_grad(), _autocast_off(mean):
        mean, var = mean.float(), var.float()
        pool, n = mean.shape[0], indices.shape[1]
        channels = mean.shape[1]
        m2 = torch.addcmul(var, mean, mean)  # per-sample second moments
        weight: Optional[Tensor] = None  # (P, C): 1 where both moments are finite, when they are masked
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
                sums = _ghost_counts(indices, pool) @ moments
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
    (:mod:`lightning_ghostnoise.kernels`) computes the noise inside its own kernel.

    Example:
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> shift, scale = GhostDraws(indices=idx)(torch.zeros(8, 3), torch.ones(8, 3))
        >>> shift.shape
        torch.Size([8, 3])
    """

    def __init__(
        self,
        indices: Optional[Tensor] = None,
        eps: float = NOISE_EPS,
        normal: Optional[Tensor] = None,
        gamma: Optional[Tensor] = None,
        ghost_batch_size: Optional[int] = None,
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

    def __call__(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        return self.noise(mean, var)

    def noise(self, mean: Tensor, var: Tensor, batch: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
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

    def __init__(self, fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]) -> None:
        self.fn = fn

    def __call__(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        return self.fn(mean, var)


def _noise_moments(noise_fn: Callable[..., Any], x_hat: Tensor, channel_dim: int) -> Tuple[Tensor, Tensor]:
    """The per-sample moments of ``x_hat`` for ``noise_fn``; zeros of their shape if it does not read them."""
    if getattr(noise_fn, "uses_moments", True):
        return per_sample_moments(x_hat, channel_dim)
    acc = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(x_hat.shape[0], x_hat.shape[channel_dim], device=x_hat.device, dtype=acc)
    return zeros, zeros


def analytic_draws(
    batch_size: int,
    num_channels: int,
    ghost_batch_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
    key: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The random draws behind :func:`analytic_noise`: per (sample, channel) a standard normal and a
    ``Gamma((N - 1) / 2, 1)`` variate (zero for ``N = 1``), float32 ``(batch_size, num_channels)`` each.

    With ``key`` they come from the counter-based generator (what the layers use under
    ``torch.compile``): ``Gamma(k / 2, 1)`` for ``k = N - 1`` as a sum of ``k // 2`` standard
    exponentials (``-log U``), plus ``Z**2 / 2`` for a normal ``Z`` when ``k`` is odd: the exact law
    with about a third of the random numbers of ``k`` squared normals.

    Example:
        >>> z, g = analytic_draws(4, 3, 16, generator=torch.Generator().manual_seed(0))
        >>> z.shape, bool((g > 0).all())
        (torch.Size([4, 3]), True)
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    n = ghost_batch_size
    shape = (batch_size, num_channels)
    if key is not None:
        normal = counter_rng.normal(key, shape, salt=0)  # uniform streams 1 and 2
        k = n - 1
        gamma = torch.zeros_like(normal)
        if k // 2:
            gamma = -torch.log(counter_rng.uniform(key, (k // 2,) + shape, salt=5)).sum(0)
        if k % 2:
            gamma = gamma + counter_rng.normal(key, shape, salt=1).square() / 2  # uniform streams 3 and 4
        return normal, gamma
    if device is None:
        device = generator.device if generator is not None else "cpu"
    normal = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if n == 1:
        return normal, torch.zeros_like(normal)
    # a cached 0-dim shape parameter, broadcast: the same draws as a full tensor, no fill launch per call
    alpha = _gamma_shape(n, torch.device(device)).expand(shape)
    return normal, torch._standard_gamma(alpha, generator=generator)


@functools.lru_cache(maxsize=64)
def _gamma_shape(ghost_batch_size: int, device: torch.device) -> Tensor:
    """``(N - 1) / 2`` as a float32 0-dim tensor on ``device`` (read-only, shared)."""
    return torch.tensor((ghost_batch_size - 1) / 2.0, dtype=torch.float32, device=device)


def analytic_noise_from_draws(normal: Tensor, gamma: Tensor, ghost_batch_size: int) -> Tuple[Tensor, Tensor]:
    """``shift = normal / sqrt(N)`` and ``scale = sqrt(2 gamma / N)`` (``chi2(k) = 2 Gamma(k / 2, 1)``)."""
    n = ghost_batch_size
    return normal / math.sqrt(n), torch.sqrt((2.0 * gamma) / n)


def analytic_noise(
    batch_size: int,
    num_channels: int,
    ghost_batch_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
    key: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
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
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
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
    inv, d = _noise_affine(shift, scale, strength, shift_noise, scale_noise)
    return sample_affine(x_hat, *_with_affine(inv, d, weight, bias), channel_dim)


def _noise_affine(
    shift: Tensor, scale: Tensor, strength: StrengthLike, shift_noise: bool, scale_noise: bool
) -> Tuple[Tensor, Tensor]:
    """The noise as ``x_hat * inv + d`` (before the layer's affine): ``inv = scale**-s``, ``d = -s * shift * inv``."""
    s = strength if isinstance(strength, Tensor) else torch.tensor(float(strength), dtype=torch.float32)
    s = s.to(device=shift.device, dtype=torch.float32)
    inv = torch.pow(scale, -s) if scale_noise else torch.ones_like(scale)
    d = -(s * shift) * inv if shift_noise else torch.zeros_like(shift)
    return inv, d


@functools.lru_cache(maxsize=32)
def _unit_affine(size: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Cached ones and zeros of ``size``: an identity affine (see :class:`NativeLayerNorm`)."""
    return torch.ones(size, device=device, dtype=dtype), torch.zeros(size, device=device, dtype=dtype)


class NativeNorm:
    """A per-sample normalization without affine (``x -> x_hat``) that also exposes PyTorch's native
    kernels: the forward returns the statistics ``(mean, rstd)`` and the backward takes them.

    Called, it is a plain ``normalize`` for :func:`normalized_noise`. Its fused path uses the rest:
    it keeps ``(x, mean, rstd)``, exactly what the plain layer keeps, and in the backward calls the
    native backward once, with no recomputation of ``x_hat``. The noise's scale ``inv`` goes into
    the native kernel's output gradient (``grad_y * inv``) and the layer's weight into its weight
    argument, so its weight gradient ``sum grad_y * inv * x_hat`` is the scale part of the layer's.
    """

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(x_hat, mean, rstd)``: the same bits as ``self(x)``."""
        raise NotImplementedError

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], need_x: bool, need_w: bool
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(grad_x, grad_w)`` of ``normalize(x) * weight`` for the output gradient ``grad``."""
        raise NotImplementedError

    def memory_format(self, x: Tensor) -> torch.memory_format:
        """The layout the native kernels work in for ``x`` (others are copied to it first)."""
        return torch.contiguous_format

    def input_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the normalization computes ``x`` in under the current autocast state.

        Autocast may cast a norm's input (CUDA runs ``layer_norm`` in float32); its policy is read
        off once per (norm type, device, input dtype, autocast dtype) by normalizing one sample.
        """
        device = x.device.type
        state = _autocast_state(device)
        if state is None:
            return x.dtype
        key = (type(self), device, x.dtype, state)
        dtype = _AUTOCAST_PROBES.get(key)
        if dtype is None:
            with torch.no_grad():
                dtype = _AUTOCAST_PROBES[key] = self(x[:1]).dtype
        return dtype


#: :meth:`NativeNorm.input_dtype`'s readings of the autocast policy.
_AUTOCAST_PROBES: Dict[Tuple[type, str, torch.dtype, torch.dtype], torch.dtype] = {}


class NativeLayerNorm(NativeNorm):
    """``F.layer_norm(x, normalized_shape, eps=eps)`` without affine, as a :class:`NativeNorm`.

    Float32 CPU inputs get a cached identity affine: PyTorch's float32 CPU kernel is 2.3-3.4x slower
    without an affine than with one (0.88-1.55 ms against 0.38-0.46 ms on ``(64, 128, 256)``), and
    the bits are the same.

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> ln = NativeLayerNorm((5,))
        >>> bool(torch.equal(ln(x), ln.forward(x)[0]))
        True
    """

    def __init__(self, normalized_shape: Sequence[int], eps: float = 1e-5) -> None:
        self.normalized_shape, self.eps = tuple(normalized_shape), eps

    def _unit(self, x: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if x.device.type == "cpu" and x.dtype == torch.float32 and len(self.normalized_shape) == 1:
            if not torch.compiler.is_compiling():
                return _unit_affine(self.normalized_shape[0], x.device, x.dtype)
        return None, None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, *self._unit(x), self.eps)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return torch.native_layer_norm(x, self.normalized_shape, *self._unit(x), self.eps)

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], need_x: bool, need_w: bool
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        if weight is None:  # (the identity weight: the faster CPU kernel, as in the forward)
            weight = self._unit(x)[0]
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, self.normalized_shape, mean, rstd, weight, None, [need_x, need_w, False]
        )
        return grad_x, grad_w


class NativeGroupNorm(NativeNorm):
    """``F.group_norm(x, num_groups, eps=eps)`` without affine, as a :class:`NativeNorm`.

    Example:
        >>> x = torch.randn(4, 6, 3, 3)
        >>> gn = NativeGroupNorm(2)
        >>> bool(torch.equal(gn(x), gn.forward(x)[0]))
        True
    """

    def __init__(self, num_groups: int, eps: float = 1e-5) -> None:
        self.num_groups, self.eps = num_groups, eps

    def _sizes(self, x: Tensor) -> Tuple[int, int, int]:
        return x.shape[0], x.shape[1], x.numel() // max(x.shape[0] * x.shape[1], 1)

    def memory_format(self, x: Tensor) -> torch.memory_format:
        fmt = _CHANNELS_LAST.get(x.dim())
        if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
            return torch.contiguous_format
        return fmt

    def _dense(self, t: Tensor, like: Optional[Tensor] = None) -> Tensor:
        """Dense in ``like``'s memory format, as the native kernels want (``F.group_norm`` does the same)."""
        return t.contiguous(memory_format=self.memory_format(t if like is None else like))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.group_norm(x, self.num_groups, None, None, self.eps)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return torch.native_group_norm(self._dense(x), None, None, *self._sizes(x), self.num_groups, self.eps)

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], need_x: bool, need_w: bool
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        x = self._dense(x)
        # torch 2.13's CPU kernel crashes on a channels-last input when grad_x is not asked for: ask
        want_x = need_x or not x.is_contiguous()
        grad_x, grad_w, _ = torch.ops.aten.native_group_norm_backward(
            self._dense(grad, x), x, mean, rstd, weight, *self._sizes(x), self.num_groups, [want_x, need_w, False]
        )
        return grad_x if need_x else None, grad_w


def normalized_noise(
    x: Tensor,
    normalize: Callable[[Tensor], Tensor],
    noise_fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    strength: StrengthLike = 1.0,
    channel_dim: int = 1,
    shift_noise: bool = True,
    scale_noise: bool = True,
    fused: Optional[bool] = None,
) -> Tensor:
    """GNI after a per-sample normalization: ``apply_noise(x_hat, *noise_fn(moments of x_hat), ...)``
    with ``x_hat = normalize(x)`` (e.g. LayerNorm or GroupNorm without their affine).

    The fused path (``fused=None`` while gradients are recorded, eager mode) keeps what the plain
    norm layer keeps for the backward: plain autograd would keep ``x`` for the normalization and
    ``x_hat`` for the noise affine, twice the activation memory, and allocate more full-size
    temporaries in the backward. With a :class:`NativeNorm` (:class:`NativeLayerNorm`,
    :class:`NativeGroupNorm`) that computes in float32/float64 (after autocast's cast of its input,
    if any: :meth:`NativeNorm.input_dtype`) it keeps the norm's input and the native ``(mean, rstd)``
    and calls the native backward once. With any other ``normalize`` it keeps only
    ``x`` and recomputes ``normalize(x)`` in the backward, under the forward's autocast state. The
    noise is drawn once, in the forward, either way. ``fused=False`` (and ``torch.compile``, whose
    fusion does the same job) uses plain autograd, which also supports double backward.

    Args:
        x: the input of the normalization.
        normalize: ``x -> x_hat``, a per-sample normalization without affine: a :class:`NativeNorm`
            (fastest), or a callable such as ``lambda t: F.layer_norm(t, (D,))``. The fused path
            calls a callable again in the backward and writes over its output there, so its own
            backward must not keep that output (true of ``F.layer_norm``, ``F.group_norm`` and
            ``F.instance_norm``; otherwise autograd raises).
        noise_fn: ``(m_hat, v_hat) -> (shift, scale)`` from the per-sample moments of ``x_hat``.
        weight, bias, strength, shift_noise, scale_noise: as in :func:`apply_noise`.
        channel_dim: the channel dimension (``-1`` for LayerNorm's ``(B, *, D)``).
        fused: ``None`` (default) the fused path while gradients are recorded, outside
            ``torch.compile``; ``False`` plain autograd; ``True`` always fused.

    Example:
        >>> x = torch.randn(8, 5, 6)
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> normalized_noise(x, NativeLayerNorm((6,)), GhostDraws(indices=idx), channel_dim=-1).shape
        torch.Size([8, 5, 6])
    """
    if _use_fused(fused, closed_form=False):
        return _NormalizedNoise.apply(
            x, weight, bias, normalize, noise_fn, strength, channel_dim, shift_noise, scale_noise
        )  # fmt: skip
    x_hat = normalize(x)
    shift, scale = noise_fn(*_noise_moments(noise_fn, x_hat.detach(), channel_dim))
    return apply_noise(x_hat, shift, scale, weight, bias, strength, channel_dim, shift_noise, scale_noise)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _autocast_state(device: str) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is on for ``device``, else ``None``."""
    try:
        if not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # torch < 2.4
        if device == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


class _NormalizedNoise(torch.autograd.Function):
    """``y = normalize(x) * A + D`` (see :func:`normalized_noise`), keeping what the plain layer keeps.

    With ``inv``, ``d`` the noise (no gradient) and the layer's ``w``, ``b``: ``A = inv * w``,
    ``D = d * w + b``. Backward: with ``r0 = sum_s grad_y`` per (sample, channel),
    ``grad_b = sum_b r0`` and ``grad_w = sum_b sum_s grad_y * inv * x_hat + sum_b r0 * d``;
    ``grad_y * A`` goes back through ``normalize``.

    - A :class:`NativeNorm` computing in float32/float64 (autocast's cast of the input, if any,
      is made here, as the plain layer's autocast would): the forward keeps the native kernel's ``(mean, rstd)``;
      the backward makes one full-size pass for ``grad_y * inv`` and calls the native backward with
      the weight ``w``, which gives ``grad_x`` and the first term of ``grad_w`` in one kernel.
    - Any other ``normalize``: the backward recomputes ``x_hat`` under the forward's autocast state
      and goes back through the native kernel's own backward with ``torch.autograd.grad``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        normalize: Callable[[Tensor], Tensor],
        noise_fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
        strength: StrengthLike,
        channel_dim: int,
        shift_noise: bool,
        scale_noise: bool,
    ) -> Tensor:
        ctx.autocast = _autocast_state(x.device.type)
        ctx.input_dtype = x.dtype
        # the native statistics where the norm computes in float32/float64 (after autocast's cast,
        # if any): PyTorch's CPU LayerNorm backward sums a bfloat16 input's weight gradient in low
        # precision (abs. error 2.1 against the recomputing path's 0.15 on a gradient of 62, (32, 16, 64))
        x_in = x
        if isinstance(normalize, NativeNorm) and ctx.autocast is not None:
            x_in = x.to(normalize.input_dtype(x))  # autocast's own cast (none on CPU for these norms)
        ctx.native = isinstance(normalize, NativeNorm) and x_in.dtype in _NATIVE_DTYPES
        if ctx.native:
            with _autocast_off(x_in):  # (the input is already in the dtype autocast gives the norm)
                x_hat, mean, rstd = normalize.forward(x_in)  # type: ignore[attr-defined]
            stats: Tuple[Tensor, ...] = (mean, rstd)
        else:
            x_in, stats = x, ()
            x_hat = normalize(x)
        shift, scale = noise_fn(*_noise_moments(noise_fn, x_hat, channel_dim))
        inv, d = _noise_affine(shift, scale, strength, shift_noise, scale_noise)
        # the native path keeps the norm's input (x, or autocast's float32 copy, as the plain layer does)
        ctx.save_for_backward(x_in, inv, d, weight, *stats)
        ctx.normalize, ctx.channel_dim, ctx.has_bias = normalize, channel_dim, bias is not None
        ctx.shift_noise, ctx.scale_noise = shift_noise, scale_noise
        # x_hat is this function's own temporary (unless normalize returned x's memory): y takes its memory
        own = not _shares_memory(x_hat, x) and not _shares_memory(x_hat, x_in)
        return _sample_affine(x_hat, *_with_affine(inv, d, weight, bias), channel_dim, in_place=own)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        _refuse_double_backward()
        if ctx.native:
            grads = _NormalizedNoise._native_backward(ctx, grad_y)
        else:
            grads = _NormalizedNoise._recompute_backward(ctx, grad_y)
        # (autograd casts grad_w / grad_b to the parameters' dtype)
        return grads + (None,) * 6

    @staticmethod
    def _native_backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, inv, d, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        r0 = None
        if need_b or (need_w and ctx.shift_noise):
            dims = _spatial_dims(grad_y, ctx.channel_dim)
            r0 = (grad_y.sum(dims, dtype=inv.dtype) if dims else grad_y.to(inv.dtype)).reshape(grad_y.shape[0], -1)
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            # (the forward ran without an affine, in x's dtype: the backward's weight follows it)
            w = weight.to(x.dtype) if weight is not None else None
            if not ctx.scale_noise:  # inv is 1
                grad_x, grad_w = ctx.normalize.backward(grad_y, x, mean, rstd, w, need_x, need_w)
            else:
                grad_x, grad_w = _NormalizedNoise._scaled_native_backward(ctx, grad_y, x, mean, rstd, inv, w)
            if need_w and ctx.shift_noise:
                grad_w = (r0 * d).sum(0).add_(grad_w)
        if grad_x is not None and grad_x.dtype != ctx.input_dtype:  # through autocast's cast
            grad_x = grad_x.to(ctx.input_dtype)
        if need_b:
            grad_b = r0.sum(0)
        return grad_x, grad_w, grad_b

    @staticmethod
    def _scaled_native_backward(
        ctx: Any, grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, inv: Tensor, w: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The native backward of ``grad_y * inv``, in chunks of the batch where ``grad_y * inv`` would
        be a large temporary on CPU (:func:`_batch_chunks`)."""
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and w is not None
        batch = x.shape[0]
        n = _batch_chunks(x, grad_y.element_size())
        inv = broadcast_channels(inv.to(grad_y.dtype), grad_y, ctx.channel_dim)
        # (in the layout the native kernels work in: LayerNorm's copies any other, e.g. a transposed x)
        buf = torch.empty_like(x[:n], dtype=grad_y.dtype, memory_format=ctx.normalize.memory_format(x))
        if n >= batch:
            return ctx.normalize.backward(torch.mul(grad_y, inv, out=buf), x, mean, rstd, w, need_x, need_w)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w: Optional[Tensor] = None
        for i in range(0, batch, n):
            rows = slice(i, i + n)
            part = torch.mul(grad_y[rows], inv[rows], out=buf[: min(n, batch - i)])
            gx, gw = ctx.normalize.backward(part, x[rows], mean[rows], rstd[rows], w, need_x, need_w)
            if grad_x is not None:
                grad_x[rows].copy_(gx)
            if gw is not None:
                grad_w = gw if grad_w is None else grad_w.add_(gw)
        return grad_x, grad_w

    @staticmethod
    def _recompute_backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, inv, d, weight = ctx.saved_tensors
        device = x.device.type
        autocast = (
            torch.autocast(device, dtype=ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext()
        )
        with torch.enable_grad(), autocast:
            leaf = x.detach().requires_grad_(ctx.needs_input_grad[0])
            x_hat = ctx.normalize(leaf)
        # LayerNorm's and GroupNorm's backward keep their input, not x_hat: the product takes x_hat's
        # memory (a normalize that keeps its output makes autograd.grad below raise, never silently wrong)
        own = not _shares_memory(x_hat, x)
        r0, r1, scratch = _sample_channel_sums(grad_y, x_hat.detach(), ctx.channel_dim, inv.dtype, overwrite_x=own)
        grad_w = grad_b = grad_x = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = torch.addcmul(r1 * inv, r0, d).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = r0.sum(0)
        if ctx.needs_input_grad[0]:
            a = inv if weight is None else inv * weight.to(inv.dtype)
            a = broadcast_channels(a.to(x_hat.dtype), x_hat, ctx.channel_dim)
            grad_hat = torch.mul(grad_y, a, out=scratch) if _fits(scratch, x_hat) else grad_y * a
            (grad_x,) = torch.autograd.grad(x_hat, leaf, grad_hat)
        return grad_x, grad_w, grad_b


def ghost_groups(batch_size: int, ghost_batch_size: int, device: Optional[Union[torch.device, str]] = None) -> Tuple[Tensor, int]:
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


def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float,
    foreach: bool = False,
) -> None:
    """Update running statistics in place as ``F.batch_norm`` does with ``momentum``.

    ``batch_var`` is the biased batch variance over ``count`` values per channel; the running
    variance receives the unbiased one (``count / (count - 1)``). The caller resolves BatchNorm's
    ``momentum=None`` (cumulative average) into a factor, as ``nn.BatchNorm`` does. ``foreach``: both
    buffers in one op (the same values), which inductor makes one kernel where no other kernel takes
    the update as its epilogue (after a custom op); elsewhere two ``lerp_`` fuse better.
    """
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        unbiased = batch_var * (count / max(count - 1, 1))
        _lerp_running_stats(running_mean, running_var, batch_mean, unbiased, momentum, foreach)


def _lerp_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased_var: Tensor, momentum: float, foreach: bool
) -> None:
    """``running += momentum * (target - running)`` for both buffers (in the buffers' dtype), in place."""
    mean = mean.to(running_mean.dtype)
    var = unbiased_var.to(running_var.dtype)
    if foreach and running_mean.dtype == running_var.dtype and running_mean.device == running_var.device:
        torch._foreach_lerp_([running_mean, running_var], [mean, var], momentum)
    else:
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(var, momentum)


#: The conventions for GBN's running statistics (see :func:`ghost_running_targets`).
RUNNING_STATS: Tuple[str, ...] = ("ghost", "batch")


def resolve_running_stats(running_stats: Optional[str], ghost: bool) -> str:
    """``running_stats`` checked, with ``None`` resolved to the default: ``"ghost"`` where the method
    normalizes by ghost batches (``ghost``: GBN), else ``"batch"``.

    Only the valid values are checked here; which method allows ``"ghost"`` is
    :func:`lightning_ghostnoise.layers.validate_running_stats`'s business (the layers' one place).
    """
    if running_stats is None:
        return "ghost" if ghost else "batch"
    if not isinstance(running_stats, str) or running_stats.lower() not in RUNNING_STATS:
        raise ValueError(
            f"running_stats must be 'ghost', 'batch' or None (the method's default), got {running_stats!r}."
        )
    return running_stats.lower()


def ghost_running_targets(
    mean: Tensor, var: Tensor, ghost_batch_size: int, spatial_count: int
) -> Tuple[Tensor, Tensor]:
    """GBN's running-statistics targets as published: the ghost batches' mean moments.

    From the per-sample moments ``mean``, ``var`` ``(B, C)`` (biased, over ``spatial_count`` positions
    each): ghost batches as in :func:`ghost_groups` (the ``B mod N`` remainder joins the last one);
    each ghost batch ``g`` of ``n_g`` samples has its mean and unbiased variance over its
    ``n_g * spatial_count`` values per channel (``biased * count / (count - 1)``; a ghost batch of
    one value has variance 0, as in :func:`update_running_stats`). The targets are the
    averages of these over the ghost batches, each ghost batch weighing 1 (Hoffer et al.'s GBN,
    Keras's ``virtual_batch_size``): eval then sees the scale training normalized with.

    Returns:
        ``(mean_target, unbiased_var_target)``, each ``(C,)``, without gradient.

    Example:
        >>> x = torch.randn(10, 3, 4, 4)
        >>> m, v = ghost_running_targets(*per_sample_moments(x), 4, 16)
        >>> ref = torch.stack([x[:4].var((0, 2, 3)), x[4:].var((0, 2, 3))]).mean(0)  # groups of 4 and 6
        >>> torch.allclose(v, ref, atol=1e-5)
        True
    """
    with torch.no_grad():
        mean, var = mean.detach(), var.detach()
        batch, channels = mean.shape
        n = ghost_batch_size
        groups = max(batch // n, 1)
        head = (groups - 1) * n  # samples in the equal ghost batches before the last one

        def moments(m: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
            """Sums over ghost batches ``(G, n_g, C)`` of their means and unbiased variances."""
            g_mean = m.mean(1, keepdim=True)
            d = m - g_mean
            size = m.shape[1] * spatial_count
            g_var = torch.addcmul(v, d, d).mean(1) * (size / max(size - 1, 1))
            return g_mean.sum((0, 1)), g_var.sum(0)

        mean_sum, var_sum = moments(mean[head:].unsqueeze(0), var[head:].unsqueeze(0))
        if head:
            m, v = moments(mean[:head].reshape(groups - 1, n, channels), var[:head].reshape(groups - 1, n, channels))
            mean_sum, var_sum = mean_sum + m, var_sum + v
        return mean_sum / groups, var_sum / groups


def update_ghost_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    ghost_batch_size: int,
    spatial_count: int,
    momentum: float,
    foreach: bool = False,
) -> None:
    """Lerp the running statistics towards :func:`ghost_running_targets` of the per-sample moments
    (GBN's ``running_stats="ghost"``), as :func:`update_running_stats` does towards the batch's."""
    if running_mean is None or running_var is None:
        return
    target_mean, target_var = ghost_running_targets(mean, var, ghost_batch_size, spatial_count)
    with torch.no_grad():
        _lerp_running_stats(running_mean, running_var, target_mean, target_var, momentum, foreach)


CoeffFn = Callable[..., Tuple[Tensor, Tensor]]


def _spatial_count(x: Tensor, channel_dim: int) -> int:
    return x.numel() // (x.shape[0] * x.shape[channel_dim]) if x.numel() else 1


def _refuse_double_backward() -> None:
    """Called in the fused backward: grad mode is on there only when a second derivative is requested."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "Double backward (create_graph=True, e.g. a gradient penalty) is not supported by the fused ghost "
            "noise path. Use plain autograd: layer.fused = False, apply_ghost_noise(..., fused=False) or "
            "GhostNoise(..., fused=False)."
        )


def _sample_channel_sums(
    grad_y: Tensor, x: Tensor, channel_dim: int, dtype: torch.dtype, overwrite_x: bool = False
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-(sample, channel) ``sum_s grad_y`` and ``sum_s grad_y * x`` over the spatial positions.

    The third result is the full-size product ``grad_y * x``, free to overwrite: the input gradient
    is written into it (``_affine_input_grad(..., out=...)``), one full-size allocation fewer per
    backward (on CPU a fresh one costs page faults comparable to the arithmetic). ``None`` when
    there is no spatial dimension. ``overwrite_x``: the product is written over ``x`` (a temporary
    of the caller), one allocation fewer again.
    """
    dims = _spatial_dims(x, channel_dim)
    if not dims:
        return grad_y.to(dtype), (grad_y * x).to(dtype), None
    batch = x.shape[0]
    product = torch.mul(grad_y, x, out=x) if overwrite_x and x.dtype == grad_y.dtype else grad_y * x
    return grad_y.sum(dims, dtype=dtype).reshape(batch, -1), product.sum(dims, dtype=dtype).reshape(batch, -1), product


def _kernel_layout(x: Tensor, channel_dim: int) -> Optional[kernels.Layout]:
    """``x``'s layout when the fused autograd functions run on the Triton kernels (CUDA), else ``None``."""
    return kernels.layout(x) if channel_dim == 1 else None


# The fused autograd functions' full-size passes: the Triton kernels where ``lay`` (the input's
# kernel layout) is given, else PyTorch. Small results come stacked in rows, as the kernels keep them.
def _stacked_moments(x: Tensor, channel_dim: int, lay: Optional[kernels.Layout]) -> Tensor:
    """Per-sample mean and variance stacked ``(2, B, C)`` (float32; float64 for float64 inputs)."""
    if lay is not None:
        return kernels.moments(x, lay)
    return torch.stack(per_sample_moments(x, channel_dim))


def _rows_affine(x: Tensor, ad: Tensor, channel_dim: int, lay: Optional[kernels.Layout]) -> Tensor:
    """``x * A + D`` with ``A``, ``D`` the first two rows of ``ad`` ``(k >= 2, B, C)``."""
    if lay is not None:
        return kernels.affine(x, lay, ad)
    return sample_affine(x, ad[0], ad[1], channel_dim)


def _stacked_sums(
    grad_y: Tensor, x: Tensor, channel_dim: int, lay: Optional[kernels.Layout], dtype: torch.dtype = torch.float32
) -> Tensor:
    """``sum_s grad_y`` and ``sum_s grad_y * x`` stacked ``(2, B, C)`` (PyTorch: in ``dtype``; kernels: float32)."""
    if lay is not None:
        return kernels.channel_sums(grad_y, x, lay)
    return torch.stack(_sample_channel_sums(grad_y, x, channel_dim, dtype)[:2])


def _rows_input_grad(
    grad_y: Tensor, x: Tensor, a_rows: Tensor, pq: Tensor, channel_dim: int, lay: Optional[kernels.Layout]
) -> Tensor:
    """``grad_y * A + x * P + Q``: ``A`` the first row of ``a_rows``, ``P``, ``Q`` the rows of ``pq``."""
    if lay is not None:
        return kernels.affine_input_grad(grad_y, x, lay, a_rows, pq)
    return _affine_input_grad(grad_y, x, a_rows[0], pq[0], pq[1], channel_dim)


def _use_fused(fused: Optional[bool], closed_form: bool = True) -> bool:
    """``fused=None``: the fused autograd functions while gradients are recorded.

    The closed-form ones (every method without ``sync``) also under ``torch.compile``, which traces
    their forward and backward into the graph (0 graph breaks): on a 2-core CPU that took the compiled
    GBN/XBN step from 1.24-1.53x to 1.04x of plain BatchNorm's, where inductor's own derivative of
    the plain formulas fused poorly. The generic :func:`moment_affine` (``sync=True``) keeps plain
    autograd under ``torch.compile``: its backward differentiates a small graph with
    ``torch.autograd.grad``, which the compiler does not trace.
    """
    if fused is None:
        return torch.is_grad_enabled() and (closed_form or not torch.compiler.is_compiling())
    return fused


class _MomentAffine(torch.autograd.Function):
    """``y = x * A + D`` with ``(A, D) = coeff_fn(mean, var, *params)`` of ``x``'s per-sample moments.

    Two passes over ``x`` forward (moments, affine) and two backward (the per-(sample, channel)
    reductions, then ``grad_x = grad_y * A + x * P + Q``), as many as BatchNorm's own kernels, whatever
    the method: the method only changes the small ``(B, C)`` graph of ``coeff_fn``, which is
    differentiated by autograd inside :meth:`backward`.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, channel_dim: int, coeff_fn: CoeffFn, *params: Optional[Tensor]) -> Tensor:
        ctx.lay = _kernel_layout(x, channel_dim)
        mean, var = _stacked_moments(x, channel_dim, ctx.lay)
        with torch.enable_grad():
            m = mean.detach().requires_grad_()
            v = var.detach().requires_grad_()
            leaves = [None if p is None else p.detach().requires_grad_(p.requires_grad) for p in params]
            a, d = coeff_fn(m, v, *leaves)
        ctx.save_for_backward(x)
        ctx.graph = (m, v, leaves, a, d)
        ctx.channel_dim = channel_dim
        ad = torch.stack([a.detach(), d.detach()])
        return _rows_affine(x, ad.float() if ctx.lay is not None else ad, channel_dim, ctx.lay)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        _refuse_double_backward()
        (x,) = ctx.saved_tensors
        m, v, leaves, a, d = ctx.graph
        channel_dim = ctx.channel_dim
        r0, r1 = _stacked_sums(grad_y, x, channel_dim, ctx.lay, m.dtype)
        inputs = [m, v] + [p for p in leaves if p is not None and p.requires_grad]
        # the small (B, C) graph is kept (retain_graph) so that backward through y may run twice
        grads = torch.autograd.grad((a, d), inputs, (r1, r0), allow_unused=True, retain_graph=True)
        gm = grads[0] if grads[0] is not None else torch.zeros_like(m)
        gv = grads[1] if grads[1] is not None else torch.zeros_like(v)
        count = _spatial_count(x, channel_dim)
        p_coef = 2.0 * gv / count
        q_coef = gm / count - p_coef * m
        grad_x = None
        if ctx.needs_input_grad[0]:
            a_rows, pq = a.detach()[None], torch.stack([p_coef, q_coef])
            if ctx.lay is not None:  # the kernel reads contiguous float32 rows
                a_rows, pq = a_rows.float().contiguous(), pq.float()
            grad_x = _rows_input_grad(grad_y, x, a_rows, pq, channel_dim, ctx.lay)
        param_grads: List[Optional[Tensor]] = []
        it = iter(grads[2:])
        for p in leaves:
            param_grads.append(next(it) if p is not None and p.requires_grad else None)
        return (grad_x, None, None, *param_grads)


def moment_affine(
    x: Tensor, coeff_fn: CoeffFn, params: Sequence[Optional[Tensor]] = (), channel_dim: int = 1, fused: Optional[bool] = None
) -> Tensor:
    """``x * A[b, c] + D[b, c]`` where ``(A, D) = coeff_fn(mean, var, *params)`` and ``mean``/``var`` are
    ``x``'s per-sample moments (:func:`per_sample_moments`); gradients flow through everything.

    Every BatchNorm-family method is one ``coeff_fn``. ``fused=None`` picks the fused autograd function
    in eager mode and plain autograd under ``torch.compile`` (the fused backward calls
    ``torch.autograd.grad``); both compute the same forward, and gradients equal to float rounding.

    Example:
        >>> def standardize(mean, var):
        ...     return torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5)
        >>> y = moment_affine(torch.randn(2, 3, 8), standardize)
        >>> bool(y.mean(-1).abs().max() < 1e-5)
        True
    """
    if _use_fused(fused, closed_form=False):
        return _MomentAffine.apply(x, channel_dim, coeff_fn, *params)
    mean, var = per_sample_moments(x, channel_dim)
    a, d = coeff_fn(mean, var, *params)
    return sample_affine(x, a, d, channel_dim)


def _as_strength(strength: StrengthLike, like: Tensor) -> Tensor:
    s = strength if isinstance(strength, Tensor) else torch.tensor(float(strength), dtype=torch.float32)
    return s.to(device=like.device, dtype=like.dtype)


def _with_affine(a: Tensor, d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if weight is not None:
        w = weight.to(a.dtype)
        a, d = a * w, d * w
    if bias is not None:
        d = d + bias.to(a.dtype)
    return a, d


def batch_moments(mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
    """Batch mean and biased variance per channel from per-sample moments (differentiable, stable).

    Example:
        >>> x = torch.randn(6, 2, 5)
        >>> mu, var = batch_moments(*per_sample_moments(x))
        >>> torch.allclose(var, x.transpose(0, 1).reshape(2, -1).var(1, unbiased=False), atol=1e-6)
        True
    """
    centre = mean.detach().mean(0)
    c = mean - centre
    mu = c.mean(0)
    return mu + centre, ((var + c * c).mean(0) - mu * mu).clamp_min(0)


def noise_coefficients(
    mean: Tensor,
    var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    noise_fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``(A, D)`` of GNI on BatchNorm: ``y = x * A + D = w * ((x - mu) * rstd - s * shift) / scale**s + b``.

    ``noise_fn(m_hat, v_hat)`` receives the per-sample moments of the normalized features (no
    gradient) and returns ``(shift, scale)`` (e.g. :func:`ghost_noise` over drawn indices, or
    :func:`analytic_noise`). Gradients flow through the batch statistics and the affine only.
    """
    rstd = torch.rsqrt(batch_var + eps)
    with torch.no_grad():
        r = rstd.detach()
        shift, scale = noise_fn((mean.detach() - batch_mean.detach()) * r, var.detach() * r * r)
        s = _as_strength(strength, shift)
        inv = torch.pow(scale, -s) if scale_noise else torch.ones_like(scale)
        offset = s * shift * inv if shift_noise else torch.zeros_like(shift)
    a = rstd * inv.to(rstd.dtype)
    d = -batch_mean * a - offset.to(rstd.dtype)
    return _with_affine(a, d, weight, bias)


def ghost_statistics_coefficients(
    mean: Tensor,
    var: Tensor,
    ghost_mean: Tensor,
    ghost_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``(A, D)`` normalizing each sample by statistics between the batch's (``s = 0``) and its ghost's (``s = 1``).

    With ``shift = ghost_mean - batch_mean`` and ``ratio = std_ghost / std_batch`` the sample is
    normalized by ``batch_mean + s * shift`` and ``std_batch * ratio**s``: at ``s = 1`` exactly by its
    ghost statistics (GBN, XBN). All arguments may carry gradients.
    """
    del mean, var
    std_b = torch.sqrt(batch_var + eps)
    s = _as_strength(strength, ghost_mean)
    mean_eff = batch_mean + s * (ghost_mean - batch_mean) if shift_noise else batch_mean.expand_as(ghost_mean)
    std_eff = std_b * torch.pow(torch.sqrt(ghost_var + eps) / std_b, s) if scale_noise else std_b.expand_as(ghost_var)
    a = 1.0 / std_eff
    return _with_affine(a, -mean_eff * a, weight, bias)


def ghost_averaging_matrix(
    batch_size: int,
    ghost_batch_size: int,
    exclusive: bool = False,
    device: Optional[Union[torch.device, str]] = None,
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
def _cached_ghost_matrix(batch: int, ghost_batch_size: int, exclusive: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`ghost_averaging_matrix`, built once per arguments (read-only: it is shared)."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, also if first asked for in inference mode
        return ghost_averaging_matrix(batch, ghost_batch_size, exclusive, device, dtype)


def _ghost_matrix(batch: int, ghost_batch_size: int, exclusive: bool, like: Tensor) -> Optional[Tensor]:
    """The ghost averaging matrix for :func:`_ghost_average`, or ``None`` where a reshape does its work:
    GBN under ``torch.compile`` with equal ghost batches (inductor fuses the reshape; a matrix product
    is an extern kernel, and the matrix one more). In eager mode the product is faster (fewer small
    ops), and the matrix is cached: rebuilding it took 45-64 us of a GBN/XBN layer's 545-575 us of
    host time on CPU. XBN keeps it: its leave-one-out average through a reshape compiled to slower CPU
    code (1.2-1.3x per layer, ``ab_revisions.py --compile``), and no GPU has timed it yet."""
    n = ghost_batch_size
    compiling = torch.compiler.is_compiling()
    if compiling and batch % n == 0 and not exclusive:
        return None
    build = ghost_averaging_matrix if compiling or batch > _MATRIX_CACHE_MAX_BATCH else _cached_ghost_matrix
    return build(batch, n, exclusive, like.device, like.dtype)


def _ghost_average(
    first: Tensor, second: Tensor, avg: Optional[Tensor], ghost_batch_size: int, exclusive: bool
) -> Tuple[Tensor, Tensor]:
    """``(avg @ first, avg @ second)`` for ``(B, C)`` values: per sample the means over its ghost batch
    (``exclusive``: over the others in it). ``avg`` is symmetric, so these are also its transpose's
    products (the backward's). ``avg=None`` (GBN, equal ghost batches, see :func:`_ghost_matrix`): as
    a reshape, each row separately, which inductor reduces in one kernel."""
    channels = first.shape[1]
    if avg is not None:
        with _autocast_off(avg):
            both = avg @ torch.cat([first, second], 1)  # one product
        return both[:, :channels], both[:, channels:]
    if exclusive:
        raise ValueError("XBN's leave-one-out average takes the matrix (see _ghost_matrix).")
    batch, n = first.shape[0], ghost_batch_size

    def average(values: Tensor) -> Tensor:
        means = values.reshape(batch // n, n, channels).mean(1, keepdim=True)
        return means.expand(batch // n, n, channels).reshape(batch, channels)

    return average(first), average(second)


def _group_statistics(mean: Tensor, var: Tensor, ghost_batch_size: int, exclusive: bool) -> Tuple[Tensor, Tensor]:
    """Per-sample ghost mean and biased variance: of its ghost batch, or (``exclusive``) of the others in it."""
    batch, channels = mean.shape
    centre = mean.detach().mean(0)  # shift for a numerically stable variance
    c = mean - centre
    avg = _ghost_matrix(batch, ghost_batch_size, exclusive, mean)
    g_mean, g_second = _ghost_average(c, var + c * c, avg, ghost_batch_size, exclusive)
    return g_mean + centre, (g_second - g_mean * g_mean).clamp_min(0)


def _ghost_statistics_norm(
    x: Tensor,
    ghost_batch_size: int,
    exclusive: bool,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: float,
    eps: float,
    strength: StrengthLike,
    shift_noise: bool,
    scale_noise: bool,
    channel_dim: int,
    fused: Optional[bool],
    ghost_running: bool = False,
) -> Tensor:
    """GBN (``exclusive=False``) and XBN; ``ghost_running``: the running statistics from the ghost
    batches (:func:`ghost_running_targets`, GBN's ``running_stats="ghost"``), else from the full batch."""
    count = x.numel() // max(x.shape[channel_dim], 1)
    if _use_fused(fused):
        with _autocast_off(x):
            return _GhostStatisticsBatchNorm.apply(
                x, weight, bias, ghost_batch_size, exclusive, running_mean, running_var, momentum, eps, strength,
                shift_noise, scale_noise, channel_dim, ghost_running,
            )
    spatial = _spatial_count(x, channel_dim)

    def coeffs(mean: Tensor, var: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        batch_mean, batch_var = batch_moments(mean, var)
        if ghost_running:
            update_ghost_running_stats(running_mean, running_var, mean, var, ghost_batch_size, spatial, momentum)
        else:
            update_running_stats(running_mean, running_var, batch_mean.detach(), batch_var.detach(), count, momentum)
        g_mean, g_var = _group_statistics(mean, var, ghost_batch_size, exclusive)
        return ghost_statistics_coefficients(
            mean, var, g_mean, g_var, batch_mean, batch_var, w, b, eps, strength, shift_noise, scale_noise
        )

    with _autocast_off(x):
        return moment_affine(x, coeffs, (weight, bias), channel_dim, fused)


def ghost_batch_norm(
    x: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
    fused: Optional[bool] = None,
    *,
    running_stats: Optional[str] = None,
) -> Tensor:
    """Ghost Batch Normalization (training mode): each ghost batch is normalized by its own moments.

    Ghost batches follow :func:`ghost_groups` (consecutive samples, remainder merged into the last
    full ghost batch). Gradients flow through the ghost statistics. ``strength`` interpolates between
    BatchNorm (0) and GBN (1), see :func:`ghost_statistics_coefficients`.

    ``running_stats`` (keyword): where the running statistics come from. ``"ghost"`` (the default,
    ``None``): GBN as published (Hoffer et al.; Keras's ``virtual_batch_size``), the mean over ghost
    batches of their means and of their unbiased variances (:func:`ghost_running_targets`), so eval
    normalizes at the scale training did. ``"batch"``: the full batch's, exactly as plain BatchNorm.

    Example:
        >>> y = ghost_batch_norm(torch.randn(10, 3, 4, 4), 4)
        >>> y.shape
        torch.Size([10, 3, 4, 4])
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}.")
    ghost_running = resolve_running_stats(running_stats, ghost=True) == "ghost"
    return _ghost_statistics_norm(
        x, ghost_batch_size, False, running_mean, running_var, weight, bias, momentum, eps, strength,
        shift_noise, scale_noise, channel_dim, fused, ghost_running,
    )


def exclusive_batch_norm(
    x: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
    fused: Optional[bool] = None,
) -> Tensor:
    """Exclusive Batch Normalization (training mode): leave-one-out ghost statistics.

    Each sample is normalized by the moments of the *other* members of its ghost batch (ghost
    batches as in :func:`ghost_groups`). A ghost batch of one sample (only when the whole batch has
    one sample) falls back to the sample's own moments. Running statistics come from the full batch.

    Example:
        >>> y = exclusive_batch_norm(torch.randn(8, 3, 4, 4), 4)
        >>> y.shape
        torch.Size([8, 3, 4, 4])
    """
    if ghost_batch_size < 2:
        raise ValueError(
            f"XBN needs ghost_batch_size >= 2 (a sample and at least one other), got {ghost_batch_size}."
        )
    return _ghost_statistics_norm(
        x, ghost_batch_size, True, running_mean, running_var, weight, bias, momentum, eps, strength,
        shift_noise, scale_noise, channel_dim, fused,
    )


def ghost_noise_batch_norm(
    x: Tensor,
    noise_fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    strength: StrengthLike = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    channel_dim: int = 1,
    stats_fn: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor, int]]] = None,
    fused: Optional[bool] = None,
) -> Tensor:
    """BatchNorm (training mode, batch statistics) then ghost noise, then the affine: GNI in one pass.

    Args:
        noise_fn: ``(m_hat, v_hat) -> (shift, scale)`` from the per-sample moments of the normalized
            features, e.g. ``lambda m, v: ghost_noise(m, v, indices)``.
        stats_fn: ``(mean, var) -> (batch_mean, batch_var, count)``; defaults to this batch's moments
            (:func:`batch_moments`); ``sync=True`` passes global statistics.

    Example:
        >>> x = torch.randn(16, 3, 4, 4)
        >>> idx = ghost_indices(16, 8, generator=torch.Generator().manual_seed(0))
        >>> y = ghost_noise_batch_norm(x, lambda m, v: ghost_noise(m, v, idx))
        >>> y.shape
        torch.Size([16, 3, 4, 4])
    """
    local_count = x.numel() // max(x.shape[channel_dim], 1)
    if _use_fused(fused) and stats_fn is None:
        # the closed-form path: BatchNorm's own number of passes and a handful of (B, C) ops
        return _GhostNoiseBatchNorm.apply(
            x, weight, bias, noise_fn, running_mean, running_var, momentum, eps, strength, shift_noise, scale_noise,
            channel_dim,
        )

    def coeffs(mean: Tensor, var: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if stats_fn is None:
            batch_mean, batch_var = batch_moments(mean, var)
            count = local_count
        else:
            batch_mean, batch_var, count = stats_fn(mean, var)
        update_running_stats(running_mean, running_var, batch_mean.detach(), batch_var.detach(), count, momentum)
        return noise_coefficients(
            mean, var, batch_mean, batch_var, noise_fn, w, b, eps, strength, shift_noise, scale_noise
        )

    return moment_affine(x, coeffs, (weight, bias), channel_dim, fused)


class _GhostNoiseBatchNorm(torch.autograd.Function):
    """GNI on BatchNorm with a closed-form backward (the same math as :func:`noise_coefficients`).

    Forward: ``A = w * rstd * inv``, ``D = b - mu * A - w * off`` with ``inv = scale**-s`` and
    ``off = s * shift * inv`` (noise: no gradient); ``y = x * A + D``. Backward: with
    ``r0 = sum_s grad_y`` and ``r1 = sum_s grad_y * x`` per (sample, channel), the gradient reaches
    ``x`` through ``A`` and through the batch statistics ``mu`` and ``rstd``:
    ``grad_x = grad_y * A + x * P[c] + Q[c]`` (BatchNorm's own structure).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        noise_fn: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        momentum: float,
        eps: float,
        strength: StrengthLike,
        shift_noise: bool,
        scale_noise: bool,
        channel_dim: int,
    ) -> Tensor:
        count = x.numel() // max(x.shape[channel_dim], 1)
        ctx.channel_dim = channel_dim
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        draws = isinstance(noise_fn, GhostDraws)
        ctx.lay = _kernel_layout(x, channel_dim) if draws else None
        ctx.in_graph = ctx.lay is None and draws and ops.in_graph(x, channel_dim)
        if ctx.lay is not None or ctx.in_graph:
            # CUDA: the same math in Triton kernels (see lightning_ghostnoise.kernels), 3 launches; in a
            # compiled graph (opt-in, lightning_ghostnoise.ops) the coefficient kernel alone, as a custom op
            mv = _stacked_moments(x, channel_dim, ctx.lay)
            draw_args = dict(
                indices=noise_fn.indices, noise_eps=noise_fn.eps, normal=noise_fn.normal, gamma=noise_fn.gamma,
                ghost_batch_size=noise_fn.ghost_batch_size,
            )
            s = _as_strength(strength, mv)
            if ctx.in_graph:  # the running statistics in the graph, from the op's batch mean and rstd (see ops)
                coef, stats = ops.gni_coefficients(mv, weight, bias, s, eps, shift_noise, scale_noise, **draw_args)
                batch_var = stats[1].pow(-2).sub_(eps).clamp_min_(0)  # (rstd = (var + eps)**-0.5: rel. error ~1e-7)
                update_running_stats(running_mean, running_var, stats[0], batch_var, count, momentum, foreach=True)
            else:
                coef, stats = kernels.gni_coefficients(
                    mv, weight, bias, running_mean, running_var, s, count, momentum, eps, shift_noise, scale_noise, **draw_args
                )
            ctx.save_for_backward(x, coef, stats, weight)
            return _rows_affine(x, coef, channel_dim, ctx.lay)
        mean, var = per_sample_moments(x, channel_dim)
        mu = mean.mean(0)
        c = mean - mu
        batch_var = torch.addcmul(var, c, c).mean(0)
        update_running_stats(running_mean, running_var, mu, batch_var, count, momentum)
        rstd = (batch_var + eps).rsqrt()
        if draws:
            # the normalized features' batch moments in closed form, as the CUDA kernel has them
            # (mean c * rstd, variance batch_var * rstd**2 - that**2): no reduction over the batch
            norm_m1 = c.mean(0).mul_(rstd)
            norm_var = (batch_var * rstd.square()).addcmul_(norm_m1, norm_m1, value=-1).clamp_min_(0)
            shift, scale = noise_fn.noise(c * rstd, var * rstd.square(), batch=(norm_m1, norm_var))
        else:
            shift, scale = noise_fn(c.mul_(rstd), var.mul_(rstd.square()))
        s = _as_strength(strength, shift)
        inv = scale.pow(-s) if scale_noise else torch.ones_like(scale)
        off = (shift * inv).mul_(s) if shift_noise else torch.zeros_like(shift)
        w = weight.to(mean.dtype) if weight is not None else None
        # A = w * rstd * inv,  D = b - w * off - mu * A
        a = inv * (rstd if w is None else rstd * w)
        if w is None:
            d = off.neg() if bias is None else bias.to(mean.dtype) - off
        else:
            d = torch.addcmul(bias.to(mean.dtype), w, off, value=-1) if bias is not None else (w * off).neg_()
        d.addcmul_(a, mu, value=-1)
        ctx.save_for_backward(x, a, rstd, inv, off, mu, w)
        return sample_affine(x, a, d, channel_dim)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        _refuse_double_backward()
        channel_dim = ctx.channel_dim
        if ctx.lay is not None or ctx.in_graph:
            x, coef, stats, weight = ctx.saved_tensors
            n = x.numel() // x.shape[1]  # values per channel
            r = _stacked_sums(grad_y, x, channel_dim, ctx.lay)
            input_coefficients = ops.gni_input_coefficients if ctx.in_graph else kernels.gni_input_coefficients
            out = input_coefficients(r, coef, stats, weight, n)  # P, Q, grad_w, grad_b
            grad_x = _rows_input_grad(grad_y, x, coef, out[:2], channel_dim, ctx.lay) if ctx.needs_input_grad[0] else None
            grad_w = out[2] if ctx.has_weight and ctx.needs_input_grad[1] else None
            grad_b = out[3] if ctx.has_bias and ctx.needs_input_grad[2] else None
            return (grad_x, grad_w, grad_b) + (None,) * 9
        x, a, rstd, inv, off, mu, w = ctx.saved_tensors
        n = x.numel() // max(x.shape[channel_dim], 1)  # values per channel
        r0, r1, scratch = _sample_channel_sums(grad_y, x, channel_dim, a.dtype)
        r1 = r1.addcmul_(r0, mu, value=-1)  # A also enters D = b - w * off - mu * A
        u = r1.mul_(inv)
        grad_w = None
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_w = torch.addcmul(u * rstd, r0, off, value=-1).sum(0)
        grad_b = r0.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g_rstd = u.sum(0)
            if ctx.has_weight:
                g_rstd.mul_(w)
            g_mu_neg = (r0 * a).sum(0)  # minus the gradient of the batch mean
            g_var = g_rstd.mul_(rstd.pow(3)).mul_(-0.5)
            p_coef = g_var * (2.0 / n)
            q_coef = torch.addcmul(g_mu_neg, g_var, mu, value=2.0).mul_(-1.0 / n)
            grad_x = _affine_input_grad(grad_y, x, a, p_coef, q_coef, channel_dim, out=scratch)
        # (autograd casts grad_w / grad_b to the parameters' dtype)
        return (grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None)


class _GhostStatisticsBatchNorm(torch.autograd.Function):
    """GBN and XBN with a closed-form backward (the same math as :func:`ghost_statistics_coefficients`).

    With per-sample moments ``m``, ``v``, a detached centre ``k`` (the batch mean), ``c = m - k`` and
    ``e2 = v + c**2``; ghost statistics ``gm = M @ c``, ``gvar = M @ e2 - gm**2`` (``M``: the ghost
    averaging matrix) and batch statistics ``bm = mean(c)``, ``bvar = mean(e2) - bm**2``:
    ``mean_eff = bm + s (gm - bm)``, ``std_eff = std_b**(1 - s) * std_g**s`` and
    ``y = x * A + D`` with ``A = w / std_eff``, ``D = b - (mean_eff + k) A``. The backward chains the
    per-(sample, channel) sums of ``grad_y`` and ``grad_y * x`` through these ``(B, C)`` formulas.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        ghost_batch_size: int,
        exclusive: bool,
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        momentum: float,
        eps: float,
        strength: StrengthLike,
        shift_noise: bool,
        scale_noise: bool,
        channel_dim: int,
        ghost_running: bool = False,
    ) -> Tensor:
        count = x.numel() // max(x.shape[channel_dim], 1)
        ctx.lay = _kernel_layout(x, channel_dim)
        ctx.in_graph = ctx.lay is None and ops.in_graph(x, channel_dim)
        if ctx.lay is not None or ctx.in_graph:
            # CUDA: the same math in Triton kernels (see lightning_ghostnoise.kernels), 3 launches; in a
            # compiled graph (opt-in, lightning_ghostnoise.ops) the coefficient kernel alone, as a custom op
            mv = _stacked_moments(x, channel_dim, ctx.lay)
            s = _as_strength(strength, mv)
            if ctx.in_graph:  # the running statistics in the graph, from the op's batch statistics (see ops)
                per_sample, per_channel = ops.ghost_statistics_coefficients(
                    mv, weight, bias, s, eps, ghost_batch_size, exclusive, shift_noise, scale_noise
                )
                if not ghost_running:
                    batch_mean, batch_var = per_channel[0] + per_channel[1], per_channel[2].clamp_min(0)
                    update_running_stats(
                        running_mean, running_var, batch_mean, batch_var, count, momentum, foreach=True
                    )
            else:
                # the kernel updates the full batch's running statistics; the ghost ones are done below
                kernel_rm, kernel_rv = (None, None) if ghost_running else (running_mean, running_var)
                per_sample, per_channel = kernels.ghost_statistics_coefficients(
                    mv, weight, bias, kernel_rm, kernel_rv, s, count, momentum, eps, ghost_batch_size, exclusive,
                    shift_noise, scale_noise,
                )  # fmt: skip
            if ghost_running:
                spatial = _spatial_count(x, channel_dim)
                update_ghost_running_stats(
                    running_mean, running_var, mv[0], mv[1], ghost_batch_size, spatial, momentum, foreach=True
                )
            ctx.save_for_backward(x, mv, per_sample, per_channel, s)
            ctx.flags = (ghost_batch_size, exclusive, shift_noise, scale_noise, weight is not None, bias is not None, eps)
            ctx.channel_dim = channel_dim
            return _rows_affine(x, per_sample, channel_dim, ctx.lay)  # A and D are its first two rows
        mean, var = per_sample_moments(x, channel_dim)
        centre = mean.mean(0)
        c = mean - centre
        e2 = torch.addcmul(var, c, c)
        avg = _ghost_matrix(mean.shape[0], ghost_batch_size, exclusive, mean)
        gm, ge2 = _ghost_average(c, e2, avg, ghost_batch_size, exclusive)  # the ghost means of c and e2
        bm = c.mean(0)
        bvar_raw = torch.addcmul(e2.mean(0), bm, bm, value=-1)
        if ghost_running:
            spatial = _spatial_count(x, channel_dim)
            update_ghost_running_stats(running_mean, running_var, mean, var, ghost_batch_size, spatial, momentum)
        else:
            update_running_stats(running_mean, running_var, bm + centre, bvar_raw.clamp_min(0), count, momentum)
        s = _as_strength(strength, mean)
        w = weight.to(mean.dtype) if weight is not None else None
        flags = (channel_dim, shift_noise, scale_noise, weight is not None, bias is not None, eps)
        _, a, *_, shifted = _GhostStatisticsBatchNorm.effective(gm, ge2, bm, bvar_raw, centre, s, w, flags)
        d = -(shifted * a) if bias is None else torch.addcmul(bias.to(mean.dtype), shifted, a, value=-1)
        # kept for the backward: three (B, C) rows (mean and the ghost moments); the rest is recomputed
        ctx.save_for_backward(x, mean, gm, ge2, centre, bm, bvar_raw, avg, s, w)
        ctx.flags = flags
        ctx.ghost_batch_size, ctx.exclusive = ghost_batch_size, exclusive
        return sample_affine(x, a, d, channel_dim)

    @staticmethod
    def effective(
        gm: Tensor, ge2: Tensor, bm: Tensor, bvar_raw: Tensor, centre: Tensor, s: Tensor, w: Optional[Tensor], flags: Tuple
    ) -> Tuple[Tensor, ...]:
        """``(gvar_raw, A, std_eff, std_b, std_g, shifted)`` from the ghost moments ``gm``, ``ge2`` ``(B, C)``
        and the batch's (the same operations forward and in the backward's recomputation)."""
        _, shift_noise, scale_noise, _, _, eps = flags
        gvar_raw = torch.addcmul(ge2, gm, gm, value=-1)
        std_b = bvar_raw.clamp_min(0).add_(eps).sqrt_()
        std_g = gvar_raw.clamp_min(0).add_(eps).sqrt_()
        mean_eff = torch.lerp(bm.expand_as(gm), gm, s) if shift_noise else bm.expand_as(gm)
        std_eff = std_b * (std_g / std_b).pow_(s) if scale_noise else std_b.expand_as(gm)
        a = std_eff.reciprocal() if w is None else w / std_eff
        return gvar_raw, a, std_eff, std_b, std_g, mean_eff + centre

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        _refuse_double_backward()
        if ctx.lay is not None or ctx.in_graph:
            x, mv, per_sample, per_channel, s = ctx.saved_tensors
            ghost_batch_size, exclusive, shift_noise, scale_noise, has_weight, has_bias, eps = ctx.flags
            r = _stacked_sums(grad_y, x, ctx.channel_dim, ctx.lay)
            pq, grads = (
                ops.ghost_statistics_input_coefficients if ctx.in_graph else kernels.ghost_statistics_input_coefficients
            )(
                r, mv, per_sample, per_channel, s, _spatial_count(x, 1), eps, ghost_batch_size, exclusive,
                shift_noise, scale_noise,
            )
            grad_x = _rows_input_grad(grad_y, x, per_sample, pq, ctx.channel_dim, ctx.lay) if ctx.needs_input_grad[0] else None
            grad_w = grads[0] if has_weight and ctx.needs_input_grad[1] else None
            grad_b = grads[1] if has_bias and ctx.needs_input_grad[2] else None
            return (grad_x, grad_w, grad_b) + (None,) * 11
        x, mean, gm, ge2, centre, bm, bvar_raw, avg, s, w = ctx.saved_tensors
        channel_dim, shift_noise, scale_noise, has_weight, has_bias, _ = ctx.flags
        effective = _GhostStatisticsBatchNorm.effective(gm, ge2, bm, bvar_raw, centre, s, w, ctx.flags)
        gvar_raw, a, std_eff, std_b, std_g, shifted = effective
        c = mean - centre
        batch = mean.shape[0]
        r0, r1, scratch = _sample_channel_sums(grad_y, x, channel_dim, mean.dtype)
        grad_b = r0.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        # D = b - shifted * A: the gradient reaching A and the effective mean
        g_a = r1.addcmul_(shifted, r0, value=-1)
        g_mean_eff = (r0 * a).neg_()
        grad_w = (g_a / std_eff).sum(0) if has_weight and ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # A = w / std_eff
            g_std_eff = (g_a * a).div_(std_eff).neg_()
            if scale_noise:
                # std_eff = std_b**(1 - s) * std_g**s
                t = g_std_eff * std_eff
                g_std_b = (t.sum(0) / std_b).mul_(1 - s)
                g_std_g = t.div_(std_g).mul_(s)
            else:
                g_std_b = g_std_eff.sum(0)
                g_std_g = torch.zeros_like(g_std_eff)
            # std = sqrt(max(var, 0) + eps)
            g_bvar = g_std_b.div_(2 * std_b).mul_(bvar_raw >= 0)
            g_gvar = g_std_g.div_(2 * std_g).mul_(gvar_raw >= 0)
            if shift_noise:  # mean_eff = bm + s (gm - bm)
                g_bm = g_mean_eff.sum(0).mul_(1 - s)
                g_gm = g_mean_eff.mul_(s)
            else:
                g_bm = g_mean_eff.sum(0)
                g_gm = torch.zeros_like(g_mean_eff)
            # gvar = ge2 - gm**2, bvar = be2 - bm**2
            g_gm.addcmul_(gm, g_gvar, value=-2)
            g_bm.addcmul_(bm, g_bvar, value=-2)
            # gm = M @ c, ge2 = M @ e2; bm = mean(c), be2 = mean(e2)
            back_c, back_e2 = _ghost_average(g_gm, g_gvar, avg, ctx.ghost_batch_size, ctx.exclusive)  # avg.t() @ ...
            g_c = back_c.add_(g_bm / batch)
            g_e2 = back_e2.add_(g_bvar / batch)
            # e2 = v + c**2; c = m - centre (centre detached)
            g_m = g_c.addcmul_(c, g_e2, value=2)
            count = _spatial_count(x, channel_dim)
            p_coef = g_e2 * (2.0 / count)  # v = mean_s (x - m)**2
            q_coef = (g_m / count).addcmul_(p_coef, mean, value=-1)
            grad_x = _affine_input_grad(grad_y, x, a, p_coef, q_coef, channel_dim, out=scratch)
        return (grad_x, grad_w, grad_b) + (None,) * 11
