"""GBN and XBN, fused: BatchNorm's own number of full-size passes and a closed-form backward.

Example:
    >>> import torch
    >>> ghost_batch_norm(torch.randn(10, 3, 4, 4, requires_grad=True), 4).shape
    torch.Size([10, 3, 4, 4])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ghostnoise.backends import triton
from lightning_ghostnoise.backends.dispatch import select
from lightning_ghostnoise.backends.torch_passes import (
    affine_input_grad,
    passes_for,
    refuse_double_backward,
    sample_channel_sums,
)
from lightning_ghostnoise.functional._common import (
    StrengthLike,
    as_strength,
    autocast_off,
    spatial_count,
)
from lightning_ghostnoise.functional.affine import sample_affine
from lightning_ghostnoise.functional.batch_norm import (
    effective_statistics,
    ghost_average,
    ghost_matrix,
    ghost_statistics_batch_norm,
)
from lightning_ghostnoise.functional.moments import per_sample_moments
from lightning_ghostnoise.functional.running_stats import (
    resolve_running_stats,
    update_ghost_running_stats,
    update_running_stats,
)

__all__ = ["exclusive_batch_norm", "ghost_batch_norm"]


def _ghost_statistics_norm(
    x: Tensor,
    ghost_batch_size: int,
    exclusive: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    strength: StrengthLike,
    shift_noise: bool,
    scale_noise: bool,
    channel_dim: int,
    fused: bool | None,
    ghost_running: bool = False,
) -> Tensor:
    """GBN (``exclusive=False``) and XBN; ``ghost_running``: the running statistics from the ghost
    batches (:func:`~lightning_ghostnoise.functional.running_stats.ghost_running_targets`, GBN's ``running_stats="ghost"``), else from the full batch."""
    choice = select(x, channel_dim, fused=fused)
    if choice.backend == "autograd":
        return ghost_statistics_batch_norm(
            x, ghost_batch_size, exclusive, running_mean, running_var, weight, bias, momentum, eps, strength,
            shift_noise, scale_noise, channel_dim, ghost_running,
        )  # fmt: skip
    with autocast_off(x):
        return _GhostStatisticsBatchNorm.apply(
            x, weight, bias, ghost_batch_size, exclusive, running_mean, running_var, momentum, eps, strength,
            shift_noise, scale_noise, channel_dim, ghost_running, choice.backend,
        )  # fmt: skip


def ghost_batch_norm(
    x: Tensor,
    ghost_batch_size: int,
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
    fused: bool | None = None,
    *,
    running_stats: str | None = None,
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
        x,
        ghost_batch_size,
        False,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        strength,
        shift_noise,
        scale_noise,
        channel_dim,
        fused,
        ghost_running,
    )


def exclusive_batch_norm(
    x: Tensor,
    ghost_batch_size: int,
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
    fused: bool | None = None,
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
        raise ValueError(f"XBN needs ghost_batch_size >= 2 (a sample and at least one other), got {ghost_batch_size}.")
    return _ghost_statistics_norm(
        x,
        ghost_batch_size,
        True,
        running_mean,
        running_var,
        weight,
        bias,
        momentum,
        eps,
        strength,
        shift_noise,
        scale_noise,
        channel_dim,
        fused,
    )


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
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        ghost_batch_size: int,
        exclusive: bool,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        strength: StrengthLike,
        shift_noise: bool,
        scale_noise: bool,
        channel_dim: int,
        ghost_running: bool,
        backend: str,
    ) -> Tensor:
        count = x.numel() // max(x.shape[channel_dim], 1)
        ctx.in_graph = backend == "triton-ops"
        ctx.kernels = backend in ("triton", "triton-ops")
        if ctx.kernels:
            ctx.passes = passes = passes_for(backend, x)
            # CUDA: the same math in Triton kernels (see lightning_ghostnoise.kernels), 3 launches; in a
            # compiled graph (opt-in, lightning_ghostnoise.ops) the coefficient kernel alone, as a custom op
            mv = passes.moments(x, channel_dim)
            s = as_strength(strength, mv)
            if ctx.in_graph:  # the running statistics in the graph, from the op's batch statistics (see ops)
                per_sample, per_channel = triton.load_custom_ops().ghost_statistics_coefficients(
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
                per_sample, per_channel = triton.load_ghost_statistics().ghost_statistics_coefficients(
                    mv, weight, bias, kernel_rm, kernel_rv, s, count, momentum, eps, ghost_batch_size, exclusive,
                    shift_noise, scale_noise,
                )  # fmt: skip
            if ghost_running:
                spatial = spatial_count(x, channel_dim)
                update_ghost_running_stats(
                    running_mean, running_var, mv[0], mv[1], ghost_batch_size, spatial, momentum, foreach=True
                )
            ctx.save_for_backward(x, mv, per_sample, per_channel, s)
            ctx.flags = (
                ghost_batch_size,
                exclusive,
                shift_noise,
                scale_noise,
                weight is not None,
                bias is not None,
                eps,
            )
            ctx.channel_dim = channel_dim
            return passes.affine(x, per_sample, channel_dim)  # A and D are its first two rows
        mean, var = per_sample_moments(x, channel_dim)
        centre = mean.mean(0)
        c = mean - centre
        e2 = torch.addcmul(var, c, c)
        avg = ghost_matrix(mean.shape[0], ghost_batch_size, exclusive, mean)
        gm, ge2 = ghost_average(c, e2, avg, ghost_batch_size, exclusive)  # the ghost means of c and e2
        bm = c.mean(0)
        bvar_raw = torch.addcmul(e2.mean(0), bm, bm, value=-1)
        if ghost_running:
            spatial = spatial_count(x, channel_dim)
            update_ghost_running_stats(running_mean, running_var, mean, var, ghost_batch_size, spatial, momentum)
        else:
            update_running_stats(running_mean, running_var, bm + centre, bvar_raw.clamp_min(0), count, momentum)
        s = as_strength(strength, mean)
        w = weight.to(mean.dtype) if weight is not None else None
        flags = (channel_dim, shift_noise, scale_noise, weight is not None, bias is not None, eps)
        _, a, *_, shifted = effective_statistics(gm, ge2, bm, bvar_raw, centre, s, w, eps, shift_noise, scale_noise)
        d = -(shifted * a) if bias is None else torch.addcmul(bias.to(mean.dtype), shifted, a, value=-1)
        # kept for the backward: three (B, C) rows (mean and the ghost moments); the rest is recomputed
        ctx.save_for_backward(x, mean, gm, ge2, centre, bm, bvar_raw, avg, s, w)
        ctx.flags = flags
        ctx.ghost_batch_size, ctx.exclusive = ghost_batch_size, exclusive
        return sample_affine(x, a, d, channel_dim)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        if ctx.kernels:
            x, mv, per_sample, per_channel, s = ctx.saved_tensors
            ghost_batch_size, exclusive, shift_noise, scale_noise, has_weight, has_bias, eps = ctx.flags
            r = ctx.passes.channel_sums(grad_y, x, ctx.channel_dim)
            pq, grads = (
                (
                    triton.load_custom_ops() if ctx.in_graph else triton.load_ghost_statistics()
                ).ghost_statistics_input_coefficients
            )(
                r,
                mv,
                per_sample,
                per_channel,
                s,
                spatial_count(x, 1),
                eps,
                ghost_batch_size,
                exclusive,
                shift_noise,
                scale_noise,
            )
            grad_x = (
                ctx.passes.input_grad(grad_y, x, per_sample, pq, ctx.channel_dim) if ctx.needs_input_grad[0] else None
            )
            grad_w = grads[0] if has_weight and ctx.needs_input_grad[1] else None
            grad_b = grads[1] if has_bias and ctx.needs_input_grad[2] else None
            return (grad_x, grad_w, grad_b) + (None,) * 12
        x, mean, gm, ge2, centre, bm, bvar_raw, avg, s, w = ctx.saved_tensors
        channel_dim, shift_noise, scale_noise, has_weight, has_bias, _ = ctx.flags
        effective = effective_statistics(gm, ge2, bm, bvar_raw, centre, s, w, ctx.flags[5], shift_noise, scale_noise)
        gvar_raw, a, std_eff, std_b, std_g, shifted = effective
        c = mean - centre
        batch = mean.shape[0]
        r0, r1, scratch = sample_channel_sums(grad_y, x, channel_dim, mean.dtype)
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
            back_c, back_e2 = ghost_average(g_gm, g_gvar, avg, ctx.ghost_batch_size, ctx.exclusive)  # avg.t() @ ...
            g_c = back_c.add_(g_bm / batch)
            g_e2 = back_e2.add_(g_bvar / batch)
            # e2 = v + c**2; c = m - centre (centre detached)
            g_m = g_c.addcmul_(c, g_e2, value=2)
            count = spatial_count(x, channel_dim)
            p_coef = g_e2 * (2.0 / count)  # v = mean_s (x - m)**2
            q_coef = (g_m / count).addcmul_(p_coef, mean, value=-1)
            grad_x = affine_input_grad(grad_y, x, a, p_coef, q_coef, channel_dim, out=scratch)
        return (grad_x, grad_w, grad_b) + (None,) * 12
