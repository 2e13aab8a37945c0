"""The per-(sample, channel) affine ``y = x * A[b, c] + D[b, c]`` that every method ends with.

Every method of the BatchNorm family is one pair of coefficients ``(A, D)`` computed from the
per-sample moments (:func:`moment_affine`); GNI after LayerNorm/GroupNorm folds its noise and the
layer's affine into one such pair (:func:`lightning_ghostnoise.functional.noise.apply_noise`).

Example:
    >>> import torch
    >>> x = torch.ones(2, 3, 4)
    >>> sample_affine(x, torch.full((2, 3), 2.0), torch.ones(2, 3)).unique()
    tensor([3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from lightning_ghostnoise.functional.moments import per_sample_moments

__all__ = ["broadcast_channels", "moment_affine", "sample_affine", "with_affine"]

CoeffFn = Callable[..., tuple[Tensor, Tensor]]


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


def inner_broadcast(x: Tensor, channel_dim: int, *others: Tensor) -> bool:
    """Whether per-(sample, channel) coefficients broadcast along the innermost dimension of a
    contiguous CPU ``x``: then two passes of one broadcast operand each (``x * A`` then ``+= D``)
    run faster than one ``addcmul`` with two (see docs/performance.md, "How it is implemented")."""
    if x.device.type != "cpu" or x.dim() < 3 or x.shape[-1] == 1 or channel_dim % x.dim() == x.dim() - 1:
        return False
    if torch.compiler.is_compiling():
        # an eager-mode choice (the compiler fuses either form); torch 2.4's compiler cannot trace
        # ``is_contiguous`` inside an autograd function (an illegal call in its strict mode)
        return False
    return x.is_contiguous() and all(t.is_contiguous() for t in others)


def sample_affine(x: Tensor, a: Tensor, d: Tensor, channel_dim: int = 1, *, in_place: bool = False) -> Tensor:
    """``x * a[b, c] + d[b, c]`` in ``x``'s dtype.

    Args:
        x: the input, any memory format.
        a, d: ``(B, C)`` coefficients.
        channel_dim: the channel dimension of ``x``.
        in_place: write the result over ``x`` (a temporary of the caller, outside autograd).

    Example:
        >>> sample_affine(torch.ones(2, 3), torch.full((2, 3), 2.0), torch.zeros(2, 3)).sum()
        tensor(12.)
    """
    a, d = broadcast_channels(a.to(x.dtype), x, channel_dim), broadcast_channels(d.to(x.dtype), x, channel_dim)
    if inner_broadcast(x, channel_dim):
        return (x.mul_(a) if in_place else torch.mul(x, a)).add_(d)
    return torch.addcmul(d, x, a, out=x) if in_place else torch.addcmul(d, x, a)


def with_affine(a: Tensor, d: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(A * w, D * w + b)``: a per-(sample, channel) affine followed by the layer's per-channel one.

    Example:
        >>> a, d = with_affine(torch.ones(2, 3), torch.zeros(2, 3), torch.full((3,), 2.0), torch.ones(3))
        >>> a[0].tolist(), d[0].tolist()
        ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    """
    if weight is not None:
        w = weight.to(a.dtype)
        a, d = a * w, d * w
    if bias is not None:
        d = d + bias.to(a.dtype)
    return a, d


def moment_affine(x: Tensor, coeff_fn: CoeffFn, params: Sequence[Tensor | None] = (), channel_dim: int = 1) -> Tensor:
    """``x * A[b, c] + D[b, c]`` where ``(A, D) = coeff_fn(mean, var, *params)`` and ``mean``/``var`` are
    ``x``'s per-sample moments (:func:`per_sample_moments`); gradients flow through everything.

    Every BatchNorm-family method is one ``coeff_fn``; the fused autograd function of
    :func:`lightning_ghostnoise.backends.moment_affine` computes the same forward in fewer passes.

    Example:
        >>> def standardize(mean, var):
        ...     return torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5)
        >>> y = moment_affine(torch.randn(2, 3, 8), standardize)
        >>> bool(y.mean(-1).abs().max() < 1e-5)
        True
    """
    mean, var = per_sample_moments(x, channel_dim)
    a, d = coeff_fn(mean, var, *params)
    return sample_affine(x, a, d, channel_dim)
