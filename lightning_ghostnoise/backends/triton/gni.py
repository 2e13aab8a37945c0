"""GNI's coefficient kernels: the forward's ``(B, C)`` math in one launch (batch and running statistics,
the noise from the drawn ghost indices or analytic draws, the folded affine) and the backward's.

They compute :func:`lightning_ghostnoise.functional.noise.ghost_noise`,
:func:`~lightning_ghostnoise.functional.noise.noise_fold` and BatchNorm's statistics in float32; the
tests check them against those functions.
"""

# No `from __future__ import annotations`: the kernels' `tl.constexpr` annotations must be objects (Triton's
# interpreter before 3.4 does not read the string form), and so must the signatures torch's custom_op
# reads before torch 2.5.

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_ghostnoise import config
from lightning_ghostnoise.backends.triton import launcher as _launcher
from lightning_ghostnoise.backends.triton.common import (  # noqa: F401  (jit helpers resolved by name)
    _affine_params,
    _batch_moments,
    _channel_moments,
    _update_running,
)
from lightning_ghostnoise.backends.triton.common import (
    split_channel_moments as _split_channel_moments,
)
from lightning_ghostnoise.backends.triton.layout import SMALL_B as _SMALL_B
from lightning_ghostnoise.backends.triton.layout import SMALL_C as _SMALL_C
from lightning_ghostnoise.backends.triton.layout import cdiv as _cdiv

__all__ = ["gni_coefficients", "gni_input_coefficients"]


