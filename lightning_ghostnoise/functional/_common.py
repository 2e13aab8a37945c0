"""Small helpers shared by the reference math: autocast state, spatial dimensions, strength tensors."""

from __future__ import annotations

import contextlib
from typing import Union

import torch
from torch import Tensor

#: A noise strength: a float, or a 0-dim tensor (a tensor avoids recompilation when it changes).
StrengthLike = Union[float, Tensor]


def autocast_state(device: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for ``device``, else ``None``."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled while it is on: the small statistics math (matrix products included) stays in float32."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def spatial_dims(x: Tensor, channel_dim: int) -> tuple[int, ...]:
    """The dimensions of ``x`` other than the batch (0) and the channel one."""
    channel_dim = channel_dim % x.dim()
    return tuple(d for d in range(1, x.dim()) if d != channel_dim)


def spatial_count(x: Tensor, channel_dim: int) -> int:
    """Values per (sample, channel): the product of the spatial sizes (1 for an empty ``x``)."""
    return x.numel() // (x.shape[0] * x.shape[channel_dim]) if x.numel() else 1


def as_strength(strength: StrengthLike, like: Tensor) -> Tensor:
    """``strength`` as a 0-dim tensor on ``like``'s device, in ``like``'s dtype."""
    s = strength if isinstance(strength, Tensor) else torch.tensor(float(strength), dtype=torch.float32)
    return s.to(device=like.device, dtype=like.dtype)
