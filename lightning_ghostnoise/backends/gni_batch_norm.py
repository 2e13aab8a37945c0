"""GNI on BatchNorm, fused: BatchNorm's own number of full-size passes and a closed-form backward.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.functional import GhostDraws, ghost_indices
    >>> x = torch.randn(16, 3, 4, 4, requires_grad=True)
    >>> idx = ghost_indices(16, 8, generator=torch.Generator().manual_seed(0))
    >>> ghost_noise_batch_norm(x, GhostDraws(indices=idx)).shape
    torch.Size([16, 3, 4, 4])
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_ghostnoise.backends import triton
from lightning_ghostnoise.backends.dispatch import select
from lightning_ghostnoise.backends.moment_affine import moment_affine
from lightning_ghostnoise.backends.torch_passes import (
    affine_input_grad,
    passes_for,
    refuse_double_backward,
    sample_channel_sums,
)
from lightning_ghostnoise.functional._common import StrengthLike, as_strength
from lightning_ghostnoise.functional.affine import sample_affine
from lightning_ghostnoise.functional.batch_norm import gni_batch_norm, gni_coeff_fn
from lightning_ghostnoise.functional.moments import per_sample_moments
from lightning_ghostnoise.functional.noise import GhostDraws, noise_fold
from lightning_ghostnoise.functional.running_stats import update_running_stats

__all__ = ["ghost_noise_batch_norm"]


def ghost_noise_batch_norm(
    x: Tensor,
    noise_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
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
    stats_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int]] | None = None,
    fused: bool | None = None,
) -> Tensor:
    """BatchNorm (training mode, batch statistics) then ghost noise, then the affine: GNI in one pass.

    Args:
        noise_fn: ``(m_hat, v_hat) -> (shift, scale)`` from the per-sample moments of the normalized
            features, e.g. ``lambda m, v: ghost_noise(m, v, indices)``.
        stats_fn: ``(mean, var) -> (batch_mean, batch_var, count)``; defaults to this batch's moments
            (:func:`batch_moments`); ``sync=True`` passes global statistics.

    Example:
        >>> x = torch.randn(16, 3, 4, 4)
        >>> from lightning_ghostnoise.functional import ghost_indices, ghost_noise
        >>> idx = ghost_indices(16, 8, generator=torch.Generator().manual_seed(0))
        >>> y = ghost_noise_batch_norm(x, lambda m, v: ghost_noise(m, v, idx))
        >>> y.shape
        torch.Size([16, 3, 4, 4])
    """
    if stats_fn is not None:  # sync=True: the generic fused function over the global statistics
        coeffs = gni_coeff_fn(
            x,
            noise_fn,
            running_mean,
            running_var,
            momentum,
            eps,
            strength,
            shift_noise,
            scale_noise,
            channel_dim,
            stats_fn,
        )
        return moment_affine(x, coeffs, (weight, bias), channel_dim, fused)
    choice = select(x, channel_dim, fused=fused, kernels=isinstance(noise_fn, GhostDraws))
    if choice.backend == "autograd":
        return gni_batch_norm(
            x,
            noise_fn,
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
        )
    return _GhostNoiseBatchNorm.apply(
        x, weight, bias, noise_fn, running_mean, running_var, momentum, eps, strength, shift_noise, scale_noise,
        channel_dim, choice.backend,
    )  # fmt: skip


class _GhostNoiseBatchNorm(torch.autograd.Function):
    """GNI on BatchNorm with a closed-form backward (the same math as :func:`noise_coefficients`).

    Forward: ``A = w * rstd * inv``, ``D = b - mu * A - w * off`` with ``inv = scale**-s`` and
    ``off = s * shift * inv`` (noise: no gradient); ``y = x * A + D``. Backward: with
    ``r0 = sum_s grad_y`` and ``r1 = sum_s grad_y * x`` per (sample, channel), the gradient reaches
    ``x`` through ``A`` and through the batch statistics ``mu`` and ``rstd``:
    ``grad_x = grad_y * A + x * P[c] + Q[c]`` (BatchNorm's own structure).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        noise_fn: Any,  # a GhostDraws (the kernels read its draws) or any (m_hat, v_hat) -> (shift, scale)
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        strength: StrengthLike,
        shift_noise: bool,
        scale_noise: bool,
        channel_dim: int,
        backend: str,
    ) -> Tensor:
        count = x.numel() // max(x.shape[channel_dim], 1)
        ctx.channel_dim = channel_dim
        ctx.has_weight = weight is not None
        ctx.has_bias = bias is not None
        draws = isinstance(noise_fn, GhostDraws)
        ctx.in_graph = backend == "triton-ops"
        ctx.kernels = backend in ("triton", "triton-ops")
        if ctx.kernels:
            ctx.passes = passes = passes_for(backend, x)
            # CUDA: the same math in Triton kernels (see lightning_ghostnoise.kernels), 3 launches; in a
            # compiled graph (opt-in, lightning_ghostnoise.ops) the coefficient kernel alone, as a custom op
            mv = passes.moments(x, channel_dim)
            draw_args = {
                "indices": noise_fn.indices,
                "noise_eps": noise_fn.eps,
                "normal": noise_fn.normal,
                "gamma": noise_fn.gamma,
                "ghost_batch_size": noise_fn.ghost_batch_size,
            }
            s = as_strength(strength, mv)
            if ctx.in_graph:  # the running statistics in the graph, from the op's batch mean and rstd (see ops)
                coef, stats = triton.load_custom_ops().gni_coefficients(
                    mv, weight, bias, s, eps, shift_noise, scale_noise, **draw_args
                )
                batch_var = stats[1].pow(-2).sub_(eps).clamp_min_(0)  # (rstd = (var + eps)**-0.5: rel. error ~1e-7)
                update_running_stats(running_mean, running_var, stats[0], batch_var, count, momentum, foreach=True)
            else:
                coef, stats = triton.load_gni().gni_coefficients(
                    mv,
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    s,
                    count,
                    momentum,
                    eps,
                    shift_noise,
                    scale_noise,
                    **draw_args,
                )
            ctx.save_for_backward(x, coef, stats, weight)
            return passes.affine(x, coef, channel_dim)
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
        inv, off = noise_fold(shift, scale, strength, shift_noise, scale_noise)
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
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward()
        channel_dim = ctx.channel_dim
        if ctx.kernels:
            x, coef, stats, weight = ctx.saved_tensors
            n = x.numel() // x.shape[1]  # values per channel
            r = ctx.passes.channel_sums(grad_y, x, channel_dim)
            input_coefficients = (
                triton.load_custom_ops() if ctx.in_graph else triton.load_gni()
            ).gni_input_coefficients
            out = input_coefficients(r, coef, stats, weight, n)  # P, Q, grad_w, grad_b
            grad_x = ctx.passes.input_grad(grad_y, x, coef, out[:2], channel_dim) if ctx.needs_input_grad[0] else None
            grad_w = out[2] if ctx.has_weight and ctx.needs_input_grad[1] else None
            grad_b = out[3] if ctx.has_bias and ctx.needs_input_grad[2] else None
            return (grad_x, grad_w, grad_b) + (None,) * 10
        x, a, rstd, inv, off, mu, w = ctx.saved_tensors
        n = x.numel() // max(x.shape[channel_dim], 1)  # values per channel
        r0, r1, scratch = sample_channel_sums(grad_y, x, channel_dim, a.dtype)
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
            grad_x = affine_input_grad(grad_y, x, a, p_coef, q_coef, channel_dim, out=scratch)
        # (autograd casts grad_w / grad_b to the parameters' dtype)
        return (grad_x, grad_w, grad_b) + (None,) * 10
