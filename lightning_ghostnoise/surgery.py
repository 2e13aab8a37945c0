"""Former path of :mod:`lightning_ghostnoise.layers.convert`, kept so that existing imports work.

Example:
    >>> from lightning_ghostnoise import surgery
    >>> from lightning_ghostnoise.layers import convert
    >>> surgery.apply_ghost_noise is convert.apply_ghost_noise
    True
"""

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

__all__ = [
    "LAYER_TYPES",
    "SurgeryReport",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_class_for",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
]
