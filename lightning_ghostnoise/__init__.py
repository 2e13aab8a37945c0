"""lightning-ghostnoise: ghost noise regularization (GBN, XBN, GNI) for PyTorch and Lightning.

The layers and the functions that rewrite a model need torch alone. The Lightning callbacks
(:class:`GhostNoise`, :class:`GhostNoiseMonitor`) and :func:`analyze_noise` are imported on first
use, so ``from lightning_ghostnoise import apply_ghost_noise`` does not import Lightning.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import apply_ghost_noise
    >>> model = apply_ghost_noise(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

from lightning_ghostnoise.layers import (
    METHODS,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostGroupNorm,
    GhostLayerNorm,
    GhostNoiseMixin,
    apply_ghost_noise,
    find_norm_layers,
    ghost_layers,
    revert_ghost_noise,
    set_ghost_batch_size,
    set_strength,
)

if TYPE_CHECKING:
    from lightning_ghostnoise.analysis import analyze_noise
    from lightning_ghostnoise.callbacks import GhostNoise, GhostNoiseMonitor
    from lightning_ghostnoise.controller import GhostNoiseController

__version__ = "0.1.0"

#: Public names imported on first access: the Lightning callbacks, the controller and the analysis tools.
_LAZY: Dict[str, str] = {
    "GhostNoise": "lightning_ghostnoise.callbacks.ghost_noise",
    "GhostNoiseController": "lightning_ghostnoise.controller",
    "GhostNoiseMonitor": "lightning_ghostnoise.callbacks.monitor",
    "analyze_noise": "lightning_ghostnoise.analysis",
}
#: Submodules reachable as attributes without an import of their own, as when the package imported them eagerly.
_LAZY_MODULES = ("analysis", "callback", "callbacks", "monitor", "schedules", "surgery")

__all__ = [
    "METHODS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostGroupNorm",
    "GhostLayerNorm",
    "GhostNoise",
    "GhostNoiseController",
    "GhostNoiseMonitor",
    "GhostNoiseMixin",
    "__version__",
    "analyze_noise",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
]


def __getattr__(name: str) -> Any:
    """Import the Lightning callbacks and ``analyze_noise`` on first access (PEP 562)."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
