"""Ghost noise for token features: :class:`GhostLayerNorm` (LayerNorm, then GNI across the batch).

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostLayerNorm
    >>> layer = GhostLayerNorm.from_module(torch.nn.LayerNorm(6), ghost_batch_size=4)
    >>> layer(torch.randn(8, 5, 6)).shape
    torch.Size([8, 5, 6])
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ghostnoise import backends
from lightning_ghostnoise.layers.base import GhostNoiseMixin
from lightning_ghostnoise.layers.validation import check_batched_input

__all__ = ["GhostLayerNorm"]


class GhostLayerNorm(GhostNoiseMixin, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` over the last dimension, then GNI across the batch, then the affine.

    Input ``(B, *, D)``: the channel is the last dimension and every middle dimension (tokens,
    positions) plays the role of spatial positions. The batch is dimension 0 (use ``batch_first=True``
    transformers). Methods: ``"gni"`` and ``"analytic"``.
    """

    _base = nn.LayerNorm
    _methods = ("gni", "analytic")

    @classmethod
    def _check_module(cls, module: nn.Module) -> None:
        assert isinstance(module, nn.LayerNorm)  # from_module checked the exact type
        if len(module.normalized_shape) != 1:
            raise ValueError(
                f"GhostLayerNorm supports LayerNorm over the last dimension only, got normalized_shape="
                f"{tuple(module.normalized_shape)}. Exclude this layer, or use GroupNorm(1, C) for "
                "channel-first feature maps."
            )

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)
        check_batched_input(x, "GhostLayerNorm", "(B, *, D)")
        norm = backends.NativeLayerNorm(self.normalized_shape, self.eps)
        return self._inject(x, norm, self.weight, self.bias, channel_dim=-1)
