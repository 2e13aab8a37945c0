"""The CUDA backend: Triton kernels for the fused BatchNorm-family layers (imported on first use).

In eager mode a ghost noise layer is a handful of full-size passes (BatchNorm's own number) plus
small ``(B, C)`` math: on a GPU each small op is a kernel launch. These kernels do the same work in
three launches forward and three backward, every intermediate in float32:

- :mod:`~lightning_ghostnoise.backends.triton.layout`: how a tensor is seen, ``(B, C, S)`` with strides;
- :mod:`~lightning_ghostnoise.backends.triton.launcher`: the cached launch (less host time);
- :mod:`~lightning_ghostnoise.backends.triton.kernels`: moments, affine, the backward's sums and input gradient;
- :mod:`~lightning_ghostnoise.backends.triton.gni` and
  :mod:`~lightning_ghostnoise.backends.triton.ghost_statistics`: the coefficient kernels;
- :mod:`~lightning_ghostnoise.backends.triton.custom_ops`: those as custom ops for compiled graphs (opt-in).

This package's ``__init__`` does not import Triton; its modules do.
"""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["clear_caches", "load_custom_ops", "load_ghost_statistics", "load_gni"]

# Loaders of the modules that import Triton, called where a layer takes this backend. Plain import
# statements: torch.compile traces them inside the layers' autograd functions (importlib it does not).


def load_gni() -> ModuleType:
    """:mod:`~lightning_ghostnoise.backends.triton.gni`, imported on first use."""
    from lightning_ghostnoise.backends.triton import gni as module

    return module


def load_ghost_statistics() -> ModuleType:
    """:mod:`~lightning_ghostnoise.backends.triton.ghost_statistics`, imported on first use."""
    from lightning_ghostnoise.backends.triton import ghost_statistics as module

    return module


def load_custom_ops() -> ModuleType:
    """:mod:`~lightning_ghostnoise.backends.triton.custom_ops`, imported (and registered) on first use."""
    from lightning_ghostnoise.backends.triton import custom_ops as module

    return module


def clear_caches() -> None:
    """Forget the cached compiled kernels of the launcher, if it was used."""
    launcher = sys.modules.get("lightning_ghostnoise.backends.triton.launcher")
    if launcher is not None:
        launcher.clear()
