"""GBN's and XBN's coefficient kernels: the forward's ``(B, C)`` math in one launch (batch, ghost and
running statistics, the effective statistics and the affine) and the backward's.

They compute :func:`lightning_ghostnoise.functional.batch_norm.effective_statistics` and the ghost
averages in float32; the tests check them against :mod:`lightning_ghostnoise.functional`.
"""

# No `from __future__ import annotations`: the kernels' `tl.constexpr` annotations must be objects (Triton's
# interpreter before 3.4 does not read the string form), and so must the signatures torch's custom_op
# reads before torch 2.5.

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

__all__ = ["ghost_statistics_coefficients", "ghost_statistics_input_coefficients"]


@triton.jit
def _group_range(g, B, N, G):
    """Members ``[start, end)`` of ghost batch ``g``: the ``B mod N`` last samples join the last batch."""
    start = g * N
    end = tl.where(g == G - 1, B, start + N)
    return start, end


@triton.jit
def _ghost_stats_coefficients_kernel(
    mv_ptr, cm_ptr, w_ptr, bias_ptr, rm_ptr, rv_ptr, s_ptr, ps_ptr, pc_ptr,
    B, C, N, G, momentum, unbias, eps,
    STATS_GIVEN: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
    SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    g = tl.program_id(1)
    mean_ptr = mv_ptr
    var_ptr = mv_ptr + B * C
    # per sample (4, B, C): A, D, gm, gvar; per channel (4, C): centre, bm, bvar, std_b
    a_ptr = ps_ptr
    d_ptr = ps_ptr + B * C
    gm_ptr = ps_ptr + 2 * B * C
    gvar_ptr = ps_ptr + 3 * B * C
    centre_ptr = pc_ptr
    bm_ptr = pc_ptr + C
    bvar_ptr = pc_ptr + 2 * C
    std_b_ptr = pc_ptr + 3 * C
    # the centre (batch mean of the per-sample means), then the batch statistics of c = m - centre
    centre, bm, mean_e = _batch_moments(mv_ptr, cm_ptr, cs, cmask, B, C, STATS_GIVEN, BLOCK_B, BLOCK_C)
    bvar = mean_e - bm * bm
    std_b = tl.sqrt(tl.maximum(bvar, 0.0) + eps)
    if g == 0:
        tl.store(centre_ptr + cs, centre, mask=cmask)
        tl.store(bm_ptr + cs, bm, mask=cmask)
        tl.store(bvar_ptr + cs, bvar, mask=cmask)
        tl.store(std_b_ptr + cs, std_b, mask=cmask)
        if HAS_RUNNING:
            _update_running(rm_ptr, rv_ptr, cs, cmask, bm + centre, tl.maximum(bvar, 0.0), momentum, unbias)
    # this ghost batch's sums
    start, end = _group_range(g, B, N, G)
    size = (end - start).to(tl.float32)
    sum_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_e = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(start, end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < end)[:, None] & cmask[None, :]
        m = tl.load(mean_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
        v = tl.load(var_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
        c = tl.where(mask, m - centre[None, :], 0.0)
        sum_c += tl.sum(c, axis=0)
        sum_e += tl.sum(tl.where(mask, v + c * c, 0.0), axis=0)
    s = tl.load(s_ptr).to(tl.float32)
    w, bias = _affine_params(w_ptr, bias_ptr, cs, cmask, HAS_W, HAS_BIAS, BLOCK_C)
    for b0 in range(start, end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < end)[:, None] & cmask[None, :]
        at = bs[:, None] * C + cs[None, :]
        if EXCLUSIVE:  # the mean over the other members (a ghost batch of one keeps its own value)
            m = tl.load(mean_ptr + at, mask=mask, other=0.0)
            v = tl.load(var_ptr + at, mask=mask, other=0.0)
            c = m - centre[None, :]
            e = v + c * c
            others = tl.maximum(size - 1.0, 1.0)
            gm = tl.where(size > 1.0, (sum_c[None, :] - c) / others, c)
            ge = tl.where(size > 1.0, (sum_e[None, :] - e) / others, e)
        else:
            gm = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + (sum_c / size)[None, :]
            ge = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + (sum_e / size)[None, :]
        gvar = ge - gm * gm
        _std_g, std_eff, shifted = _ghost_stats_effective(gm, gvar, bm, std_b, centre, s, eps, SHIFT_NOISE, SCALE_NOISE)
        a = w[None, :] / std_eff
        tl.store(a_ptr + at, a, mask=mask)
        tl.store(d_ptr + at, bias[None, :] - shifted * a, mask=mask)
        tl.store(gm_ptr + at, gm, mask=mask)
        tl.store(gvar_ptr + at, gvar, mask=mask)


@triton.jit
def _ghost_stats_effective(gm, gvar, bm, std_b, centre, s, eps, SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr):
    """From the ghost mean and variance ``(BLOCK_B, BLOCK_C)`` and the channel rows ``(BLOCK_C,)``: the
    ghost std, the effective std and the effective mean plus the centre (forward, and recomputed by the
    backward kernels from the kept ``gm``, ``gvar`` with the same operations)."""
    std_g = tl.sqrt(tl.maximum(gvar, 0.0) + eps)
    if SHIFT_NOISE:
        mean_eff = bm[None, :] + s * (gm - bm[None, :])
    else:
        mean_eff = tl.zeros_like(gm) + bm[None, :]
    if SCALE_NOISE:
        std_eff = std_b[None, :] * tl.exp2(s * tl.log2(std_g / std_b[None, :]))
    else:
        std_eff = tl.zeros_like(gm) + std_b[None, :]
    return std_g, std_eff, mean_eff + centre[None, :]


@triton.jit
def _ghost_stats_terms(
    r0_ptr, r1_ptr, ps_ptr, B, C, at, mask, s, bm, std_b, centre, eps,
    SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr,
):  # fmt: skip
    """Per-(sample, channel) gradients reaching the ghost mean and ghost variance."""
    r0 = tl.load(r0_ptr + at, mask=mask, other=0.0)
    r1 = tl.load(r1_ptr + at, mask=mask, other=0.0)
    a = tl.load(ps_ptr + at, mask=mask, other=0.0)
    gm = tl.load(ps_ptr + 2 * B * C + at, mask=mask, other=0.0)
    gvar = tl.load(ps_ptr + 3 * B * C + at, mask=mask, other=0.0)
    std_g, _, shifted = _ghost_stats_effective(gm, gvar, bm, std_b, centre, s, eps, SHIFT_NOISE, SCALE_NOISE)
    g_a = r1 - shifted * r0
    if SCALE_NOISE:
        g_std_g = -(g_a * a) * s / std_g
        g_gvar = tl.where(gvar >= 0.0, g_std_g / (2.0 * std_g), 0.0)
    else:
        g_gvar = tl.zeros_like(r0)
    if SHIFT_NOISE:
        g_gm = -(r0 * a) * s
    else:
        g_gm = tl.zeros_like(r0)
    return g_gm - 2.0 * gm * g_gvar, g_gvar


@triton.jit
def _ghost_stats_channel_grads(
    r_ptr, ps_ptr, cs, cmask, B, C, s, bm, std_b, centre, eps,
    SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """GBN/XBN backward, per channel over the batch: the gradients of the weight and bias, and the
    sums reaching the batch std and the batch mean."""
    acc_b = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < B)[:, None] & cmask[None, :]
        at = bs[:, None] * C + cs[None, :]
        r0 = tl.load(r_ptr + at, mask=mask, other=0.0)
        r1 = tl.load(r_ptr + B * C + at, mask=mask, other=0.0)
        a = tl.load(ps_ptr + at, mask=mask, other=0.0)
        gm = tl.load(ps_ptr + 2 * B * C + at, mask=mask, other=0.0)
        gvar = tl.load(ps_ptr + 3 * B * C + at, mask=mask, other=0.0)
        _, std_eff, shifted = _ghost_stats_effective(gm, gvar, bm, std_b, centre, s, eps, SHIFT_NOISE, SCALE_NOISE)
        g_a = r1 - shifted * r0  # D = b - shifted * A
        acc_b += r0
        acc_w += g_a / std_eff
        if SCALE_NOISE:
            acc_t += -(g_a * a)  # the gradient of std_eff, times std_eff
        else:
            acc_t += -(g_a * a) / std_eff
        acc_m += -(r0 * a)  # the gradient of the effective mean
    return tl.sum(acc_w, axis=0), tl.sum(acc_b, axis=0), tl.sum(acc_t, axis=0), tl.sum(acc_m, axis=0)


@triton.jit
def _ghost_stats_channel_rows(pc_ptr, cs, cmask, C):
    """The forward's per-channel rows ``(4, C)``: centre, batch mean, batch variance, batch std."""
    centre = tl.load(pc_ptr + cs, mask=cmask, other=0.0)
    bm = tl.load(pc_ptr + C + cs, mask=cmask, other=0.0)
    bvar = tl.load(pc_ptr + 2 * C + cs, mask=cmask, other=0.0)
    std_b = tl.load(pc_ptr + 3 * C + cs, mask=cmask, other=1.0)
    return centre, bm, bvar, std_b


@triton.jit
def _ghost_stats_channel_grads_kernel(
    r_ptr, ps_ptr, pc_ptr, s_ptr, cg_ptr, B, C, eps,
    SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Large batches: :func:`_ghost_stats_channel_grads` once per channel, into ``cg`` ``(4, C)``."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    s = tl.load(s_ptr).to(tl.float32)
    centre, bm, _, std_b = _ghost_stats_channel_rows(pc_ptr, cs, cmask, C)
    sum_w, sum_b, sum_t, sum_m = _ghost_stats_channel_grads(
        r_ptr, ps_ptr, cs, cmask, B, C, s, bm, std_b, centre, eps, SHIFT_NOISE, SCALE_NOISE, BLOCK_B, BLOCK_C
    )
    tl.store(cg_ptr + cs, sum_w, mask=cmask)
    tl.store(cg_ptr + C + cs, sum_b, mask=cmask)
    tl.store(cg_ptr + 2 * C + cs, sum_t, mask=cmask)
    tl.store(cg_ptr + 3 * C + cs, sum_m, mask=cmask)


@triton.jit
def _ghost_stats_input_coefficients_kernel(
    r_ptr, mv_ptr, ps_ptr, pc_ptr, s_ptr, pq_ptr, cg_ptr, B, C, N, G, count, eps,
    GRADS_GIVEN: tl.constexpr, EXCLUSIVE: tl.constexpr, SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    g = tl.program_id(1)
    r0_ptr = r_ptr
    r1_ptr = r_ptr + B * C
    mean_ptr = mv_ptr
    s = tl.load(s_ptr).to(tl.float32)
    centre, bm, bvar, std_b = _ghost_stats_channel_rows(pc_ptr, cs, cmask, C)
    # channel sums over the whole batch: the batch statistics' share of the gradient
    if GRADS_GIVEN:
        sum_t = tl.load(cg_ptr + 2 * C + cs, mask=cmask, other=0.0)
        sum_m = tl.load(cg_ptr + 3 * C + cs, mask=cmask, other=0.0)
    else:
        sum_w, sum_b, sum_t, sum_m = _ghost_stats_channel_grads(
            r_ptr, ps_ptr, cs, cmask, B, C, s, bm, std_b, centre, eps, SHIFT_NOISE, SCALE_NOISE, BLOCK_B, BLOCK_C
        )
        if g == 0:  # (4, C): grad_weight, grad_bias, and the two sums below
            tl.store(cg_ptr + cs, sum_w, mask=cmask)
            tl.store(cg_ptr + C + cs, sum_b, mask=cmask)
    # std_eff = std_b**(1 - s) * std_g**s; mean_eff = bm + s (gm - bm); std = sqrt(max(var, 0) + eps)
    if SCALE_NOISE:
        g_std_b = sum_t / std_b * (1.0 - s)
    else:
        g_std_b = sum_t
    g_bvar = tl.where(bvar >= 0.0, g_std_b / (2.0 * std_b), 0.0)
    if SHIFT_NOISE:
        g_bm = sum_m * (1.0 - s)
    else:
        g_bm = sum_m
    g_bm = g_bm - 2.0 * bm * g_bvar  # bvar = be2 - bm**2
    # this ghost batch's sums of the gradients reaching its ghost statistics
    start, end = _group_range(g, B, N, G)
    size = (end - start).to(tl.float32)
    sum_gm = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gv = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(start, end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < end)[:, None] & cmask[None, :]
        at = bs[:, None] * C + cs[None, :]
        t_gm, t_gv = _ghost_stats_terms(
            r0_ptr, r1_ptr, ps_ptr, B, C, at, mask, s, bm, std_b, centre, eps, SHIFT_NOISE, SCALE_NOISE
        )
        sum_gm += tl.sum(tl.where(mask, t_gm, 0.0), axis=0)
        sum_gv += tl.sum(tl.where(mask, t_gv, 0.0), axis=0)
    # back through the (symmetric) ghost averaging, then to each sample's moments
    for b0 in range(start, end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        mask = (bs < end)[:, None] & cmask[None, :]
        at = bs[:, None] * C + cs[None, :]
        if EXCLUSIVE:
            t_gm, t_gv = _ghost_stats_terms(
                r0_ptr, r1_ptr, ps_ptr, B, C, at, mask, s, bm, std_b, centre, eps, SHIFT_NOISE, SCALE_NOISE
            )
            others = tl.maximum(size - 1.0, 1.0)
            back_gm = tl.where(size > 1.0, (sum_gm[None, :] - t_gm) / others, t_gm)
            back_gv = tl.where(size > 1.0, (sum_gv[None, :] - t_gv) / others, t_gv)
        else:
            back_gm = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + (sum_gm / size)[None, :]
            back_gv = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + (sum_gv / size)[None, :]
        g_c = back_gm + (g_bm / B)[None, :]
        g_e2 = back_gv + (g_bvar / B)[None, :]
        m = tl.load(mean_ptr + at, mask=mask, other=0.0)
        g_m = g_c + 2.0 * (m - centre[None, :]) * g_e2  # e2 = v + c**2, c = m - centre
        p = g_e2 * (2.0 / count)  # v = mean_s (x - m)**2
        tl.store(pq_ptr + at, p, mask=mask)  # (2, B, C): P, then Q
        tl.store(pq_ptr + B * C + at, g_m / count - p * m, mask=mask)


def ghost_statistics_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    strength: Tensor,
    count: int,
    momentum: float,
    eps: float,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> tuple[Tensor, Tensor]:
    """GBN's (XBN's with ``exclusive``) forward ``(B, C)`` math in one launch (see
    :mod:`lightning_ghostnoise.backends.ghost_batch_norm`): batch and ghost statistics from the per-sample moments
    ``mv``, the running statistics (updated in place) and the per-(sample, channel) affine.

    Returns:
        Per sample ``(4, B, C)``: ``A``, ``D``, the ghost mean (relative to the centre) and the ghost
        variance (before clamping), all the backward keeps per sample (it recomputes the effective
        statistics from them); per channel ``(4, C)``: the centre (batch mean of the per-sample
        means), the batch mean relative to it, the batch variance (before clamping) and the batch
        std. All float32.
    """
    _, batch, channels = mv.shape
    groups = max(batch // ghost_batch_size, 1)
    per_sample = torch.empty(4, batch, channels, device=mv.device, dtype=torch.float32)
    per_channel = torch.empty(4, channels, device=mv.device, dtype=torch.float32)
    has_running = running_mean is not None and running_var is not None
    cm = _split_channel_moments(mv) if batch > config.settings().split_batch else mv
    _launcher.launch(_ghost_stats_coefficients_kernel, (_cdiv(channels, _SMALL_C), groups),
        mv, cm, weight if weight is not None else mv, bias if bias is not None else mv,
        running_mean if has_running else mv, running_var if has_running else mv, strength, per_sample, per_channel,
        batch, channels, ghost_batch_size, groups, float(momentum), count / max(count - 1, 1), float(eps),
        STATS_GIVEN=batch > config.settings().split_batch, EXCLUSIVE=bool(exclusive), HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running,
        SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return per_sample, per_channel


def ghost_statistics_input_coefficients(
    r: Tensor,
    mv: Tensor,
    per_sample: Tensor,
    per_channel: Tensor,
    strength: Tensor,
    count: int,
    eps: float,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> tuple[Tensor, Tensor]:
    """GBN's (XBN's) backward ``(B, C)`` math in one launch.

    ``count`` is the number of spatial positions (values per sample and channel); ``eps`` the
    forward's (the effective statistics are recomputed from the kept ghost moments).

    Returns:
        ``(P, Q)`` as ``(2, B, C)`` for :func:`affine_input_grad`, and ``(2, C)``: the gradients of the
        weight and of the bias; float32.
    """
    _, batch, channels = r.shape
    groups = max(batch // ghost_batch_size, 1)
    pq = torch.empty(2, batch, channels, device=r.device, dtype=torch.float32)
    cg = torch.empty(4, channels, device=r.device, dtype=torch.float32)  # grad_w, grad_b, two channel sums
    split = batch > config.settings().split_batch
    if split:
        _launcher.launch(_ghost_stats_channel_grads_kernel, (_cdiv(channels, _SMALL_C),),
            r, per_sample, per_channel, strength, cg, batch, channels, float(eps),
            SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
        )  # fmt: skip
    _launcher.launch(_ghost_stats_input_coefficients_kernel, (_cdiv(channels, _SMALL_C), groups),
        r, mv, per_sample, per_channel, strength, pq, cg, batch, channels, ghost_batch_size, groups, float(count),
        float(eps), GRADS_GIVEN=split, EXCLUSIVE=bool(exclusive), SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise),
        BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return pq, cg[:2]
