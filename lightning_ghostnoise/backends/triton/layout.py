"""How the Triton kernels see a tensor: ``(B, C, S)`` sizes and strides, and their tile sizes.

Example:
    >>> import torch
    >>> strides(torch.zeros(4, 3, 8, 8))
    Layout(b=4, c=3, s=64, sb=192, sc=64, ss=1)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Layout", "blocks", "cdiv", "like", "strides"]

_TILE = 2048  # elements per program and loop step in the full-size kernels
#: samples per step and channels per program in the (B, C) kernels
SMALL_B = 32
SMALL_C = 32
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class Layout(NamedTuple):
    """A tensor seen as ``(B, C, S)``: sizes, and the strides of the batch, channel and spatial index."""

    b: int
    c: int
    s: int
    sb: int
    sc: int
    ss: int


def strides(x: Tensor) -> Layout | None:
    """``x``'s :class:`Layout` if it is contiguous or channels-last (dense), else ``None``."""
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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def _pow2(n: int, low: int = 4) -> int:
    return max(low, 1 << max(int(n) - 1, 0).bit_length())


@functools.lru_cache(maxsize=256)
def blocks(channels: int, spatial: int, channels_adjacent: bool) -> tuple[int, int]:
    """Tile ``(BLOCK_C, BLOCK_S)``: long along the dimension that is contiguous in memory."""
    if channels_adjacent and spatial > 1:  # channels-last
        block_c = min(_pow2(channels), 128)
        return block_c, min(_pow2(spatial), max(4, _TILE // block_c))
    block_s = min(_pow2(spatial), 1024)
    return min(_pow2(channels), max(4, _TILE // block_s)), block_s


def like(grad: Tensor, lay: Layout) -> tuple[Tensor, Layout]:
    """A gradient and its layout (made contiguous if it has none the kernels read)."""
    grad_lay = strides(grad)
    if grad_lay is None:
        grad = grad.contiguous()
        grad_lay = strides(grad)
    assert grad_lay is not None and grad_lay.b == lay.b and grad_lay.c == lay.c and grad_lay.s == lay.s
    return grad, grad_lay
