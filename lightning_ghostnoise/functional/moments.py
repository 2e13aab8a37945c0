"""Per-sample and batch moments: the statistics every method starts from.

Notation: ``x`` has a batch dimension 0 and a channel dimension (``channel_dim``, 1 for BatchNorm and
GroupNorm, -1 for LayerNorm over the last dimension); every other dimension is "spatial" (pixels,
time steps, tokens). Per-sample moments are taken over the spatial dimensions, in float32.

Example:
    >>> import torch
    >>> mean, var = per_sample_moments(torch.randn(8, 3, 4, 4))
    >>> batch_mean, batch_var = batch_moments(mean, var)
    >>> batch_mean.shape
    torch.Size([3])
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ghostnoise.functional._common import spatial_dims

__all__ = ["batch_moments", "per_sample_moments"]


def per_sample_moments(x: Tensor, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
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
    dims = spatial_dims(x, channel_dim)
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


def batch_chunks(x: Tensor, itemsize: int) -> int:
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


def _square_sums(x: Tensor, dims: tuple[int, ...], acc: torch.dtype) -> Tensor:
    """``(x**2).sum(dims)`` accumulated in ``acc``, through a bounded temporary (:func:`_batch_chunks`)."""
    itemsize = torch.empty((), dtype=acc).element_size()
    n = batch_chunks(x, itemsize)
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


def batch_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
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
