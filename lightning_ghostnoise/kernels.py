"""Triton kernels: the CUDA fast path of the fused BatchNorm-family layers.

In eager mode a ghost noise layer is a handful of full-size passes (BatchNorm's own number) plus
small ``(B, C)`` math: on a GPU each small op is a kernel launch, and a layer written in plain
PyTorch launches dozens of them. These kernels do the same work in seven launches per layer and
step (GNI and analytic GNI) with every intermediate in float32:

* :func:`moments` -- per-(sample, channel) mean and variance (one read of ``x``);
* :func:`gni_coefficients` -- batch statistics, running statistics, the ghost noise from drawn
  indices (or given analytic draws) and the per-(sample, channel) affine ``(A, D)``;
* :func:`affine` -- ``y = x * A + D``;
* :func:`channel_sums` -- ``sum_s grad_y`` and ``sum_s grad_y * x`` (one read of each);
* :func:`gni_input_coefficients` -- the closed-form backward of the coefficients;
* :func:`affine_input_grad` -- ``grad_x = grad_y * A + x * P + Q``.

They compute the formulas of :mod:`lightning_ghostnoise.functional` (which stays the reference, and
the CPU path) from the same random draws; the tests check each kernel against it, on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``) and on CUDA natively. Inputs must be
``(B, C, *spatial)`` in a contiguous or channels-last layout, in float32, float16 or bfloat16
(:func:`supports` says whether a tensor qualifies; the callers fall back to plain PyTorch otherwise).

``GHOSTNOISE_TRITON=0`` in the environment turns the kernels off (for A/B comparisons).

Example:
    >>> import torch
    >>> from lightning_ghostnoise import kernels
    >>> kernels.supports(torch.randn(4, 3, 8, 8))  # CPU tensors take the PyTorch path
    False
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; the package works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = [
    "affine",
    "affine_input_grad",
    "available",
    "GhostStatistics",
    "channel_sums",
    "gni_coefficients",
    "ghost_statistics_coefficients",
    "ghost_statistics_input_coefficients",
    "gni_input_coefficients",
    "moments",
    "supports",
]

#: Run the kernels on CPU tensors too (through Triton's interpreter): for tests only.
ALLOW_CPU = False

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048  # elements per program and loop step in the full-size kernels
_SMALL_B = 32  # samples per step in the (B, C) kernels
_SMALL_C = 32  # channels per program in the (B, C) kernels


def available() -> bool:
    """Whether Triton is importable and not turned off with ``GHOSTNOISE_TRITON=0``."""
    return triton is not None and os.environ.get("GHOSTNOISE_TRITON", "1") != "0"


def _layout(x: Tensor) -> Optional[Tuple[int, int, int]]:
    """Strides ``(batch, channel, spatial)`` of ``x`` seen as ``(B, C, S)``, or ``None`` if no such view exists."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1), 1
    b, c = x.shape[0], x.shape[1]
    s = x.numel() // max(b * c, 1)
    if x.is_contiguous():
        return c * s, s, 1
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return s * c, 1, c
    return None


