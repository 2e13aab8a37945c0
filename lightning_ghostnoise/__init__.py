"""lightning-ghostnoise: ghost noise regularization (GBN, XBN, GNI) for PyTorch and Lightning.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import apply_ghost_noise
    >>> model = apply_ghost_noise(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
"""

from lightning_ghostnoise.callback import GhostNoise
from lightning_ghostnoise.monitor import GhostNoiseMonitor
from lightning_ghostnoise.layers import (
    METHODS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostGroupNorm,
    GhostLayerNorm,
    GhostNoiseMixin,
)
from lightning_ghostnoise.surgery import (
    apply_ghost_noise,
    find_norm_layers,
    ghost_layers,
    revert_ghost_noise,
    set_ghost_batch_size,
    set_strength,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostGroupNorm",
    "GhostLayerNorm",
    "GhostNoise",
    "GhostNoiseMonitor",
    "GhostNoiseMixin",
    "__version__",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
]
