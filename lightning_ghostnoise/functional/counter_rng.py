"""Counter-based random numbers in plain tensor ops: the ghost noise's random source under ``torch.compile``.

A ``torch.Generator`` kept on a module makes ``torch.compile`` break the graph at every draw. These
functions instead derive every random number from ``(key, element index, salt)`` with an integer hash,
so a draw is a pure function of a key tensor: no generator object, no global RNG, no host-device
synchronization, the same numbers on CPU and GPU, and no recompilation when the key changes (it is a
tensor). All arithmetic stays below 2**63 in int64 (no overflow in any backend).

The hash is Chris Wellons' ``lowbias32`` (two xor-shift-multiply rounds), applied twice.

Example:
    >>> import torch
    >>> key = torch.tensor(12345)
    >>> uniform_ints(key, (4, 3), high=10).shape
    torch.Size([4, 3])
    >>> bool((uniform(key, (1000,)) < 1).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["hash32", "mix_key", "normal", "uniform", "uniform_ints"]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, computed without int64 overflow."""
    lo = (x & _M16) * c
    hi = (((x >> 16) * c) & _M16) << 16
    return (lo + hi) & _M32


def hash32(x: Tensor) -> Tensor:
    """``lowbias32``: a 32-bit integer hash with strong avalanche; input and output in ``[0, 2**32)``."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix_key(seed: Tensor, counter: Tensor | int = 0) -> Tensor:
    """A 32-bit key from a 64-bit seed tensor and a counter (e.g. the number of draws so far)."""
    seed = seed.to(torch.int64)
    h = hash32(seed & _M32)
    h = hash32(h ^ ((seed >> 32) & _M32))
    return hash32(h ^ (torch.as_tensor(counter, device=seed.device, dtype=torch.int64) & _M32))


def _bits(key: Tensor, shape: Sequence[int], salt: int, device: torch.device | None) -> Tensor:
    n = math.prod(shape)
    idx = torch.arange(n, device=device if device is not None else key.device, dtype=torch.int64)
    h = hash32(hash32(idx ^ (salt & _M32)) ^ key.to(torch.int64))
    return hash32(h + 0x9E3779B9).reshape(tuple(shape))


def uniform_ints(
    key: Tensor, shape: Sequence[int], high: int, salt: int = 0, device: torch.device | None = None
) -> Tensor:
    """Integers uniform in ``[0, high)`` (``high < 2**31``), one per element of ``shape``."""
    if not 0 < high < 2**31:
        raise ValueError(f"high must be in [1, 2**31), got {high}.")
    return (_bits(key, shape, salt, device) * high) >> 32


def uniform(key: Tensor, shape: Sequence[int], salt: int = 0, device: torch.device | None = None) -> Tensor:
    """Float32 numbers uniform in the open interval ``(0, 1)`` (24 random bits each)."""
    return ((_bits(key, shape, salt, device) >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)


def normal(key: Tensor, shape: Sequence[int], salt: int = 0, device: torch.device | None = None) -> Tensor:
    """Standard normal float32 numbers (Box-Muller on two independent uniform streams)."""
    u1 = uniform(key, shape, salt=2 * salt + 1, device=device)
    u2 = uniform(key, shape, salt=2 * salt + 2, device=device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