def supports(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a CUDA tensor ``(B, C, *spatial)`` (2 to 5 dims) of float32,
    float16 or bfloat16 in a contiguous or channels-last layout, outside ``torch.compile``."""
    return (
        available()
        and (x.is_cuda or ALLOW_CPU)
        and x.dtype in _DTYPES
        and 2 <= x.dim() <= 5
        and x.numel() > 0
        and not torch.compiler.is_compiling()
        and _layout(x) is not None
    )


def _pow2(n: int, low: int = 4) -> int:
    return max(low, 1 << max(int(n) - 1, 0).bit_length())


def _blocks(channels: int, spatial: int, channel_stride: int) -> Tuple[int, int]:
    """Tile ``(BLOCK_C, BLOCK_S)``: long along the dimension that is contiguous in memory."""
    if channel_stride == 1 and spatial > 1:  # channels-last: channels are adjacent
        block_c = min(_pow2(channels), 128)
        return block_c, min(_pow2(spatial), max(4, _TILE // block_c))
    block_s = min(_pow2(spatial), 1024)
    return min(_pow2(channels), max(4, _TILE // block_s)), block_s


def _shape(x: Tensor) -> Tuple[int, int, int]:
    b, c = x.shape[0], x.shape[1]
    return b, c, x.numel() // max(b * c, 1)


def _strided(x: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    strides = _layout(x)
    if strides is None:
        x = x.contiguous()
        strides = _layout(x)
    assert strides is not None
    return x, strides


if triton is not None:

    @triton.jit
    def _moments_kernel(x_ptr, mean_ptr, var_ptr, C, S, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        row = x_ptr + b * sxb + cs.to(tl.int64) * sxc
        # shifted by each channel's first value: no cancellation when the mean dwarfs the spread
        pivot = tl.load(row, mask=cmask, other=0.0).to(tl.float32)
        acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (ss < S)[None, :]
            v = tl.load(row[:, None] + ss.to(tl.int64)[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
            dv = tl.where(mask, v - pivot[:, None], 0.0)
            acc1 += dv
            acc2 += dv * dv
        m = tl.sum(acc1, axis=1) / S
        var = tl.maximum(tl.sum(acc2, axis=1) / S - m * m, 0.0)
        tl.store(mean_ptr + b * C + cs, pivot + m, mask=cmask)
        tl.store(var_ptr + b * C + cs, var, mask=cmask)

    @triton.jit
    def _sums_kernel(
        g_ptr, x_ptr, r0_ptr, r1_ptr, C, S, sgb, sgc, sgs, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
    ):
        b = tl.program_id(0).to(tl.int64)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        c64 = cs.to(tl.int64)
        grow = g_ptr + b * sgb + c64 * sgc
        xrow = x_ptr + b * sxb + c64 * sxc
        acc0 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
            mask = cmask[:, None] & (ss < S)[None, :]
            g = tl.load(grow[:, None] + ss[None, :] * sgs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(xrow[:, None] + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
            acc0 += g
            acc1 += g * x
        tl.store(r0_ptr + b * C + cs, tl.sum(acc0, axis=1), mask=cmask)
        tl.store(r1_ptr + b * C + cs, tl.sum(acc1, axis=1), mask=cmask)

    @triton.jit
    def _affine_kernel(
        x_ptr, y_ptr, a_ptr, d_ptr, C, S, sxb, sxc, sxs, syb, syc, sys, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
    ):
        b = tl.program_id(0).to(tl.int64)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ss = (tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        cmask = cs < C
        mask = cmask[:, None] & (ss < S)[None, :]
        a = tl.load(a_ptr + b * C + cs, mask=cmask, other=0.0)
        d = tl.load(d_ptr + b * C + cs, mask=cmask, other=0.0)
        c64 = cs.to(tl.int64)
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        y = x * a[:, None] + d[:, None]
        tl.store(y_ptr + b * syb + c64[:, None] * syc + ss[None, :] * sys, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _input_grad_kernel(
        g_ptr, x_ptr, gx_ptr, a_ptr, p_ptr, q_ptr, C, S, spb,
        sgb, sgc, sgs, sxb, sxc, sxs, sob, soc, sos,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ss = (tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        cmask = cs < C
        mask = cmask[:, None] & (ss < S)[None, :]
        a = tl.load(a_ptr + b * C + cs, mask=cmask, other=0.0)
        p = tl.load(p_ptr + b * spb + cs, mask=cmask, other=0.0)
        q = tl.load(q_ptr + b * spb + cs, mask=cmask, other=0.0)
        c64 = cs.to(tl.int64)
        g = tl.load(g_ptr + b * sgb + c64[:, None] * sgc + ss[None, :] * sgs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * sxb + c64[:, None] * sxc + ss[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        gx = g * a[:, None] + x * p[:, None] + q[:, None]
        tl.store(gx_ptr + b * sob + c64[:, None] * soc + ss[None, :] * sos, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gni_coefficients_kernel(
        mean_ptr, var_ptr, idx_ptr, nshift_ptr, nscale_ptr, w_ptr, bias_ptr, rm_ptr, rv_ptr, s_ptr,
        a_ptr, d_ptr, inv_ptr, off_ptr, mu_ptr, rstd_ptr,
        B, C, N, momentum, unbias, eps, noise_eps,
        ANALYTIC: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
        SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        first = tl.program_id(1) * BLOCK_B
        # batch statistics of the channels (every program of the column recomputes them: B x BLOCK_C loads)
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            mask = (bs < B)[:, None] & cmask[None, :]
            acc += tl.load(mean_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
        mu = tl.sum(acc, axis=0) / B
        acc_c = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            mask = (bs < B)[:, None] & cmask[None, :]
            m = tl.load(mean_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
            v = tl.load(var_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
            c = tl.where(mask, m - mu[None, :], 0.0)
            acc_c += c
            acc_e += v + c * c
        batch_var = tl.sum(acc_e, axis=0) / B
        rstd = 1.0 / tl.sqrt(batch_var + eps)
        if tl.program_id(1) == 0:
            tl.store(mu_ptr + cs, mu, mask=cmask)
            tl.store(rstd_ptr + cs, rstd, mask=cmask)
            if HAS_RUNNING:
                rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                rm = rm + momentum * (mu - rm)
                rv = rv + momentum * (batch_var * unbias - rv)
                tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
                tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)
        # moments of the normalized features: m_hat = (m - mu) rstd, second moment v rstd^2 + m_hat^2
        norm_m1 = tl.sum(acc_c, axis=0) / B * rstd
        norm_var = tl.maximum(batch_var * rstd * rstd - norm_m1 * norm_m1, 0.0)
        s = tl.load(s_ptr).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        bs = first + tl.arange(0, BLOCK_B)
        bmask = bs < B
        mask = bmask[:, None] & cmask[None, :]
        out = bs[:, None] * C + cs[None, :]
        if ANALYTIC:
            shift = tl.load(nshift_ptr + out, mask=mask, other=0.0)
            scale = tl.load(nscale_ptr + out, mask=mask, other=1.0)
        else:
            g1 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
            g2 = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
            for j in range(0, N):
                member = tl.load(idx_ptr + bs.to(tl.int64) * N + j, mask=bmask, other=0).to(tl.int64)
                at = member[:, None] * C + cs[None, :]
                m = tl.load(mean_ptr + at, mask=mask, other=0.0)
                v = tl.load(var_ptr + at, mask=mask, other=0.0)
                mh = (m - mu[None, :]) * rstd[None, :]
                g1 += mh
                g2 += v * (rstd * rstd)[None, :] + mh * mh
            g1 = g1 / N
            ghost_var = tl.maximum(g2 / N - g1 * g1, 0.0)
            shift = g1 - norm_m1[None, :]
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
        tl.store(a_ptr + out, a, mask=mask)
        tl.store(d_ptr + out, d, mask=mask)
        tl.store(inv_ptr + out, inv, mask=mask)
        tl.store(off_ptr + out, off, mask=mask)

    @triton.jit
    def _gni_input_coefficients_kernel(
        r0_ptr, r1_ptr, a_ptr, inv_ptr, off_ptr, mu_ptr, rstd_ptr, w_ptr,
        gw_ptr, gb_ptr, p_ptr, q_ptr, B, C, count,
        HAS_W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mu = tl.load(mu_ptr + cs, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + cs, mask=cmask, other=0.0)
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
        tl.store(gw_ptr + cs, tl.sum(acc_w, axis=0), mask=cmask)
        tl.store(gb_ptr + cs, tl.sum(acc_b, axis=0), mask=cmask)
        tl.store(p_ptr + cs, p, mask=cmask)
        tl.store(q_ptr + cs, q, mask=cmask)


    @triton.jit
    def _group_range(g, B, N, G):
        """Members ``[start, end)`` of ghost batch ``g``: the ``B mod N`` last samples join the last batch."""
        start = g * N
        end = tl.where(g == G - 1, B, start + N)
        return start, end

    @triton.jit
    def _ghost_stats_coefficients_kernel(
        mean_ptr, var_ptr, w_ptr, bias_ptr, rm_ptr, rv_ptr, s_ptr,
        a_ptr, d_ptr, std_eff_ptr, std_g_ptr, gm_ptr, gvar_ptr, shifted_ptr, centre_ptr, bm_ptr, bvar_ptr, std_b_ptr,
        B, C, N, G, momentum, unbias, eps,
        EXCLUSIVE: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
        SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        g = tl.program_id(1)
        # the centre (batch mean of the per-sample means), then the batch statistics of c = m - centre
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            mask = (bs < B)[:, None] & cmask[None, :]
            acc += tl.load(mean_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
        centre = tl.sum(acc, axis=0) / B
        acc_c = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            mask = (bs < B)[:, None] & cmask[None, :]
            m = tl.load(mean_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
            v = tl.load(var_ptr + bs[:, None] * C + cs[None, :], mask=mask, other=0.0)
            c = tl.where(mask, m - centre[None, :], 0.0)
            acc_c += c
            acc_e += v + c * c
        bm = tl.sum(acc_c, axis=0) / B
        bvar = tl.sum(acc_e, axis=0) / B - bm * bm
        std_b = tl.sqrt(tl.maximum(bvar, 0.0) + eps)
        if g == 0:
            tl.store(centre_ptr + cs, centre, mask=cmask)
            tl.store(bm_ptr + cs, bm, mask=cmask)
            tl.store(bvar_ptr + cs, bvar, mask=cmask)
            tl.store(std_b_ptr + cs, std_b, mask=cmask)
            if HAS_RUNNING:
                rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
                rm = rm + momentum * (bm + centre - rm)
                rv = rv + momentum * (tl.maximum(bvar, 0.0) * unbias - rv)
                tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
                tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)
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
        if HAS_W:
            w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], dtype=tl.float32)
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
            std_g = tl.sqrt(tl.maximum(gvar, 0.0) + eps)
            if SHIFT_NOISE:
                mean_eff = bm[None, :] + s * (gm - bm[None, :])
            else:
                mean_eff = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + bm[None, :]
            if SCALE_NOISE:
                std_eff = std_b[None, :] * tl.exp2(s * tl.log2(std_g / std_b[None, :]))
            else:
                std_eff = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32) + std_b[None, :]
            a = w[None, :] / std_eff
            shifted = mean_eff + centre[None, :]
            tl.store(a_ptr + at, a, mask=mask)
            tl.store(d_ptr + at, bias[None, :] - shifted * a, mask=mask)
            tl.store(std_eff_ptr + at, std_eff, mask=mask)
            tl.store(std_g_ptr + at, std_g, mask=mask)
            tl.store(gm_ptr + at, gm, mask=mask)
            tl.store(gvar_ptr + at, gvar, mask=mask)
            tl.store(shifted_ptr + at, shifted, mask=mask)

    @triton.jit
    def _ghost_stats_terms(
        r0_ptr, r1_ptr, a_ptr, std_eff_ptr, std_g_ptr, gm_ptr, gvar_ptr, shifted_ptr, at, mask, s,
        SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr,
    ):  # fmt: skip
        """Per-(sample, channel) gradients reaching the ghost mean and ghost variance."""
        r0 = tl.load(r0_ptr + at, mask=mask, other=0.0)
        r1 = tl.load(r1_ptr + at, mask=mask, other=0.0)
        a = tl.load(a_ptr + at, mask=mask, other=0.0)
        std_eff = tl.load(std_eff_ptr + at, mask=mask, other=1.0)
        shifted = tl.load(shifted_ptr + at, mask=mask, other=0.0)
        gm = tl.load(gm_ptr + at, mask=mask, other=0.0)
        g_a = r1 - shifted * r0
        if SCALE_NOISE:
            std_g = tl.load(std_g_ptr + at, mask=mask, other=1.0)
            gvar = tl.load(gvar_ptr + at, mask=mask, other=0.0)
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
    def _ghost_stats_input_coefficients_kernel(
        r0_ptr, r1_ptr, mean_ptr, a_ptr, std_eff_ptr, std_g_ptr, gm_ptr, gvar_ptr, shifted_ptr,
        centre_ptr, bm_ptr, bvar_ptr, std_b_ptr, s_ptr,
        gw_ptr, gb_ptr, p_ptr, q_ptr, B, C, N, G, count,
        EXCLUSIVE: tl.constexpr, SHIFT_NOISE: tl.constexpr, SCALE_NOISE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        g = tl.program_id(1)
        s = tl.load(s_ptr).to(tl.float32)
        bm = tl.load(bm_ptr + cs, mask=cmask, other=0.0)
        bvar = tl.load(bvar_ptr + cs, mask=cmask, other=0.0)
        std_b = tl.load(std_b_ptr + cs, mask=cmask, other=1.0)
        centre = tl.load(centre_ptr + cs, mask=cmask, other=0.0)
        # channel sums over the whole batch: the batch statistics' share of the gradient
        acc_b = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_w = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_m = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            mask = (bs < B)[:, None] & cmask[None, :]
            at = bs[:, None] * C + cs[None, :]
            r0 = tl.load(r0_ptr + at, mask=mask, other=0.0)
            r1 = tl.load(r1_ptr + at, mask=mask, other=0.0)
            a = tl.load(a_ptr + at, mask=mask, other=0.0)
            std_eff = tl.load(std_eff_ptr + at, mask=mask, other=1.0)
            shifted = tl.load(shifted_ptr + at, mask=mask, other=0.0)
            g_a = r1 - shifted * r0  # D = b - shifted * A
            acc_b += r0
            acc_w += g_a / std_eff
            if SCALE_NOISE:
                acc_t += -(g_a * a)  # the gradient of std_eff, times std_eff
            else:
                acc_t += -(g_a * a) / std_eff
            acc_m += -(r0 * a)  # the gradient of the effective mean
        if g == 0:
            tl.store(gw_ptr + cs, tl.sum(acc_w, axis=0), mask=cmask)
            tl.store(gb_ptr + cs, tl.sum(acc_b, axis=0), mask=cmask)
        # std_eff = std_b**(1 - s) * std_g**s; mean_eff = bm + s (gm - bm); std = sqrt(max(var, 0) + eps)
        if SCALE_NOISE:
            g_std_b = tl.sum(acc_t, axis=0) / std_b * (1.0 - s)
        else:
            g_std_b = tl.sum(acc_t, axis=0)
        g_bvar = tl.where(bvar >= 0.0, g_std_b / (2.0 * std_b), 0.0)
        if SHIFT_NOISE:
            g_bm = tl.sum(acc_m, axis=0) * (1.0 - s)
        else:
            g_bm = tl.sum(acc_m, axis=0)
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
                r0_ptr, r1_ptr, a_ptr, std_eff_ptr, std_g_ptr, gm_ptr, gvar_ptr, shifted_ptr, at, mask, s,
                SHIFT_NOISE, SCALE_NOISE,
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
                    r0_ptr, r1_ptr, a_ptr, std_eff_ptr, std_g_ptr, gm_ptr, gvar_ptr, shifted_ptr, at, mask, s,
                    SHIFT_NOISE, SCALE_NOISE,
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
            tl.store(p_ptr + at, p, mask=mask)
            tl.store(q_ptr + at, g_m / count - p * m, mask=mask)


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance of ``x`` ``(B, C, *spatial)``, float32 ``(B, C)``.

    Same result as :func:`lightning_ghostnoise.functional.per_sample_moments` (to float32 rounding).
    """
    x, (sb, sc, ss) = _strided(x)
    b, c, s = _shape(x)
    mean = torch.empty(b, c, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c, block_s = _blocks(c, s, sc)
    _moments_kernel[(b, triton.cdiv(c, block_c))](x, mean, var, c, s, sb, sc, ss, BLOCK_C=block_c, BLOCK_S=block_s)
    return mean, var


def affine(x: Tensor, a: Tensor, d: Tensor) -> Tensor:
    """``x * a[b, c] + d[b, c]`` computed in float32, returned in ``x``'s dtype and memory layout."""
    x, (sb, sc, ss) = _strided(x)
    y = torch.empty_like(x)  # x is dense here: same strides
    ob, oc, os_ = _layout(y)  # type: ignore[misc]
    b, c, s = _shape(x)
    block_c, block_s = _blocks(c, s, sc)
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(s, block_s))
    _affine_kernel[grid](
        x, y, a.contiguous(), d.contiguous(), c, s, sb, sc, ss, ob, oc, os_, BLOCK_C=block_c, BLOCK_S=block_s
    )
    return y


def channel_sums(grad_y: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``sum_s grad_y`` and ``sum_s grad_y * x``, float32 ``(B, C)``."""
    grad_y, (gb, gc, gs) = _strided(grad_y)
    x, (sb, sc, ss) = _strided(x)
    b, c, s = _shape(x)
    r0 = torch.empty(b, c, device=x.device, dtype=torch.float32)
    r1 = torch.empty_like(r0)
    block_c, block_s = _blocks(c, s, sc)
    _sums_kernel[(b, triton.cdiv(c, block_c))](
        grad_y, x, r0, r1, c, s, gb, gc, gs, sb, sc, ss, BLOCK_C=block_c, BLOCK_S=block_s
    )
    return r0, r1


def affine_input_grad(grad_y: Tensor, x: Tensor, a: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """``grad_y * a[b, c] + x * p + q`` with ``p``, ``q`` of shape ``(C,)`` or ``(B, C)``; ``x``'s dtype and layout."""
    grad_y, (gb, gc, gs) = _strided(grad_y)
    x, (sb, sc, ss) = _strided(x)
    out = torch.empty_like(x)
    ob, oc, os_ = _layout(out)  # type: ignore[misc]
    b, c, s = _shape(x)
    per_sample = p.dim() == 2
    block_c, block_s = _blocks(c, s, sc)
    grid = (b, triton.cdiv(c, block_c), triton.cdiv(s, block_s))
    _input_grad_kernel[grid](
        grad_y, x, out, a.contiguous(), p.float().contiguous(), q.float().contiguous(), c, s, c if per_sample else 0,
        gb, gc, gs, sb, sc, ss, ob, oc, os_, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return out


def gni_coefficients(
    mean: Tensor,
    var: Tensor,
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
    shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GNI's forward ``(B, C)`` math in one launch (see ``functional._GhostNoiseBatchNorm``).

    From the per-sample moments: the batch statistics (updating the running statistics in place), the
    noise of the normalized features from the ghost ``indices`` ``(B, N)`` -- or the given analytic
    ``shift``/``scale`` -- and the affine ``y = x * A + D``.

    Returns:
        ``(A, D, inv, off, mu, rstd)``: ``A``, ``D``, ``inv = scale**-s`` and ``off = s * shift * inv``
        of shape ``(B, C)``; batch mean ``mu`` and ``rstd`` of shape ``(C,)``; all float32.
    """
    batch, channels = mean.shape
    analytic = indices is None
    if analytic and (shift is None or scale is None):
        raise ValueError("gni_coefficients needs either indices or both shift and scale.")
    a = torch.empty_like(mean)
    d, inv, off = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    mu = torch.empty(channels, device=mean.device, dtype=torch.float32)
    rstd = torch.empty_like(mu)
    has_running = running_mean is not None and running_var is not None
    dummy = mean
    n = 1 if analytic else indices.shape[1]  # type: ignore[union-attr]
    grid = (triton.cdiv(channels, _SMALL_C), triton.cdiv(batch, _SMALL_B))
    _gni_coefficients_kernel[grid](
        mean.contiguous(), var.contiguous(),
        dummy if analytic else indices.contiguous(),  # type: ignore[union-attr]
        shift.float().contiguous() if analytic else dummy,  # type: ignore[union-attr]
        scale.float().contiguous() if analytic else dummy,  # type: ignore[union-attr]
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if has_running else dummy, running_var if has_running else dummy, strength,
        a, d, inv, off, mu, rstd,
        batch, channels, n, float(momentum), count / max(count - 1, 1), float(eps), float(noise_eps),
        ANALYTIC=analytic, HAS_W=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
        SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return a, d, inv, off, mu, rstd


def gni_input_coefficients(
    r0: Tensor, r1: Tensor, a: Tensor, inv: Tensor, off: Tensor, mu: Tensor, rstd: Tensor, weight: Optional[Tensor], count: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """GNI's backward ``(B, C)`` math in one launch: ``(grad_weight, grad_bias, P, Q)``, each ``(C,)`` float32.

    ``r0``/``r1`` are :func:`channel_sums`; the input gradient is then
    :func:`affine_input_grad` ``(grad_y, x, A, P, Q)``.
    """
    batch, channels = r0.shape
    gw = torch.empty(channels, device=r0.device, dtype=torch.float32)
    gb, p, q = torch.empty_like(gw), torch.empty_like(gw), torch.empty_like(gw)
    _gni_input_coefficients_kernel[(triton.cdiv(channels, _SMALL_C),)](
        r0, r1, a, inv, off, mu, rstd, weight if weight is not None else mu,
        gw, gb, p, q, batch, channels, float(count),
        HAS_W=weight is not None, BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return gw, gb, p, q


class GhostStatistics(NamedTuple):
    """What GBN/XBN's forward kernel computes: the affine ``(a, d)`` and what the backward needs."""

    a: Tensor  # (B, C): y = x * a + d
    d: Tensor
    std_eff: Tensor  # (B, C): the effective standard deviation of each sample
    std_g: Tensor  # (B, C): of its ghost batch
    gm: Tensor  # (B, C): ghost mean, relative to the centre
    gvar: Tensor  # (B, C): ghost variance before clamping
    shifted: Tensor  # (B, C): the effective mean
    centre: Tensor  # (C,): the batch mean of the per-sample means
    bm: Tensor  # (C,): batch mean relative to the centre
    bvar: Tensor  # (C,): batch variance before clamping
    std_b: Tensor  # (C,)


def ghost_statistics_coefficients(
    mean: Tensor,
    var: Tensor,
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
) -> GhostStatistics:
    """GBN's (XBN's with ``exclusive``) forward ``(B, C)`` math in one launch (see
    ``functional._GhostStatisticsBatchNorm``): batch and ghost statistics from the per-sample moments,
    the running statistics (updated in place) and the per-(sample, channel) affine."""
    batch, channels = mean.shape
    groups = max(batch // ghost_batch_size, 1)
    per_sample = [torch.empty_like(mean) for _ in range(7)]
    per_channel = [torch.empty(channels, device=mean.device, dtype=torch.float32) for _ in range(4)]
    has_running = running_mean is not None and running_var is not None
    dummy = mean
    _ghost_stats_coefficients_kernel[(triton.cdiv(channels, _SMALL_C), groups)](
        mean.contiguous(), var.contiguous(), weight if weight is not None else dummy,
        bias if bias is not None else dummy, running_mean if has_running else dummy,
        running_var if has_running else dummy, strength, *per_sample, *per_channel,
        batch, channels, ghost_batch_size, groups, float(momentum), count / max(count - 1, 1), float(eps),
        EXCLUSIVE=bool(exclusive), HAS_W=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
        SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return GhostStatistics(*per_sample, *per_channel)


def ghost_statistics_input_coefficients(
    r0: Tensor,
    r1: Tensor,
    mean: Tensor,
    stats: GhostStatistics,
    strength: Tensor,
    count: int,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """GBN's (XBN's) backward ``(B, C)`` math in one launch: ``(grad_weight, grad_bias)`` of shape
    ``(C,)`` and ``(P, Q)`` of shape ``(B, C)`` for :func:`affine_input_grad`. ``count`` is the number of
    spatial positions (values per sample and channel)."""
    batch, channels = r0.shape
    groups = max(batch // ghost_batch_size, 1)
    gw = torch.empty(channels, device=r0.device, dtype=torch.float32)
    gb = torch.empty_like(gw)
    p, q = torch.empty_like(r0), torch.empty_like(r0)
    st = stats
    _ghost_stats_input_coefficients_kernel[(triton.cdiv(channels, _SMALL_C), groups)](
        r0, r1, mean, st.a, st.std_eff, st.std_g, st.gm, st.gvar, st.shifted, st.centre, st.bm, st.bvar, st.std_b,
        strength, gw, gb, p, q, batch, channels, ghost_batch_size, groups, float(count),
        EXCLUSIVE=bool(exclusive), SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise),
        BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return gw, gb, p, q
