"""The generic fused BatchNorm-family function: ``y = x * A + D`` with any coefficients of the moments.

Used where no closed-form backward exists (``sync=True``: global batch statistics): the small
``(B, C)`` graph of the coefficients is differentiated by autograd inside the backward.

Example:
    >>> import torch
    >>> def standardize(mean, var):
    ...     return torch.rsqrt(var + 1e-5), -mean * torch.rsqrt(var + 1e-5)
    >>> y = moment_affine(torch.randn(2, 3, 8, requires_grad=True), standardize)
    >>> bool(y.mean(-1).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ghostnoise.backends.dispatch import select
from lightning_ghostnoise.backends.torch_passes import (
    passes_for,
    refuse_double_backward,
)
from lightning_ghostnoise.functional import affine as _reference
from lightning_ghostnoise.functional._common import spatial_count
from lightning_ghostnoise.functional.affine import CoeffFn

__all__ = ["moment_affine"]


class _MomentAffine(torch.autograd.Function):
    """``y = x * A + D`` with ``(A, D) = coeff_fn(mean, var, *params)`` of ``x``'s per-sample moments.

    Two passes over ``x`` forward (moments, affine) and two backward (the per-(sample, channel)
    reductions, then ``grad_x = grad_y * A + x * P + Q``), as many as BatchNorm's own kernels, whatever
    the method: the method only changes the small ``(B, C)`` graph of ``coeff_fn``, which is
    differentiated by autograd inside :meth:`backward`.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, passes: Any, channel_dim: int, coeff_fn: CoeffFn, *params: Tensor | None
    ) -> Tensor:
        ctx.passes = passes
        mean, var = passes.moments(x, channel_dim)
        with torch.enable_grad():
            m = mean.detach().requires_grad_()
            v = var.detach().requires_grad_()
            leaves = [None if p is None else p.detach().requires_grad_(p.requires_grad) for p in params]
            a, d = coeff_fn(m, v, *leaves)
        ctx.save_for_backward(x)
        ctx.graph = (m, v, leaves, a, d)
        ctx.channel_dim = channel_dim
        ad = torch.stack([a.detach(), d.detach()])
        return passes.affine(x, ad.float() if passes.kernels else ad, channel_dim)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        (x,) = ctx.saved_tensors
        m, v, leaves, a, d = ctx.graph
        channel_dim = ctx.channel_dim
        r0, r1 = ctx.passes.channel_sums(grad_y, x, channel_dim, m.dtype)
        inputs = [m, v] + [p for p in leaves if p is not None and p.requires_grad]
        # the small (B, C) graph is kept (retain_graph) so that backward through y may run twice
        grads = torch.autograd.grad((a, d), inputs, (r1, r0), allow_unused=True, retain_graph=True)
        gm = grads[0] if grads[0] is not None else torch.zeros_like(m)
        gv = grads[1] if grads[1] is not None else torch.zeros_like(v)
        count = spatial_count(x, channel_dim)
        p_coef = 2.0 * gv / count
        q_coef = gm / count - p_coef * m
        grad_x = None
        if ctx.needs_input_grad[0]:
            a_rows, pq = a.detach()[None], torch.stack([p_coef, q_coef])
            if ctx.passes.kernels:  # the kernel reads contiguous float32 rows
                a_rows, pq = a_rows.float().contiguous(), pq.float()
            grad_x = ctx.passes.input_grad(grad_y, x, a_rows, pq, channel_dim)
        param_grads: list[Tensor | None] = []
        it = iter(grads[2:])
        for p in leaves:
            param_grads.append(next(it) if p is not None and p.requires_grad else None)
        return (grad_x, None, None, None, *param_grads)


def moment_affine(
    x: Tensor, coeff_fn: CoeffFn, params: Sequence[Tensor | None] = (), channel_dim: int = 1, fused: bool | None = None
) -> Tensor:
    """``x * A[b, c] + D[b, c]`` where ``(A, D) = coeff_fn(mean, var, *params)`` and ``mean``/``var`` are
    ``x``'s per-sample moments (:func:`~lightning_ghostnoise.functional.moments.per_sample_moments`); gradients flow through everything.

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
    choice = select(x, channel_dim, fused=fused, closed_form=False)
    if choice.backend == "autograd":
        return _reference.moment_affine(x, coeff_fn, params, channel_dim)
    return _MomentAffine.apply(x, passes_for(choice.backend, x), channel_dim, coeff_fn, *params)
