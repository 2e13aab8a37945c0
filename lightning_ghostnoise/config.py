"""Where the layers' math runs: the one place backends are chosen.

The BatchNorm-family layers compute their forward and backward with fused passes, either in PyTorch
(any device, and what ``torch.compile`` traces) or in Triton kernels (CUDA, eager).
:func:`lightning_ghostnoise.backends.dispatch.select` picks one per call from these settings and says
why. Defaults come from the environment, read once when this module is imported:

- ``GHOSTNOISE_TRITON=0``: :func:`set_backend` ``("torch")``.
- ``GHOSTNOISE_FAST_LAUNCH=0``: :func:`enable_fast_launch` ``(False)``.
- ``GHOSTNOISE_COMPILED_KERNELS=1``: :func:`enable_compiled_kernels` ``(True)``.

Example:
    >>> from lightning_ghostnoise import config
    >>> config.get_backend()
    'auto'
    >>> with config.use_backend("torch"):
    ...     config.get_backend()
    'torch'
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "BACKENDS",
    "Settings",
    "clear_caches",
    "compiled_kernels_enabled",
    "enable_compiled_kernels",
    "enable_fast_launch",
    "get_backend",
    "set_backend",
    "settings",
    "use_backend",
]

#: The accepted backends. ``"auto"``: Triton kernels for CUDA tensors they take (eager), PyTorch
#: elsewhere; ``"torch"``: PyTorch everywhere; ``"triton"``: the Triton kernels wherever they can run,
#: CPU tensors included when Triton's interpreter is on (``TRITON_INTERPRET=1``, used by the tests).
BACKENDS = ("auto", "torch", "triton")


@dataclasses.dataclass
class Settings:
    """The current choices (read them with :func:`settings`, change them with the functions below)."""

    #: one of :data:`BACKENDS`
    backend: str = "auto"
    #: under ``torch.compile``, call the Triton coefficient kernels as custom ops (opt-in)
    compiled_kernels: bool = False
    #: launch cached Triton kernels through their compiled launcher (less host time per launch)
    fast_launch: bool = True
    #: batch size above which the Triton coefficient kernels compute the per-channel statistics in a
    #: launch of their own (a tuning constant; tests lower it to exercise that launch)
    split_batch: int = 2048


_SETTINGS = Settings(
    backend="torch" if os.environ.get("GHOSTNOISE_TRITON", "1") == "0" else "auto",
    fast_launch=os.environ.get("GHOSTNOISE_FAST_LAUNCH", "1") != "0",
)


def settings() -> Settings:
    """The current settings (the live object: read it, change it through the functions of this module)."""
    return _SETTINGS


def triton_installed() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def set_backend(backend: str) -> None:
    """Choose where the layers' fused passes run: ``"auto"`` (default), ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: for another value.
        RuntimeError: ``"triton"`` without Triton installed.

    Example:
        >>> set_backend("torch"); get_backend()
        'torch'
        >>> set_backend("auto")
    """
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}.")
    backend = backend.lower()
    if backend == "triton" and not triton_installed():
        raise RuntimeError("backend 'triton' needs Triton: pip install triton (it ships with CUDA builds of torch).")
    _SETTINGS.backend = backend


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` (``"auto"`` unless changed)."""
    return _SETTINGS.backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """:func:`set_backend` for a ``with`` block; the previous backend is restored on exit.

    Example:
        >>> with use_backend("torch"):
        ...     get_backend()
        'torch'
    """
    previous = _SETTINGS.backend
    set_backend(backend)
    try:
        yield
    finally:
        _SETTINGS.backend = previous


def enable_compiled_kernels(enabled: bool = True) -> None:
    """Under ``torch.compile``, run the small per-(sample, channel) math of GBN, XBN and GNI as one
    Triton kernel forward and one backward, called as custom ops (``torch.ops.ghostnoise.*``), which
    are registered by the first call with ``enabled=True``. Takes effect for graphs traced afterwards.

    Raises:
        RuntimeError: ``enabled`` without Triton installed.
    """
    if enabled:
        if not triton_installed():
            raise RuntimeError("compiled kernels need Triton: pip install triton.")
        importlib.import_module("lightning_ghostnoise.backends.triton.custom_ops")  # registers the ops
    _SETTINGS.compiled_kernels = bool(enabled)


def compiled_kernels_enabled() -> bool:
    """Whether :func:`enable_compiled_kernels` is on."""
    return _SETTINGS.compiled_kernels


def enable_fast_launch(enabled: bool = True) -> None:
    """Launch cached Triton kernels through their compiled launcher (default) or always through
    Triton's ``kernel[grid](...)`` (``False``; the bits are the same)."""
    _SETTINGS.fast_launch = bool(enabled)


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change any :class:`Settings` fields for a ``with`` block (tests, benchmarks); restored on exit.

    Example:
        >>> with override(split_batch=4) as s:
        ...     s.split_batch
        4
    """
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Settings)]}."
        )
    previous = dataclasses.replace(_SETTINGS)
    if "backend" in changes:
        set_backend(changes.pop("backend"))
    if changes.pop("compiled_kernels", False):
        enable_compiled_kernels(True)
    for name, value in changes.items():
        setattr(_SETTINGS, name, value)
    try:
        yield _SETTINGS
    finally:
        for f in dataclasses.fields(Settings):
            setattr(_SETTINGS, f.name, getattr(previous, f.name))


def clear_caches() -> None:
    """Free the package's process-wide caches (ghost averaging matrices, small constant tensors, Triton
    launch caches), e.g. before releasing a device. Each is bounded; they refill on use."""
    from lightning_ghostnoise.backends import native_norm
    from lightning_ghostnoise.functional import batch_norm, sampling

    batch_norm.cached_ghost_matrix.cache_clear()
    sampling._gamma_shape.cache_clear()
    native_norm.clear_caches()
    launcher = importlib.import_module("lightning_ghostnoise.backends.triton") if triton_installed() else None
    if launcher is not None:
        launcher.clear_caches()


if os.environ.get("GHOSTNOISE_COMPILED_KERNELS", "0") == "1" and triton_installed():
    enable_compiled_kernels(True)
