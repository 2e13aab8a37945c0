"""The Triton kernels of the full-size passes: moments, the affine, and the backward's sums and input gradient.

Each reads ``x`` (and ``grad_y``) once, in a contiguous or channels-last layout, and computes in
float32. :class:`TritonPasses` offers them with the same methods as
:class:`lightning_ghostnoise.backends.torch_passes.TorchPasses`; the tests check both against
:mod:`lightning_ghostnoise.functional` (on CPU through Triton's interpreter).
"""

# No `from __future__ import annotations`: the kernels' `tl.constexpr` annotations must be objects
# (Triton's interpreter before 3.4 does not read the string form).

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_ghostnoise.backends.triton import launcher as _launcher
from lightning_ghostnoise.backends.triton.layout import Layout
from lightning_ghostnoise.backends.triton.layout import blocks as _blocks
from lightning_ghostnoise.backends.triton.layout import cdiv as _cdiv
from lightning_ghostnoise.backends.triton.layout import like as _like

__all__ = ["TritonPasses", "affine", "affine_input_grad", "channel_sums", "moments"]


@triton.jit
def _moments_kernel(x_ptr, mv_ptr, B, C, S, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
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
    tl.store(mv_ptr + b * C + cs, pivot + m, mask=cmask)  # (2, B, C): mean, then variance
    tl.store(mv_ptr + B * C + b * C + cs, var, mask=cmask)


@triton.jit
def _sums_kernel(
    g_ptr, x_ptr, r_ptr, B, C, S, sgb, sgc, sgs, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
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
    tl.store(r_ptr + b * C + cs, tl.sum(acc0, axis=1), mask=cmask)  # (2, B, C): r0, then r1
    tl.store(r_ptr + B * C + b * C + cs, tl.sum(acc1, axis=1), mask=cmask)


@triton.jit
def _affine_kernel(x_ptr, y_ptr, ad_ptr, B, C, S, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = (tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cmask = cs < C
    mask = cmask[:, None] & (ss < S)[None, :]
    a = tl.load(ad_ptr + b * C + cs, mask=cmask, other=0.0)  # (2+, B, C): A, then D
    d = tl.load(ad_ptr + B * C + b * C + cs, mask=cmask, other=0.0)
    at = b * sxb + cs.to(tl.int64)[:, None] * sxc + ss[None, :] * sxs  # y has x's strides
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    y = x * a[:, None] + d[:, None]
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_grad_kernel(
    g_ptr, x_ptr, gx_ptr, a_ptr, pq_ptr, C, S, spb, q_offset,
    sgb, sgc, sgs, sxb, sxc, sxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = (tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cmask = cs < C
    mask = cmask[:, None] & (ss < S)[None, :]
    a = tl.load(a_ptr + b * C + cs, mask=cmask, other=0.0)
    p = tl.load(pq_ptr + b * spb + cs, mask=cmask, other=0.0)  # P, then Q at q_offset
    q = tl.load(pq_ptr + q_offset + b * spb + cs, mask=cmask, other=0.0)
    c64 = cs.to(tl.int64)
    g = tl.load(g_ptr + b * sgb + c64[:, None] * sgc + ss[None, :] * sgs, mask=mask, other=0.0).to(tl.float32)
    at = b * sxb + c64[:, None] * sxc + ss[None, :] * sxs  # grad_x has x's strides
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    gx = g * a[:, None] + x * p[:, None] + q[:, None]
    tl.store(gx_ptr + at, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def moments(x: Tensor, lay: Layout) -> Tensor:
    """Per-(sample, channel) mean and biased variance of ``x`` (``lay``: its :func:`layout`), float32 ``(2, B, C)``.

    Same result as :func:`lightning_ghostnoise.functional.per_sample_moments` (to float32 rounding).
    """
    mv = torch.empty(2, lay.b, lay.c, device=x.device, dtype=torch.float32)
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    _launcher.launch(
        _moments_kernel,
        (lay.b, _cdiv(lay.c, block_c)),
        x,
        mv,
        lay.b,
        lay.c,
        lay.s,
        lay.sb,
        lay.sc,
        lay.ss,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
    )
    return mv


def affine(x: Tensor, lay: Layout, ad: Tensor) -> Tensor:
    """``x * A[b, c] + D[b, c]`` computed in float32, in ``x``'s dtype and layout; ``ad`` is a contiguous
    float32 buffer ``(k >= 2, B, C)`` holding ``A`` then ``D``."""
    y = torch.empty_like(x)  # x is dense: the same strides
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    grid = (lay.b, _cdiv(lay.c, block_c), _cdiv(lay.s, block_s))
    _launcher.launch(
        _affine_kernel, grid, x, y, ad, lay.b, lay.c, lay.s, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s
    )
    return y


def channel_sums(grad_y: Tensor, x: Tensor, lay: Layout) -> Tensor:
    """Per-(sample, channel) ``sum_s grad_y`` and ``sum_s grad_y * x``, float32 ``(2, B, C)``."""
    grad_y, g = _like(grad_y, lay)
    r = torch.empty(2, lay.b, lay.c, device=x.device, dtype=torch.float32)
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    _launcher.launch(
        _sums_kernel,
        (lay.b, _cdiv(lay.c, block_c)),
        grad_y,
        x,
        r,
        lay.b,
        lay.c,
        lay.s,
        g.sb,
        g.sc,
        g.ss,
        lay.sb,
        lay.sc,
        lay.ss,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
    )
    return r


def affine_input_grad(grad_y: Tensor, x: Tensor, lay: Layout, a: Tensor, pq: Tensor) -> Tensor:
    """``grad_y * A[b, c] + x * P + Q`` in ``x``'s dtype and layout.

    ``a``: a contiguous float32 buffer whose first ``(B, C)`` block is ``A``; ``pq``: contiguous
    float32 ``(2, C)`` (per channel) or ``(2, B, C)`` (per sample) holding ``P`` then ``Q``.
    """
    grad_y, g = _like(grad_y, lay)
    out = torch.empty_like(x)
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    grid = (lay.b, _cdiv(lay.c, block_c), _cdiv(lay.s, block_s))
    per_sample = pq.dim() == 3
    _launcher.launch(_input_grad_kernel, grid,
        grad_y, x, out, a, pq, lay.c, lay.s, lay.c if per_sample else 0, pq.numel() // 2,
        g.sb, g.sc, g.ss, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return out


class TritonPasses:
    """The full-size passes on the Triton kernels, for an input of layout ``lay`` (channels at dim 1).

    Small results come stacked in rows, as the kernels keep them: ``moments`` gives ``(2, B, C)``.
    """

    def __init__(self, lay: Layout) -> None:
        self.lay = lay
        self.kernels = True

    def moments(self, x: Tensor, channel_dim: int) -> Tensor:
        """Per-sample mean and variance stacked ``(2, B, C)`` (float32)."""
        return moments(x, self.lay)

    def affine(self, x: Tensor, ad: Tensor, channel_dim: int) -> Tensor:
        """``x * A + D`` with ``A``, ``D`` the first two rows of the float32 ``ad`` ``(k >= 2, B, C)``."""
        return affine(x, self.lay, ad)

    def channel_sums(self, grad_y: Tensor, x: Tensor, channel_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``sum_s grad_y`` and ``sum_s grad_y * x`` stacked ``(2, B, C)`` (float32)."""
        return channel_sums(grad_y, x, self.lay)

    def input_grad(self, grad_y: Tensor, x: Tensor, a_rows: Tensor, pq: Tensor, channel_dim: int) -> Tensor:
        """``grad_y * A + x * P + Q``: ``A`` the first row of ``a_rows``, ``P``, ``Q`` the rows of ``pq``."""
        return affine_input_grad(grad_y, x, self.lay, a_rows, pq)
