"""Triton kernels: the CUDA fast path of the fused BatchNorm-family layers.

In eager mode a ghost noise layer is a handful of full-size passes (BatchNorm's own number) plus
small ``(B, C)`` math: on a GPU each small op is a kernel launch, and a layer written in plain
PyTorch launches dozens of them. These kernels do the same work in three launches forward and three
backward, every intermediate in float32:

* :func:`moments` -- per-(sample, channel) mean and variance (one read of ``x``);
* :func:`gni_coefficients` (GNI, analytic GNI) or :func:`ghost_statistics_coefficients` (GBN, XBN)
  -- batch statistics, running statistics, the noise or the ghost statistics, and the
  per-(sample, channel) affine ``(A, D)``;
* :func:`affine` -- ``y = x * A + D``;
* :func:`channel_sums` -- ``sum_s grad_y`` and ``sum_s grad_y * x`` (one read of each);
* :func:`gni_input_coefficients` or :func:`ghost_statistics_input_coefficients` -- the closed-form
  backward of the coefficients;
* :func:`affine_input_grad` -- ``grad_x = grad_y * A + x * P + Q``.

They compute the formulas of :mod:`lightning_ghostnoise.functional` (which stays the reference, and
the CPU path) from the same random draws; the tests check each kernel against it, on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``) and on CUDA natively, and compile every kernel for an
H100 target. Inputs are ``(B, C, *spatial)`` in a contiguous or channels-last layout, in float32,
float16 or bfloat16 (:func:`layout` says whether a tensor qualifies; the callers fall back to plain
PyTorch otherwise). Small results come stacked in one buffer (e.g. ``moments`` returns ``(2, B, C)``:
mean then variance), which saves allocations: in eager mode the host-side cost per layer is what
limits a small model's step on a GPU.

``GHOSTNOISE_TRITON=0`` in the environment turns the kernels off (for A/B comparisons).

Example:
    >>> import torch
    >>> from lightning_ghostnoise import kernels
    >>> kernels.supports(torch.randn(4, 3, 8, 8))  # CPU tensors take the PyTorch path
    False
"""

from __future__ import annotations

import functools
import math
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
    "Layout",
    "affine",
    "affine_input_grad",
    "available",
    "channel_sums",
    "ghost_statistics_coefficients",
    "ghost_statistics_input_coefficients",
    "gni_coefficients",
    "gni_input_coefficients",
    "layout",
    "moments",
    "supports",
]

#: Run the kernels on CPU tensors too (through Triton's interpreter): for tests only.
ALLOW_CPU = False

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048  # elements per program and loop step in the full-size kernels
_SMALL_B = 32  # samples per step in the (B, C) kernels
_SMALL_C = 32  # channels per program in the (B, C) kernels
#: Above this batch size the per-channel statistics of the (B, C) kernels get a launch of their own
#: (one program per 32 channels, looping over the batch) rather than being recomputed by every program
#: of a channel block (parallel, but work quadratic in B). Measured on an H100 (ResNet-18, batch 1024,
#: bf16): recomputing was faster (GNI step 22.0 ms vs 24.5 ms with the separate launch), so the split
#: starts above that; where it starts to pay (by the quadratic work, somewhere below 4096) is not measured.
SPLIT_BATCH = 2048
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def available() -> bool:
    """Whether Triton is importable and not turned off with ``GHOSTNOISE_TRITON=0``."""
    return triton is not None and os.environ.get("GHOSTNOISE_TRITON", "1") != "0"


class Layout(NamedTuple):
    """A tensor seen as ``(B, C, S)``: sizes, and the strides of the batch, channel and spatial index."""

    b: int
    c: int
    s: int
    sb: int
    sc: int
    ss: int


def _strides(x: Tensor) -> Optional[Layout]:
    shape = x.shape
    b, c = shape[0], shape[1]
    if len(shape) == 2:
        return Layout(b, c, 1, c, 1, 1) if x.is_contiguous() else None
    s = x.numel() // max(b * c, 1)
    if x.is_contiguous():
        return Layout(b, c, s, c * s, s, 1)
    fmt = _CHANNELS_LAST.get(len(shape))
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return Layout(b, c, s, s * c, 1, c)
    return None


