"""The Triton coefficient kernels as PyTorch custom ops, for compiled graphs (opt-in, CUDA).

Under ``torch.compile`` the fused BatchNorm-family layers are traced as PyTorch formulas and inductor
generates their kernels. The full-size passes (moments, affine, the backward's sums and ``grad_x``)
fuse well; the small per-(sample, channel) math between them does not: on an H100 inductor made
about a dozen small kernels per layer of it (ResNet-18: 532 kernels per GNI step against 329 for
BatchNorm, 16-20 % more GPU time). With ``GHOSTNOISE_COMPILED_KERNELS=1`` in the environment that
small math is instead one launch of :mod:`lightning_ghostnoise.kernels`' coefficient kernel forward
and one backward, called from the graph as an opaque custom op (``torch.ops.ghostnoise.*``), while
inductor still generates (and fuses) the full-size passes.

Off by default: the path is tested on CPU (Triton's interpreter, inductor included) but not yet
measured on a GPU. The variable is read while a graph is traced: set it before the first compiled
call.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import ops
    >>> ops.in_graph(torch.randn(4, 3, 8, 8))  # outside torch.compile: never
    False
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_ghostnoise import kernels

__all__ = ["enabled", "in_graph"]


def enabled() -> bool:
    """Whether ``GHOSTNOISE_COMPILED_KERNELS=1`` asks for the kernels in compiled graphs (and Triton is there)."""
    return os.environ.get("GHOSTNOISE_COMPILED_KERNELS", "0") == "1" and kernels.available()


def in_graph(x: Tensor, channel_dim: int = 1) -> bool:
    """Whether the layer being traced for ``x`` calls the coefficient kernels as custom ops.

    That is: inside ``torch.compile``, :func:`enabled`, channels at dim 1, and a CUDA tensor (CPU
    too where :data:`kernels.ALLOW_CPU` is set, for tests) of a dtype the kernels take.
    """
    return (
        torch.compiler.is_compiling()
        and channel_dim == 1
        and enabled()
        and (x.is_cuda or kernels.ALLOW_CPU)
        and x.dtype in kernels._DTYPES
        and 2 <= x.dim() <= 5
    )


@torch.library.custom_op("ghostnoise::gni_coefficients", mutates_args=("running_mean", "running_var"))
def gni_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    strength: Tensor,
    count: int,
    momentum: float,
    eps: float,
    shift_noise: bool,
    scale_noise: bool,
    indices: Optional[Tensor] = None,
    noise_eps: float = 1e-3,
    normal: Optional[Tensor] = None,
    gamma: Optional[Tensor] = None,
    ghost_batch_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`lightning_ghostnoise.kernels.gni_coefficients` as ``torch.ops.ghostnoise.gni_coefficients``."""
    return kernels.gni_coefficients(
        mv, weight, bias, running_mean, running_var, strength, count, momentum, eps, shift_noise, scale_noise,
        indices=indices, noise_eps=noise_eps, normal=normal, gamma=gamma, ghost_batch_size=ghost_batch_size,
    )  # fmt: skip


@gni_coefficients.register_fake
def _(mv, weight, bias, running_mean, running_var, strength, count, momentum, eps, shift_noise, scale_noise,
      indices=None, noise_eps=1e-3, normal=None, gamma=None, ghost_batch_size=None):  # fmt: skip
    _, batch, channels = mv.shape
    return mv.new_empty(4, batch, channels), mv.new_empty(2, channels)


@torch.library.custom_op("ghostnoise::gni_input_coefficients", mutates_args=())
def gni_input_coefficients(r: Tensor, coef: Tensor, stats: Tensor, weight: Optional[Tensor], count: int) -> Tensor:
    """:func:`lightning_ghostnoise.kernels.gni_input_coefficients` as a custom op."""
    return kernels.gni_input_coefficients(r, coef, stats, weight, count)


@gni_input_coefficients.register_fake
def _(r, coef, stats, weight, count):
    return r.new_empty(4, r.shape[2])


@torch.library.custom_op("ghostnoise::ghost_statistics_coefficients", mutates_args=("running_mean", "running_var"))
def ghost_statistics_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    strength: Tensor,
    count: int,
    momentum: float,
    eps: float,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`lightning_ghostnoise.kernels.ghost_statistics_coefficients` as a custom op."""
    return kernels.ghost_statistics_coefficients(
        mv, weight, bias, running_mean, running_var, strength, count, momentum, eps, ghost_batch_size, exclusive,
        shift_noise, scale_noise,
    )  # fmt: skip


@ghost_statistics_coefficients.register_fake
def _(mv, weight, bias, running_mean, running_var, strength, count, momentum, eps, ghost_batch_size, exclusive,
      shift_noise, scale_noise):  # fmt: skip
    _, batch, channels = mv.shape
    return mv.new_empty(7, batch, channels), mv.new_empty(4, channels)


@torch.library.custom_op("ghostnoise::ghost_statistics_input_coefficients", mutates_args=())
def ghost_statistics_input_coefficients(
    r: Tensor,
    mv: Tensor,
    per_sample: Tensor,
    per_channel: Tensor,
    strength: Tensor,
    count: int,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`lightning_ghostnoise.kernels.ghost_statistics_input_coefficients` as a custom op."""
    pq, grads = kernels.ghost_statistics_input_coefficients(
        r, mv, per_sample, per_channel, strength, count, ghost_batch_size, exclusive, shift_noise, scale_noise
    )
    return pq, grads.clone()  # a fresh tensor, not a view into the kernel's scratch buffer


@ghost_statistics_input_coefficients.register_fake
def _(r, mv, per_sample, per_channel, strength, count, ghost_batch_size, exclusive, shift_noise, scale_noise):
    _, batch, channels = r.shape
    return r.new_empty(2, batch, channels), r.new_empty(2, channels)
