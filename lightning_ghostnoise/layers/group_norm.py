"""Ghost noise for channel groups: :class:`GhostGroupNorm` (GroupNorm, then GNI across the batch).

``GroupNorm(1, C)`` is a channel-first LayerNorm, as in layer-normalized convolutional networks.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostGroupNorm
    >>> layer = GhostGroupNorm.from_module(torch.nn.GroupNorm(1, 4), ghost_batch_size=4)
    >>> layer(torch.randn(8, 4, 3, 3)).shape
    torch.Size([8, 4, 3, 3])
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ghostnoise import backends
from lightning_ghostnoise.layers.base import GhostNoiseMixin
from lightning_ghostnoise.layers.validation import check_batched_input

__all__ = ["GhostGroupNorm"]


class GhostGroupNorm(GhostNoiseMixin, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (e.g. ``GroupNorm(1, C)``, a channel-first LayerNorm), then GNI, then the affine.

    Methods: ``"gni"`` and ``"analytic"``.
    """

    _base = nn.GroupNorm
    _methods = ("gni", "analytic")

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)
        check_batched_input(x, "GhostGroupNorm", "(B, C, *)")
        norm = backends.NativeGroupNorm(self.num_groups, self.eps)
        return self._inject(x, norm, self.weight, self.bias, channel_dim=1)
