"""GNI after LayerNorm or GroupNorm, fused: keeps what the plain norm layer keeps for the backward.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.functional import GhostDraws, ghost_indices
    >>> x = torch.randn(8, 5, 6, requires_grad=True)
    >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
    >>> normalized_noise(x, NativeLayerNorm((6,)), GhostDraws(indices=idx), channel_dim=-1).shape
    torch.Size([8, 5, 6])
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_ghostnoise.backends.dispatch import select
from lightning_ghostnoise.backends.native_norm import NativeLayerNorm, NativeNorm  # noqa: F401  (doctest)
from lightning_ghostnoise.backends.torch_passes import (
    fits,
    refuse_double_backward,
    sample_channel_sums,
    shares_memory,
)
from lightning_ghostnoise.functional._common import (
    StrengthLike,
    autocast_off,
    autocast_state,
    spatial_dims,
)
from lightning_ghostnoise.functional.affine import (
    broadcast_channels,
    sample_affine,
    with_affine,
)
from lightning_ghostnoise.functional.moments import batch_chunks
from lightning_ghostnoise.functional.noise import (
    gni_normalized,
    noise_fold,
    noise_moments,
)

__all__ = ["normalized_noise"]

_NATIVE_DTYPES = (torch.float32, torch.float64)


def normalized_noise(
    x: Tensor,
    normalize: Callable[[Tensor], Tensor],
    noise_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    strength: StrengthLike = 1.0,
    channel_dim: int = 1,
    shift_noise: bool = True,
    scale_noise: bool = True,
    fused: bool | None = None,
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
        >>> from lightning_ghostnoise.functional import GhostDraws, ghost_indices
        >>> x = torch.randn(8, 5, 6)
        >>> idx = ghost_indices(8, 4, generator=torch.Generator().manual_seed(0))
        >>> normalized_noise(x, NativeLayerNorm((6,)), GhostDraws(indices=idx), channel_dim=-1).shape
        torch.Size([8, 5, 6])
    """
    if select(x, channel_dim, fused=fused, closed_form=False, kernels=False).backend == "autograd":
        return gni_normalized(x, normalize, noise_fn, weight, bias, strength, channel_dim, shift_noise, scale_noise)
    return _NormalizedNoise.apply(x, weight, bias, normalize, noise_fn, strength, channel_dim, shift_noise, scale_noise)


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
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        normalize: Callable[[Tensor], Tensor],
        noise_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        strength: StrengthLike,
        channel_dim: int,
        shift_noise: bool,
        scale_noise: bool,
    ) -> Tensor:
        ctx.autocast = autocast_state(x.device.type)
        ctx.input_dtype = x.dtype
        # the native statistics where the norm computes in float32/float64 (after autocast's cast,
        # if any): PyTorch's CPU LayerNorm backward sums a bfloat16 input's weight gradient in low
        # precision (abs. error 2.1 against the recomputing path's 0.15 on a gradient of 62, (32, 16, 64))
        x_in = x
        if isinstance(normalize, NativeNorm) and ctx.autocast is not None:
            x_in = x.to(normalize.input_dtype(x))  # autocast's own cast (none on CPU for these norms)
        ctx.native = isinstance(normalize, NativeNorm) and x_in.dtype in _NATIVE_DTYPES
        if ctx.native:
            with autocast_off(x_in):  # (the input is already in the dtype autocast gives the norm)
                x_hat, mean, rstd = normalize.forward(x_in)  # type: ignore[attr-defined]  # a NativeNorm when native
            stats: tuple[Tensor, ...] = (mean, rstd)
        else:
            x_in, stats = x, ()
            x_hat = normalize(x)
        shift, scale = noise_fn(*noise_moments(noise_fn, x_hat, channel_dim))
        inv, off = noise_fold(shift, scale, strength, shift_noise, scale_noise)
        d = off.neg_() if shift_noise else off  # (off is this function's own: x_hat * inv + d)
        # the native path keeps the norm's input (x, or autocast's float32 copy, as the plain layer does)
        ctx.save_for_backward(x_in, inv, d, weight, *stats)
        ctx.normalize, ctx.channel_dim, ctx.has_bias = normalize, channel_dim, bias is not None
        ctx.shift_noise, ctx.scale_noise = shift_noise, scale_noise
        # x_hat is this function's own temporary (unless normalize returned x's memory): y takes its memory
        own = not shares_memory(x_hat, x) and not shares_memory(x_hat, x_in)
        return sample_affine(x_hat, *with_affine(inv, d, weight, bias), channel_dim, in_place=own)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        if ctx.native:
            grads = _NormalizedNoise._native_backward(ctx, grad_y)
        else:
            grads = _NormalizedNoise._recompute_backward(ctx, grad_y)
        # (autograd casts grad_w / grad_b to the parameters' dtype)
        return grads + (None,) * 6

    @staticmethod
    def _native_backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, inv, d, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        r0 = None
        if need_b or (need_w and ctx.shift_noise):
            dims = spatial_dims(grad_y, ctx.channel_dim)
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
        if need_b and r0 is not None:  # r0 is always computed when need_b
            grad_b = r0.sum(0)
        return grad_x, grad_w, grad_b

    @staticmethod
    def _scaled_native_backward(
        ctx: Any, grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, inv: Tensor, w: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The native backward of ``grad_y * inv``, in chunks of the batch where ``grad_y * inv`` would
        be a large temporary on CPU (:func:`_batch_chunks`)."""
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and w is not None
        batch = x.shape[0]
        n = batch_chunks(x, grad_y.element_size())
        inv = broadcast_channels(inv.to(grad_y.dtype), grad_y, ctx.channel_dim)
        # (in the layout the native kernels work in: LayerNorm's copies any other, e.g. a transposed x)
        buf = torch.empty_like(x[:n], dtype=grad_y.dtype, memory_format=ctx.normalize.memory_format(x))
        if n >= batch:
            return ctx.normalize.backward(torch.mul(grad_y, inv, out=buf), x, mean, rstd, w, need_x, need_w)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w: Tensor | None = None
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
    def _recompute_backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, inv, d, weight = ctx.saved_tensors
        device = x.device.type
        autocast = torch.autocast(device, dtype=ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            leaf = x.detach().requires_grad_(ctx.needs_input_grad[0])
            x_hat = ctx.normalize(leaf)
        # LayerNorm's and GroupNorm's backward keep their input, not x_hat: the product takes x_hat's
        # memory (a normalize that keeps its output makes autograd.grad below raise, never silently wrong)
        own = not shares_memory(x_hat, x)
        r0, r1, scratch = sample_channel_sums(grad_y, x_hat.detach(), ctx.channel_dim, inv.dtype, overwrite_x=own)
        grad_w = grad_b = grad_x = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = torch.addcmul(r1 * inv, r0, d).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = r0.sum(0)
        if ctx.needs_input_grad[0]:
            a = inv if weight is None else inv * weight.to(inv.dtype)
            a = broadcast_channels(a.to(x_hat.dtype), x_hat, ctx.channel_dim)
            grad_hat = torch.mul(grad_y, a, out=scratch) if fits(scratch, x_hat) else grad_y * a
            (grad_x,) = torch.autograd.grad(x_hat, leaf, grad_hat)
        return grad_x, grad_w, grad_b
