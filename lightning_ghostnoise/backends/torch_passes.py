"""The fused autograd functions' full-size passes in PyTorch (CPU, and what ``torch.compile`` traces).

:class:`TorchPasses` has the same methods as the Triton backend's
:class:`~lightning_ghostnoise.backends.triton.kernels.TritonPasses`: per-sample moments, the affine
``x * A + D``, the backward's per-(sample, channel) sums and the input gradient
``grad_y * A + x * P + Q``. Which form of an op runs on CPU (and why): docs/performance.md.

Example:
    >>> import torch
    >>> mv = TORCH.moments(torch.randn(4, 3, 8), channel_dim=1)
    >>> mv.shape
    torch.Size([2, 4, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ghostnoise.functional._common import spatial_dims
from lightning_ghostnoise.functional.affine import (
    broadcast_channels,
    inner_broadcast,
    sample_affine,
)
from lightning_ghostnoise.functional.moments import per_sample_moments

__all__ = ["TORCH", "TorchPasses", "affine_input_grad", "passes_for", "sample_channel_sums"]


def fits(scratch: Tensor | None, like: Tensor) -> bool:
    """Whether ``scratch`` can take a result shaped like ``like`` (same shape and dtype)."""
    return scratch is not None and scratch.shape == like.shape and scratch.dtype == like.dtype


def affine_input_grad(
    grad_y: Tensor, x: Tensor, a: Tensor, p: Tensor, q: Tensor, channel_dim: int, out: Tensor | None = None
) -> Tensor:
    """``grad_y * a + x * p + q``: the input gradient of ``y = x * A + D`` when ``A`` and ``D`` depend on
    ``x`` through its moments. ``a`` is ``(B, C)``; ``p`` and ``q`` are ``(B, C)`` or per channel ``(C,)``.
    ``out``: a scratch tensor to write it into (used when it has ``x``'s shape and dtype, in eager mode)."""

    def expand(t: Tensor) -> Tensor:
        if t.dim() == 2:
            return broadcast_channels(t.to(x.dtype), x, channel_dim)
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return t.to(x.dtype).view(shape)

    if not fits(out, x) or torch.compiler.is_compiling():
        out = None  # a new tensor (dynamo breaks the graph at an `out=` tensor that is not contiguous)
    if inner_broadcast(x, channel_dim, grad_y):  # one broadcast operand per op (see there)
        return torch.mul(grad_y, expand(a), out=out).addcmul_(x, expand(p)).add_(expand(q))
    return torch.addcmul(expand(q), x, expand(p), out=out).addcmul_(grad_y, expand(a))


def sample_channel_sums(
    grad_y: Tensor, x: Tensor, channel_dim: int, dtype: torch.dtype, overwrite_x: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-(sample, channel) ``sum_s grad_y`` and ``sum_s grad_y * x`` over the spatial positions.

    The third result is the full-size product ``grad_y * x``, free to overwrite: the input gradient
    is written into it (``affine_input_grad(..., out=...)``), one full-size allocation fewer per
    backward (on CPU a fresh one costs page faults comparable to the arithmetic). ``None`` when
    there is no spatial dimension. ``overwrite_x``: the product is written over ``x`` (a temporary
    of the caller), one allocation fewer again.
    """
    dims = spatial_dims(x, channel_dim)
    if not dims:
        return grad_y.to(dtype), (grad_y * x).to(dtype), None
    batch = x.shape[0]
    product = torch.mul(grad_y, x, out=x) if overwrite_x and x.dtype == grad_y.dtype else grad_y * x
    return grad_y.sum(dims, dtype=dtype).reshape(batch, -1), product.sum(dims, dtype=dtype).reshape(batch, -1), product


def shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def refuse_double_backward() -> None:
    """Called in the fused backward: grad mode is on there only when a second derivative is requested."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "Double backward (create_graph=True, e.g. a gradient penalty) is not supported by the fused ghost "
            "noise path. Use plain autograd: layer.fused = False, apply_ghost_noise(..., fused=False) or "
            "GhostNoise(..., fused=False)."
        )


class TorchPasses:
    """The full-size passes in PyTorch; small results stacked in rows, as the Triton kernels keep them."""

    kernels = False

    def moments(self, x: Tensor, channel_dim: int) -> Tensor:
        """Per-sample mean and variance stacked ``(2, B, C)`` (float32; float64 for float64 inputs)."""
        return torch.stack(per_sample_moments(x, channel_dim))

    def affine(self, x: Tensor, ad: Tensor, channel_dim: int) -> Tensor:
        """``x * A + D`` with ``A``, ``D`` the first two rows of ``ad`` ``(k >= 2, B, C)``."""
        return sample_affine(x, ad[0], ad[1], channel_dim)

    def channel_sums(self, grad_y: Tensor, x: Tensor, channel_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``sum_s grad_y`` and ``sum_s grad_y * x`` stacked ``(2, B, C)`` in ``dtype``."""
        return torch.stack(sample_channel_sums(grad_y, x, channel_dim, dtype)[:2])

    def input_grad(self, grad_y: Tensor, x: Tensor, a_rows: Tensor, pq: Tensor, channel_dim: int) -> Tensor:
        """``grad_y * A + x * P + Q``: ``A`` the first row of ``a_rows``, ``P``, ``Q`` the rows of ``pq``."""
        return affine_input_grad(grad_y, x, a_rows[0], pq[0], pq[1], channel_dim)


#: the PyTorch passes (stateless)
TORCH = TorchPasses()


def passes_for(backend: str, x: Tensor) -> Any:
    """The full-size passes of a dispatch choice (:func:`lightning_ghostnoise.backends.dispatch.select`):
    the Triton kernels for ``"triton"`` (imported on first use), else :data:`TORCH`."""
    if backend == "triton":
        from lightning_ghostnoise.backends.triton.kernels import TritonPasses
        from lightning_ghostnoise.backends.triton.layout import strides

        lay = strides(x)
        assert lay is not None, "dispatch picks the Triton kernels only for dense inputs"
        return TritonPasses(lay)
    return TORCH
