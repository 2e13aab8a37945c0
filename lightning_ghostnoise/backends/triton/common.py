"""Triton helpers shared by the coefficient kernels (GNI and GBN/XBN): running statistics, the affine
parameters, and the per-channel batch moments (:func:`split_channel_moments` for large batches)."""

# No `from __future__ import annotations`: the kernels' `tl.constexpr` annotations must be objects
# (Triton's interpreter before 3.4 does not read the string form).

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_ghostnoise.backends.triton import launcher as _launcher
from lightning_ghostnoise.backends.triton.layout import SMALL_B as _SMALL_B
from lightning_ghostnoise.backends.triton.layout import SMALL_C as _SMALL_C
from lightning_ghostnoise.backends.triton.layout import cdiv as _cdiv

__all__ = ["split_channel_moments"]


@triton.jit
def _update_running(rm_ptr, rv_ptr, cs, cmask, mean, var, momentum, unbias):
    """``running = running + momentum * (batch - running)``; the variance made unbiased."""
    rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    rm = rm + momentum * (mean - rm)
    rv = rv + momentum * (var * unbias - rv)
    tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _affine_params(w_ptr, bias_ptr, cs, cmask, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The layer's weight and bias in float32 (1 and 0 when absent)."""
    if HAS_W:
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    return w, bias


@triton.jit
def _channel_moments(mean_ptr, var_ptr, cs, cmask, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel: the centre (mean of the per-sample means m), and the means of c = m - centre
    and of e = v + c**2 over the batch."""
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
    return centre, tl.sum(acc_c, axis=0) / B, tl.sum(acc_e, axis=0) / B


@triton.jit
def _batch_moments(mv_ptr, cm_ptr, cs, cmask, B, C, GIVEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_channel_moments`, read from ``cm_ptr`` ``(3, C)`` when a previous launch computed them."""
    if GIVEN:
        centre = tl.load(cm_ptr + cs, mask=cmask, other=0.0)
        mean_c = tl.load(cm_ptr + C + cs, mask=cmask, other=0.0)
        mean_e = tl.load(cm_ptr + 2 * C + cs, mask=cmask, other=0.0)
    else:
        centre, mean_c, mean_e = _channel_moments(mv_ptr, mv_ptr + B * C, cs, cmask, B, C, BLOCK_B, BLOCK_C)
    return centre, mean_c, mean_e


@triton.jit
def _channel_moments_kernel(mv_ptr, cm_ptr, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Large batches: the batch statistics once per channel, instead of in every program of a column."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    centre, mean_c, mean_e = _channel_moments(mv_ptr, mv_ptr + B * C, cs, cmask, B, C, BLOCK_B, BLOCK_C)
    tl.store(cm_ptr + cs, centre, mask=cmask)
    tl.store(cm_ptr + C + cs, mean_c, mask=cmask)
    tl.store(cm_ptr + 2 * C + cs, mean_e, mask=cmask)


def split_channel_moments(mv: Tensor) -> Tensor:
    """``(3, C)``: per channel the centre and the batch means of ``c`` and ``e`` (see the kernel)."""
    _, batch, channels = mv.shape
    cm = torch.empty(3, channels, device=mv.device, dtype=torch.float32)
    _launcher.launch(
        _channel_moments_kernel,
        (_cdiv(channels, _SMALL_C),),
        mv,
        cm,
        batch,
        channels,
        BLOCK_B=_SMALL_B,
        BLOCK_C=_SMALL_C,
    )
    return cm
