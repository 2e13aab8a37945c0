"""The fused forward and backward of the ghost noise layers, and where they run.

The layers call these entry points; each asks :func:`~lightning_ghostnoise.backends.dispatch.select`
for a path (plain autograd over :mod:`lightning_ghostnoise.functional`, the fused function on the
PyTorch passes, or on the Triton kernels) from the input and :mod:`lightning_ghostnoise.config`.

- :func:`ghost_noise_batch_norm`: GNI (and analytic GNI) on BatchNorm.
- :func:`ghost_batch_norm`, :func:`exclusive_batch_norm`: GBN and XBN.
- :func:`normalized_noise`: GNI after LayerNorm or GroupNorm (:class:`NativeLayerNorm`, :class:`NativeGroupNorm`).
- :func:`moment_affine`: any coefficients of the per-sample moments (``sync=True``).

Example:
    >>> import torch
    >>> from lightning_ghostnoise import backends
    >>> backends.ghost_batch_norm(torch.randn(8, 3, 4, 4), 4).shape
    torch.Size([8, 3, 4, 4])
"""

from lightning_ghostnoise.backends.dispatch import Choice, select
from lightning_ghostnoise.backends.ghost_batch_norm import (
    exclusive_batch_norm,
    ghost_batch_norm,
)
from lightning_ghostnoise.backends.gni_batch_norm import ghost_noise_batch_norm
from lightning_ghostnoise.backends.moment_affine import moment_affine
from lightning_ghostnoise.backends.native_norm import (
    NativeGroupNorm,
    NativeLayerNorm,
    NativeNorm,
)
from lightning_ghostnoise.backends.normalized import normalized_noise

__all__ = [
    "Choice",
    "NativeGroupNorm",
    "NativeLayerNorm",
    "NativeNorm",
    "exclusive_batch_norm",
    "ghost_batch_norm",
    "ghost_noise_batch_norm",
    "moment_affine",
    "normalized_noise",
    "select",
]
