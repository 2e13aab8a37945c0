"""Ghost-noise versions of PyTorch's normalization layers, and the functions that put them into a model.

Each class subclasses the norm layer it replaces and keeps its parameters and buffers under the same
names, so a ``state_dict`` moves freely between the plain and the ghost-noise model (``strict=True``).
The added buffers (``_ghost_strength``, ``_ghost_state``) are non-persistent: not part of the state dict.

In eval mode, with ``strength == 0``, or when the module itself is in eval mode during training (a
frozen BatchNorm), every layer runs the plain layer's own ``forward``.

Modules: :mod:`~lightning_ghostnoise.layers.base` (the shared :class:`GhostNoiseMixin`),
:mod:`~lightning_ghostnoise.layers.batch_norm`, :mod:`~lightning_ghostnoise.layers.layer_norm`,
:mod:`~lightning_ghostnoise.layers.group_norm`, :mod:`~lightning_ghostnoise.layers.validation` (one
check per setting) and :mod:`~lightning_ghostnoise.layers.convert` (find, apply, revert, reconfigure).

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostBatchNorm2d
    >>> bn = torch.nn.BatchNorm2d(8)
    >>> gbn = GhostBatchNorm2d.from_module(bn, method="gni", ghost_batch_size=16)
    >>> sorted(gbn.state_dict()) == sorted(bn.state_dict())
    True
    >>> gbn(torch.randn(32, 8, 4, 4)).shape
    torch.Size([32, 8, 4, 4])
"""

from lightning_ghostnoise.layers.base import GHOST_BUFFERS, GhostNoiseMixin, is_ghost_layer
from lightning_ghostnoise.layers.batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from lightning_ghostnoise.layers.convert import (
    LAYER_TYPES,
    SurgeryReport,
    apply_ghost_noise,
    find_norm_layers,
    ghost_class_for,
    ghost_layers,
    revert_ghost_noise,
    set_ghost_batch_size,
    set_strength,
)
from lightning_ghostnoise.layers.group_norm import GhostGroupNorm
from lightning_ghostnoise.layers.layer_norm import GhostLayerNorm
from lightning_ghostnoise.layers.validation import (
    MAX_STRENGTH,
    METHODS,
    Method,
    RunningStats,
    default_running_stats,
    min_ghost_batch_size,
    validate_ghost_batch_size,
    validate_noise_eps,
    validate_running_stats,
    validate_strength,
)

__all__ = [
    "METHODS",
    "Method",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostGroupNorm",
    "GhostLayerNorm",
    "GHOST_BUFFERS",
    "GhostNoiseMixin",
    "ghost_class_for",
    "is_ghost_layer",
    "MAX_STRENGTH",
    "RunningStats",
    "default_running_stats",
    "min_ghost_batch_size",
    "validate_ghost_batch_size",
    "validate_noise_eps",
    "validate_running_stats",
    "validate_strength",
    "LAYER_TYPES",
    "SurgeryReport",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
]