def layout(x: Tensor) -> Optional[Layout]:
    """``x``'s :class:`Layout` if the kernels take it, else ``None``.

    They take a CUDA tensor ``(B, C, *spatial)`` (2 to 5 dims, not empty) of float32, float16 or
    bfloat16, contiguous or channels-last, outside ``torch.compile`` (which fuses the PyTorch path
    itself), with Triton available.
    """
    if torch.compiler.is_compiling():  # first: nothing below is traced into a compiled graph
        return None
    if not ((x.is_cuda or ALLOW_CPU) and x.dtype in _DTYPES and 2 <= x.dim() <= 5 and x.numel() > 0):
        return None
    if not available():
        return None
    return _strides(x)


def supports(x: Tensor) -> bool:
    """Whether the kernels take ``x`` (see :func:`layout`)."""
    return layout(x) is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, low: int = 4) -> int:
    return max(low, 1 << max(int(n) - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _blocks(channels: int, spatial: int, channels_adjacent: bool) -> Tuple[int, int]:
    """Tile ``(BLOCK_C, BLOCK_S)``: long along the dimension that is contiguous in memory."""
    if channels_adjacent and spatial > 1:  # channels-last
        block_c = min(_pow2(channels), 128)
        return block_c, min(_pow2(spatial), max(4, _TILE // block_c))
    block_s = min(_pow2(spatial), 1024)
    return min(_pow2(channels), max(4, _TILE // block_s)), block_s


#: Launch a kernel's cached compiled form directly once it has run (see :class:`_Launcher`);
#: ``GHOSTNOISE_FAST_LAUNCH=0`` in the environment always goes through ``kernel[grid](...)``.
FAST_LAUNCH = os.environ.get("GHOSTNOISE_FAST_LAUNCH", "1") != "0"


def _key(device: int, args: Tuple[object, ...], meta: dict) -> Tuple[object, ...]:
    """A cache key that determines Triton's specialization of a launch (and more: exact integers).

    Triton specializes on each tensor's dtype and 16-byte alignment, each integer's value being 1,
    divisible by 16 or beyond int32, the other arguments' types and the constexprs. The key holds
    the tensors' dtypes and addresses modulo 16, the integers themselves, the other arguments' types
    and the constexprs by name: equal keys imply equal specializations.
    """
    key: list = [device]
    for arg in args:
        if type(arg) is int:
            key.append(arg)
        elif isinstance(arg, Tensor):
            key.append(arg.dtype)
            key.append(arg.data_ptr() % 16)
        else:
            key.append(type(arg))
    key.extend(meta.items())
    return tuple(key)


def _current_device() -> int:
    """The current CUDA device (the one Triton launches on), ``-1`` before CUDA is initialized."""
    return torch._C._cuda_getDevice() if torch.cuda.is_initialized() else -1


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _hook_active(hook: object) -> bool:
    # Triton >= 3.5 keeps a (usually empty) HookChain here; earlier ones a function or None
    return hook is not None and bool(getattr(hook, "calls", True))


_KNOBS = getattr(triton, "knobs", None)  # Triton >= 3.4


def _launch_hook_set() -> bool:
    """Whether a launch hook is installed (or this Triton has no ``knobs``: an older one, Triton's path)."""
    if _KNOBS is None:
        return True
    runtime = _KNOBS.runtime
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


_CACHE_SIZE = 256  # specializations kept per kernel


class _Launcher:
    """``fn[grid](*args, **constexprs)`` with less host work per call.

    Triton's launch binds and specializes every argument, builds a cache key and looks the compiled
    kernel up on every call: in eager mode, where a small model's step is bound by the host, that
    is a visible part of a layer's cost. The first call for a given key (the current device and
    :func:`_key`: dtypes and alignment of the tensors, the integers, the constexprs) goes through
    Triton and keeps the compiled kernel it returns; later calls with the same key hand the
    arguments straight to that kernel's launcher,
    as Triton's own launch does after its lookup. Launch hooks (profilers such as proton), the
    interpreter, Triton versions without ``triton.knobs`` and ``GHOSTNOISE_FAST_LAUNCH=0`` take
    Triton's path.
    """

    def __init__(self, fn: object) -> None:
        self.fn = fn
        self.cache: dict = {}

    def __call__(self, grid: Tuple[int, ...], args: Tuple[object, ...], meta: dict) -> None:
        if not FAST_LAUNCH or _launch_hook_set():
            self.fn[grid](*args, **meta)  # type: ignore[index]
            return
        device = _current_device()
        key = _key(device, args, meta)
        hit = self.cache.get(key)
        if hit is None:
            if len(self.cache) >= _CACHE_SIZE:  # keys hold exact integers: bound the cache
                self.cache.clear()
            compiled = self.fn[grid](*args, **meta)  # type: ignore[index]
            if hasattr(compiled, "result"):  # an asynchronous compile
                compiled = compiled.result()
            names = list(getattr(self.fn, "arg_names", ()))
            rest = names[len(args) :]
            if device >= 0 and hasattr(compiled, "packed_metadata") and sorted(rest) == sorted(meta):
                self.cache[key] = (compiled, tuple(meta[n] for n in rest))
            else:  # the interpreter (or an unexpected signature): Triton's path from now on
                self.cache[key] = False
            return
        if hit is False:
            self.fn[grid](*args, **meta)  # type: ignore[index]
            return
        compiled, constexprs = hit
        dims = tuple(grid) + (1, 1)
        compiled.run(
            dims[0], dims[1], dims[2], _current_stream(device), compiled.function, compiled.packed_metadata,
            None, None, None, *args, *constexprs,
        )  # fmt: skip


_LAUNCHERS: dict = {}


def _launch(fn: object, grid: Tuple[int, ...], *args: object, **meta: object) -> None:
    """Launch the Triton kernel ``fn`` on ``grid``: ``fn[grid](*args, **meta)`` (see :class:`_Launcher`)."""
    launcher = _LAUNCHERS.get(id(fn))
    if launcher is None or launcher.fn is not fn:
        launcher = _LAUNCHERS[id(fn)] = _Launcher(fn)
    launcher(grid, args, meta)


def _like(grad: Tensor, lay: Layout) -> Tuple[Tensor, Layout]:
    """A gradient and its layout (made contiguous if it has none the kernels read)."""
    grad_lay = _strides(grad)
    if grad_lay is None:
        grad = grad.contiguous()
        grad_lay = _strides(grad)
    assert grad_lay is not None and grad_lay.b == lay.b and grad_lay.c == lay.c and grad_lay.s == lay.s
    return grad, grad_lay


if triton is not None:

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
    def _affine_kernel(
        x_ptr, y_ptr, ad_ptr, B, C, S, sxb, sxc, sxs, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
    ):
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
            for j in range(0, N):
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
            std_g, std_eff, shifted = _ghost_stats_effective(gm, gvar, bm, std_b, centre, s, eps, SHIFT_NOISE, SCALE_NOISE)
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


def moments(x: Tensor, lay: Layout) -> Tensor:
    """Per-(sample, channel) mean and biased variance of ``x`` (``lay``: its :func:`layout`), float32 ``(2, B, C)``.

    Same result as :func:`lightning_ghostnoise.functional.per_sample_moments` (to float32 rounding).
    """
    mv = torch.empty(2, lay.b, lay.c, device=x.device, dtype=torch.float32)
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    _launch(_moments_kernel, (lay.b, _cdiv(lay.c, block_c)),
        x, mv, lay.b, lay.c, lay.s, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s
    )
    return mv


def affine(x: Tensor, lay: Layout, ad: Tensor) -> Tensor:
    """``x * A[b, c] + D[b, c]`` computed in float32, in ``x``'s dtype and layout; ``ad`` is a contiguous
    float32 buffer ``(k >= 2, B, C)`` holding ``A`` then ``D``."""
    y = torch.empty_like(x)  # x is dense: the same strides
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    grid = (lay.b, _cdiv(lay.c, block_c), _cdiv(lay.s, block_s))
    _launch(_affine_kernel, grid, x, y, ad, lay.b, lay.c, lay.s, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s)
    return y


def channel_sums(grad_y: Tensor, x: Tensor, lay: Layout) -> Tensor:
    """Per-(sample, channel) ``sum_s grad_y`` and ``sum_s grad_y * x``, float32 ``(2, B, C)``."""
    grad_y, g = _like(grad_y, lay)
    r = torch.empty(2, lay.b, lay.c, device=x.device, dtype=torch.float32)
    block_c, block_s = _blocks(lay.c, lay.s, lay.sc == 1)
    _launch(_sums_kernel, (lay.b, _cdiv(lay.c, block_c)),
        grad_y, x, r, lay.b, lay.c, lay.s, g.sb, g.sc, g.ss, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s
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
    _launch(_input_grad_kernel, grid,
        grad_y, x, out, a, pq, lay.c, lay.s, lay.c if per_sample else 0, pq.numel() // 2,
        g.sb, g.sc, g.ss, lay.sb, lay.sc, lay.ss, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return out


def _split_channel_moments(mv: Tensor) -> Tensor:
    """``(3, C)``: per channel the centre and the batch means of ``c`` and ``e`` (see the kernel)."""
    _, batch, channels = mv.shape
    cm = torch.empty(3, channels, device=mv.device, dtype=torch.float32)
    _launch(_channel_moments_kernel, (_cdiv(channels, _SMALL_C),), mv, cm, batch, channels, BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C)
    return cm


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
) -> Tuple[Tensor, Tensor]:
    """GNI's forward ``(B, C)`` math in one launch (see ``functional._GhostNoiseBatchNorm``).

    From the per-sample moments ``mv`` (:func:`moments`): the batch statistics (updating the running
    statistics in place), the noise of the normalized features from the ghost ``indices`` ``(B, N)``
    -- or analytic GNI's ``normal`` and ``gamma`` draws (``functional.analytic_draws``) with its
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
    n = int(ghost_batch_size) if analytic else indices.shape[1]  # type: ignore[union-attr, arg-type]
    cm = _split_channel_moments(mv) if batch > SPLIT_BATCH else mv
    _launch(_gni_coefficients_kernel, (_cdiv(channels, _SMALL_C), _cdiv(batch, _SMALL_B)),
        mv, cm,
        mv if analytic else indices.contiguous(),  # type: ignore[union-attr]
        normal.float().contiguous() if analytic else mv,  # type: ignore[union-attr]
        gamma.float().contiguous() if analytic else mv,  # type: ignore[union-attr]
        weight if weight is not None else mv, bias if bias is not None else mv,
        running_mean if has_running else mv, running_var if has_running else mv, strength, coef, stats,
        batch, channels, n, math.sqrt(n), float(momentum), count / max(count - 1, 1), float(eps), float(noise_eps),
        STATS_GIVEN=batch > SPLIT_BATCH, ANALYTIC=analytic, HAS_W=weight is not None, HAS_BIAS=bias is not None,
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
    _launch(_gni_input_coefficients_kernel, (_cdiv(channels, _SMALL_C),),
        r, coef, stats, weight if weight is not None else stats, out, batch, channels, float(count),
        HAS_W=weight is not None, BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return out


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
) -> Tuple[Tensor, Tensor]:
    """GBN's (XBN's with ``exclusive``) forward ``(B, C)`` math in one launch (see
    ``functional._GhostStatisticsBatchNorm``): batch and ghost statistics from the per-sample moments
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
    cm = _split_channel_moments(mv) if batch > SPLIT_BATCH else mv
    _launch(_ghost_stats_coefficients_kernel, (_cdiv(channels, _SMALL_C), groups),
        mv, cm, weight if weight is not None else mv, bias if bias is not None else mv,
        running_mean if has_running else mv, running_var if has_running else mv, strength, per_sample, per_channel,
        batch, channels, ghost_batch_size, groups, float(momentum), count / max(count - 1, 1), float(eps),
        STATS_GIVEN=batch > SPLIT_BATCH, EXCLUSIVE=bool(exclusive), HAS_W=weight is not None, HAS_BIAS=bias is not None,
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
) -> Tuple[Tensor, Tensor]:
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
    split = batch > SPLIT_BATCH
    if split:
        _launch(_ghost_stats_channel_grads_kernel, (_cdiv(channels, _SMALL_C),),
            r, per_sample, per_channel, strength, cg, batch, channels, float(eps),
            SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise), BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
        )  # fmt: skip
    _launch(_ghost_stats_input_coefficients_kernel, (_cdiv(channels, _SMALL_C), groups),
        r, mv, per_sample, per_channel, strength, pq, cg, batch, channels, ghost_batch_size, groups, float(count),
        float(eps), GRADS_GIVEN=split, EXCLUSIVE=bool(exclusive), SHIFT_NOISE=bool(shift_noise), SCALE_NOISE=bool(scale_noise),
        BLOCK_B=_SMALL_B, BLOCK_C=_SMALL_C,
    )  # fmt: skip
    return pq, cg[:2]