@triton.jit
def _gni_coefficients_kernel(
    mv_ptr, cm_ptr, idx_ptr, normal_ptr, gamma_ptr, w_ptr, bias_ptr, rm_ptr, rv_ptr, s_ptr, coef_ptr, stats_ptr,
    B, C, N, sqrt_n, momentum, unbias, eps, noise_eps,
    STATS_GIVEN: tl.constexpr, ANALYTIC: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr, SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    first = tl.program_id(1) * BLOCK_B
    mean_ptr = mv_ptr
    var_ptr = mv_ptr + B * C
    # batch statistics of the channels (computed by every program of the column, or given)
    mu, mean_c, batch_var = _batch_moments(mv_ptr, cm_ptr, cs, cmask, B, C, STATS_GIVEN, BLOCK_B, BLOCK_C)
    rstd = 1.0 / tl.sqrt(batch_var + eps)
    if tl.program_id(1) == 0:  # stats: (2, C), mu then rstd
        tl.store(stats_ptr + cs, mu, mask=cmask)
        tl.store(stats_ptr + C + cs, rstd, mask=cmask)
        if HAS_RUNNING:
            _update_running(rm_ptr, rv_ptr, cs, cmask, mu, batch_var, momentum, unbias)
    # moments of the normalized features: m_hat = (m - mu) rstd, second moment v rstd^2 + m_hat^2
    norm_m1 = mean_c * rstd
    norm_var = tl.maximum(batch_var * rstd * rstd - norm_m1 * norm_m1, 0.0)
    s = tl.load(s_ptr).to(tl.float32)
    w, bias = _affine_params(w_ptr, bias_ptr, cs, cmask, HAS_W, HAS_BIAS, BLOCK_C)
    bs = first + tl.arange(0, BLOCK_B)
    bmask = bs < B
    mask = bmask[:, None] & cmask[None, :]
    out = bs[:, None] * C + cs[None, :]
    if ANALYTIC:  # shift = normal / sqrt(N), scale = sqrt(2 gamma / N)
        shift = tl.load(normal_ptr + out, mask=mask, other=0.0) / sqrt_n
        scale = tl.sqrt((2.0 * tl.load(gamma_ptr + out, mask=mask, other=0.5)) / N)
    else:
        # sums relative to the first member's mean (less cancellation in the ghost variance: a ghost
        # batch of one sample drawn N times has exactly zero ghost variance, as in the float64 formula)
        first_member = tl.load(idx_ptr + bs.to(tl.int64) * N, mask=bmask, other=0).to(tl.int64)
        m0 = tl.load(mean_ptr + first_member[:, None] * C + cs[None, :], mask=mask, other=0.0)
        mh0 = (m0 - mu[None, :]) * rstd[None, :]
        g1 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        g2 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for j in range(N):
            member = tl.load(idx_ptr + bs.to(tl.int64) * N + j, mask=bmask, other=0).to(tl.int64)
            at = member[:, None] * C + cs[None, :]
            m = tl.load(mean_ptr + at, mask=mask, other=0.0)
            v = tl.load(var_ptr + at, mask=mask, other=0.0)
            dh = (m - mu[None, :]) * rstd[None, :] - mh0
            g1 += dh
            g2 += v * (rstd * rstd)[None, :] + dh * dh
        g1 = g1 / N
        ghost_var = tl.maximum(g2 / N - g1 * g1, 0.0)
        shift = (mh0 + g1) - norm_m1[None, :]
        scale = tl.sqrt((ghost_var + noise_eps) / (norm_var[None, :] + noise_eps))
    if SCALE_NOISE:
        inv = tl.where(s == 0.0, 1.0, tl.exp2(-s * tl.log2(scale)))
    else:
        inv = tl.full([BLOCK_B, BLOCK_C], 1.0, tl.float32)
    if SHIFT_NOISE:
        off = s * shift * inv
    else:
        off = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    a = inv * (rstd * w)[None, :]
    d = bias[None, :] - w[None, :] * off - mu[None, :] * a
    # coef: (4, B, C), A, D, inv, off
    tl.store(coef_ptr + out, a, mask=mask)
    tl.store(coef_ptr + B * C + out, d, mask=mask)
    tl.store(coef_ptr + 2 * B * C + out, inv, mask=mask)
    tl.store(coef_ptr + 3 * B * C + out, off, mask=mask)


@triton.jit
def _gni_input_coefficients_kernel(
    r_ptr, coef_ptr, stats_ptr, w_ptr, out_ptr, B, C, count,
    HAS_W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mu = tl.load(stats_ptr + cs, mask=cmask, other=0.0)
    rstd = tl.load(stats_ptr + C + cs, mask=cmask, other=0.0)
    r0_ptr = r_ptr
    r1_ptr = r_ptr + B * C
    a_ptr = coef_ptr
    inv_ptr = coef_ptr + 2 * B * C
    off_ptr = coef_ptr + 3 * B * C
    acc_w = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < B)[:, None] & cmask[None, :]
        at = bs[:, None] * C + cs[None, :]
        r0 = tl.load(r0_ptr + at, mask=mask, other=0.0)
        r1 = tl.load(r1_ptr + at, mask=mask, other=0.0)
        a = tl.load(a_ptr + at, mask=mask, other=0.0)
        inv = tl.load(inv_ptr + at, mask=mask, other=0.0)
        off = tl.load(off_ptr + at, mask=mask, other=0.0)
        # A also enters D = b - w * off - mu * A
        u = (r1 - r0 * mu[None, :]) * inv
        acc_w += u * rstd[None, :] - r0 * off
        acc_b += r0
        acc_r += u
        acc_m += r0 * a
    g_rstd = tl.sum(acc_r, axis=0)
    if HAS_W:
        g_rstd = g_rstd * tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    g_mu_neg = tl.sum(acc_m, axis=0)
    g_var = -0.5 * g_rstd * rstd * rstd * rstd
    p = g_var * (2.0 / count)
    q = -(g_mu_neg + 2.0 * g_var * mu) / count
    # out: (4, C), P, Q, grad_weight, grad_bias
    tl.store(out_ptr + cs, p, mask=cmask)
    tl.store(out_ptr + C + cs, q, mask=cmask)
    tl.store(out_ptr + 2 * C + cs, tl.sum(acc_w, axis=0), mask=cmask)
    tl.store(out_ptr + 3 * C + cs, tl.sum(acc_b, axis=0), mask=cmask)


def gni_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    strength: Tensor,
    count: int,
    momentum: float,
    eps: float,
    shift_noise: bool,
    scale_noise: bool,
    indices: Optional[Tensor] = None,
    noise_eps: float = 1e-3,
    normal: Optional[Tensor] = None,
    gamma: Optional[Tensor] = None,
    ghost_batch_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """GNI's forward ``(B, C)`` math in one launch (see :mod:`lightning_ghostnoise.backends.gni_batch_norm`).

    From the per-sample moments ``mv`` (:func:`moments`): the batch statistics (updating the running
    statistics in place), the noise of the normalized features from the ghost ``indices`` ``(B, N)``
    -- or analytic GNI's ``normal`` and ``gamma`` draws (:func:`lightning_ghostnoise.functional.sampling.analytic_draws`) with its
    ``ghost_batch_size`` -- and the affine ``y = x * A + D``.

    Returns:
        ``coef`` ``(4, B, C)``: ``A``, ``D``, ``inv = scale**-s`` and ``off = s * shift * inv``; and
        ``stats`` ``(2, C)``: the batch mean and ``rstd``; all float32.
    """
    _, batch, channels = mv.shape
    analytic = indices is None
    if analytic and (normal is None or gamma is None or ghost_batch_size is None):
        raise ValueError("gni_coefficients needs either indices or normal, gamma and ghost_batch_size.")
    coef = torch.empty(4, batch, channels, device=mv.device, dtype=torch.float32)
    stats = torch.empty(2, channels, device=mv.device, dtype=torch.float32)
    has_running = running_mean is not None and running_var is not None
    n = int(ghost_batch_size) if analytic else indices.shape[1]  # type: ignore[union-attr, arg-type]  # the draws the mode needs are given
    cm = _split_channel_moments(mv) if batch > config.settings().split_batch else mv
    _launcher.launch(_gni_coefficients_kernel, (_cdiv(channels, _SMALL_C), _cdiv(batch, _SMALL_B)),
        mv, cm,
        mv if analytic else indices.contiguous(),  # type: ignore[union-attr]  # given without analytic
        normal.float().contiguous() if analytic else mv,  # type: ignore[union-attr]  # given with analytic
        gamma.float().contiguous() if analytic else mv,  # type: ignore[union-attr]  # given with analytic
        weight if weight is not None else mv, bias if bias is not None else mv,
        running_mean if has_running else mv, running_var if has_running else mv, strength, coef, stats,
        batch, channels, n, math.sqrt(n), float(momentum), count / max(count - 1, 1), float(eps), float(noise_eps),
        STATS_GIVEN=batch > config.settings().split_batch, ANALYTIC=analytic, HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running, SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return coef, stats


def gni_input_coefficients(r: Tensor, coef: Tensor, stats: Tensor, weight: Optional[Tensor], count: int) -> Tensor:
    """GNI's backward ``(B, C)`` math in one launch.

    Args:
        r: :func:`channel_sums`; ``coef``, ``stats``: from :func:`gni_coefficients`; ``count``: values
            per channel (``B * S``).

    Returns:
        ``(4, C)`` float32: ``P`` and ``Q`` (the first two rows, for :func:`affine_input_grad`), then
        the gradients of the weight and of the bias.
    """
    _, batch, channels = r.shape
    out = torch.empty(4, channels, device=r.device, dtype=torch.float32)
    _launcher.launch(_gni_input_coefficients_kernel, (_cdiv(channels, _SMALL_C),),
        r, coef, stats, weight if weight is not None else stats, out, batch, channels, float(count),
        HAS_W=weight is not None, BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return out
