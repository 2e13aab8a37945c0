"""The one place a layer call picks its path, and says why.

Paths, for one call of a BatchNorm-family entry point:

- ``"autograd"``: the reference formulas of :mod:`lightning_ghostnoise.functional` in plain autograd
  (``fused=False``, no gradient recorded, or a generic path under ``torch.compile``).
- ``"torch"``: the fused autograd function on the PyTorch passes (CPU, and what ``torch.compile``
  traces).
- ``"triton"``: the fused autograd function on the Triton kernels (CUDA, eager).
- ``"triton-ops"``: under ``torch.compile`` with :func:`lightning_ghostnoise.config.enable_compiled_kernels`,
  the PyTorch full-size passes with the Triton coefficient kernels as custom ops.

Example:
    >>> import torch
    >>> with torch.no_grad():
    ...     select(torch.randn(4, 3, 8, 8)).backend
    'autograd'
    >>> with torch.enable_grad():
    ...     select(torch.randn(4, 3, 8, 8, requires_grad=True)).reason
    'CPU tensor (the Triton kernels run on CUDA)'
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_ghostnoise import config

__all__ = ["Choice", "decide", "select"]

#: dtypes the Triton kernels take
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Choice(NamedTuple):
    """A path (``"autograd"``, ``"torch"``, ``"triton"`` or ``"triton-ops"``) and why it was picked."""

    backend: str
    reason: str


def decide(
    *,
    fused: bool | None,
    grad_enabled: bool,
    compiling: bool,
    closed_form: bool,
    kernels_apply: bool,
    backend: str,
    compiled_kernels: bool,
    triton_installed: bool,
    device: str,
    interpreter: bool,
    dtype: torch.dtype,
    dim: int,
    empty: bool,
    channel_dim: int,
    dense: bool,
) -> Choice:
    """The decision of :func:`select` from its inputs (a pure function: the tests call it directly)."""
    if fused is False:
        return Choice("autograd", "fused=False")
    if fused is None and not grad_enabled:
        return Choice("autograd", "no gradient recorded")
    if fused is None and compiling and not closed_form:
        return Choice("autograd", "torch.compile differentiates the generic path itself")
    if not kernels_apply:
        return Choice("torch", "no Triton kernel for this method or noise")
    if backend == "torch":
        return Choice("torch", "backend 'torch' (lightning_ghostnoise.config)")
    if channel_dim % max(dim, 1) != 1 or not 2 <= dim <= 5 or empty:
        return Choice("torch", "the Triton kernels take non-empty (B, C, *spatial) inputs, 2 to 5 dims")
    if dtype not in KERNEL_DTYPES:
        return Choice("torch", f"the Triton kernels take float32, float16 and bfloat16, not {dtype}")
    if device != "cuda" and not (backend == "triton" and interpreter):
        return Choice("torch", "CPU tensor (the Triton kernels run on CUDA)")
    if not triton_installed:
        return Choice("torch", "Triton is not installed")
    if compiling:
        if compiled_kernels:
            return Choice("triton-ops", "torch.compile with compiled kernels enabled")
        return Choice("torch", "torch.compile traces the PyTorch passes (enable_compiled_kernels for the Triton ops)")
    if not dense:
        return Choice("torch", "neither contiguous nor channels-last: the Triton kernels need one of these layouts")
    return Choice("triton", f"{device} tensor, backend {backend!r}")


def _dense(x: Tensor) -> bool:
    if x.dim() == 2 or x.is_contiguous():
        return x.is_contiguous()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def select(
    x: Tensor, channel_dim: int = 1, *, fused: bool | None = None, closed_form: bool = True, kernels: bool = True
) -> Choice:
    """The path of one call for input ``x`` (see the module docstring).

    Args:
        x: the layer's input.
        channel_dim: its channel dimension (the Triton kernels take 1).
        fused: the layer's ``fused`` setting: ``None`` (default) fused while gradients are recorded,
            ``False`` plain autograd, ``True`` always fused.
        closed_form: whether the fused function has a closed-form backward (traced by
            ``torch.compile``); the generic one (``sync=True``) uses plain autograd under compile.
        kernels: whether a Triton kernel exists for this call (e.g. GNI needs drawn ghost indices).
    """
    s = config.settings()
    compiling = torch.compiler.is_compiling()
    return decide(
        fused=fused,
        grad_enabled=torch.is_grad_enabled(),
        compiling=compiling,
        closed_form=closed_form,
        kernels_apply=kernels,
        backend=s.backend,
        compiled_kernels=s.compiled_kernels,
        triton_installed=_TRITON_INSTALLED,
        device=x.device.type,
        interpreter=_INTERPRETER,
        dtype=x.dtype,
        dim=x.dim(),
        empty=x.numel() == 0,
        channel_dim=channel_dim,
        dense=compiling or _dense(x),
    )


#: read once: whether Triton is importable, and whether it runs kernels in its interpreter (on CPU)
_TRITON_INSTALLED = config.triton_installed()
_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
