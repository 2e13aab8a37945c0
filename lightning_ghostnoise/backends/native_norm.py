"""PyTorch's native LayerNorm and GroupNorm kernels, exposed with their statistics for the fused GNI path.

Example:
    >>> import torch
    >>> x = torch.randn(4, 3, 5)
    >>> ln = NativeLayerNorm((5,))
    >>> bool(torch.equal(ln(x), ln.forward(x)[0]))
    True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_ghostnoise.functional._common import autocast_state

__all__ = ["NativeGroupNorm", "NativeLayerNorm", "NativeNorm", "clear_caches"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@functools.lru_cache(maxsize=32)
def _unit_affine(size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cached ones and zeros of ``size``: an identity affine (see :class:`NativeLayerNorm`)."""
    return torch.ones(size, device=device, dtype=dtype), torch.zeros(size, device=device, dtype=dtype)


class NativeNorm:
    """A per-sample normalization without affine (``x -> x_hat``) that also exposes PyTorch's native
    kernels: the forward returns the statistics ``(mean, rstd)`` and the backward takes them.

    Called, it is a plain ``normalize`` for :func:`normalized_noise`. Its fused path uses the rest:
    it keeps ``(x, mean, rstd)``, exactly what the plain layer keeps, and in the backward calls the
    native backward once, with no recomputation of ``x_hat``. The noise's scale ``inv`` goes into
    the native kernel's output gradient (``grad_y * inv``) and the layer's weight into its weight
    argument, so its weight gradient ``sum grad_y * inv * x_hat`` is the scale part of the layer's.
    """

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_hat, mean, rstd)``: the same bits as ``self(x)``."""
        raise NotImplementedError

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_x: bool, need_w: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(grad_x, grad_w)`` of ``normalize(x) * weight`` for the output gradient ``grad``."""
        raise NotImplementedError

    def memory_format(self, x: Tensor) -> torch.memory_format:
        """The layout the native kernels work in for ``x`` (others are copied to it first)."""
        return torch.contiguous_format

    def input_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the normalization computes ``x`` in under the current autocast state.

        Autocast may cast a norm's input (CUDA runs ``layer_norm`` in float32); its policy is read
        off once per (norm type, device, input dtype, autocast dtype) by normalizing one sample.
        """
        device = x.device.type
        state = autocast_state(device)
        if state is None:
            return x.dtype
        key = (type(self), device, x.dtype, state)
        dtype = _AUTOCAST_PROBES.get(key)
        if dtype is None:
            with torch.no_grad():
                dtype = _AUTOCAST_PROBES[key] = self(x[:1]).dtype
        return dtype


#: :meth:`NativeNorm.input_dtype`'s readings of the autocast policy.
_AUTOCAST_PROBES: dict[tuple[type, str, torch.dtype, torch.dtype], torch.dtype] = {}


class NativeLayerNorm(NativeNorm):
    """``F.layer_norm(x, normalized_shape, eps=eps)`` without affine, as a :class:`NativeNorm`.

    Float32 CPU inputs get a cached identity affine: PyTorch's float32 CPU kernel is 2.3-3.4x slower
    without an affine than with one (0.88-1.55 ms against 0.38-0.46 ms on ``(64, 128, 256)``), and
    the bits are the same.

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> ln = NativeLayerNorm((5,))
        >>> bool(torch.equal(ln(x), ln.forward(x)[0]))
        True
    """

    def __init__(self, normalized_shape: Sequence[int], eps: float = 1e-5) -> None:
        self.normalized_shape, self.eps = tuple(normalized_shape), eps

    def _unit(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        cpu_float = x.device.type == "cpu" and x.dtype == torch.float32 and len(self.normalized_shape) == 1
        if cpu_float and not torch.compiler.is_compiling():
            return _unit_affine(self.normalized_shape[0], x.device, x.dtype)
        return None, None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, *self._unit(x), self.eps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_layer_norm(x, self.normalized_shape, *self._unit(x), self.eps)

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_x: bool, need_w: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        if weight is None:  # (the identity weight: the faster CPU kernel, as in the forward)
            weight = self._unit(x)[0]
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, self.normalized_shape, mean, rstd, weight, None, [need_x, need_w, False]
        )
        return grad_x, grad_w


class NativeGroupNorm(NativeNorm):
    """``F.group_norm(x, num_groups, eps=eps)`` without affine, as a :class:`NativeNorm`.

    Example:
        >>> x = torch.randn(4, 6, 3, 3)
        >>> gn = NativeGroupNorm(2)
        >>> bool(torch.equal(gn(x), gn.forward(x)[0]))
        True
    """

    def __init__(self, num_groups: int, eps: float = 1e-5) -> None:
        self.num_groups, self.eps = num_groups, eps

    def _sizes(self, x: Tensor) -> tuple[int, int, int]:
        return x.shape[0], x.shape[1], x.numel() // max(x.shape[0] * x.shape[1], 1)

    def memory_format(self, x: Tensor) -> torch.memory_format:
        fmt = _CHANNELS_LAST.get(x.dim())
        if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
            return torch.contiguous_format
        return fmt

    def _dense(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Dense in ``like``'s memory format, as the native kernels want (``F.group_norm`` does the same)."""
        return t.contiguous(memory_format=self.memory_format(t if like is None else like))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.group_norm(x, self.num_groups, None, None, self.eps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.native_group_norm(self._dense(x), None, None, *self._sizes(x), self.num_groups, self.eps)

    def backward(
        self, grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_x: bool, need_w: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        x = self._dense(x)
        # torch 2.13's CPU kernel crashes on a channels-last input when grad_x is not asked for: ask
        want_x = need_x or not x.is_contiguous()
        grad_x, grad_w, _ = torch.ops.aten.native_group_norm_backward(
            self._dense(grad, x), x, mean, rstd, weight, *self._sizes(x), self.num_groups, [want_x, need_w, False]
        )
        return grad_x if need_x else None, grad_w


def clear_caches() -> None:
    """Forget the cached identity affines and autocast readings."""
    _unit_affine.cache_clear()
    _AUTOCAST_PROBES.clear()
