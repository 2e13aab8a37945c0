"""The Triton coefficient kernels as PyTorch custom ops, for compiled graphs (opt-in, CUDA).

Under ``torch.compile`` the fused BatchNorm-family layers are traced as PyTorch formulas and inductor
generates their kernels. The full-size passes (moments, affine, the backward's sums and ``grad_x``)
fuse well; the small per-(sample, channel) math between them does not: on an H100 inductor made
about a dozen small kernels per layer of it (ResNet-18: 532 kernels per GNI step against 329 for
BatchNorm, 16-20 % more GPU time). With ``GHOSTNOISE_COMPILED_KERNELS=1`` in the environment that
small math is instead one launch of :mod:`lightning_ghostnoise.kernels`' coefficient kernel forward
and one backward, called from the graph as an opaque custom op (``torch.ops.ghostnoise.*``), while
inductor still generates (and fuses) the full-size passes and the running statistics' update (one
small kernel for both buffers: the ops mutate nothing, which keeps their dispatch cheap, see below).

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


# The kernels' own functions, registered as custom ops (the schema comes from the annotations); the
# fake implementations give the outputs' shapes for tracing. The forward ops leave the running
# statistics to the caller (``functional`` updates them in the graph from the ops' batch statistics):
# a custom op that mutates an argument costs about 80 us of host time per call in torch 2.13 (its
# ADInplaceOrView step rebuilds the schema's argument list once per argument), a pure one 11-18 us
# (CPU, launches stubbed: benchmarks/custom_op_overhead.py). Their signatures repeat the kernels' minus
# the running statistics: a custom op needs its own annotated signature for its schema.
@torch.library.custom_op("ghostnoise::gni_coefficients", mutates_args=())
def gni_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    strength: Tensor,
    eps: float,
    shift_noise: bool,
    scale_noise: bool,
    indices: Optional[Tensor] = None,
    noise_eps: float = 1e-3,
    normal: Optional[Tensor] = None,
    gamma: Optional[Tensor] = None,
    ghost_batch_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`kernels.gni_coefficients` without the running statistics: ``(coef, stats)``."""
    return kernels.gni_coefficients(
        mv, weight, bias, None, None, strength, 2, 0.0, eps, shift_noise, scale_noise,
        indices=indices, noise_eps=noise_eps, normal=normal, gamma=gamma, ghost_batch_size=ghost_batch_size,
    )  # fmt: skip


gni_input_coefficients = torch.library.custom_op("ghostnoise::gni_input_coefficients", mutates_args=())(
    kernels.gni_input_coefficients
)


@torch.library.custom_op("ghostnoise::ghost_statistics_coefficients", mutates_args=())
def ghost_statistics_coefficients(
    mv: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    strength: Tensor,
    eps: float,
    ghost_batch_size: int,
    exclusive: bool,
    shift_noise: bool,
    scale_noise: bool,
) -> Tuple[Tensor, Tensor]:
    """:func:`kernels.ghost_statistics_coefficients` without the running statistics: ``(per_sample,
    per_channel)``; the batch mean is ``per_channel[0] + per_channel[1]``, its variance ``per_channel[2]``."""
    return kernels.ghost_statistics_coefficients(
        mv, weight, bias, None, None, strength, 2, 0.0, eps, ghost_batch_size, exclusive, shift_noise, scale_noise
    )


ghost_statistics_input_coefficients = torch.library.custom_op(
    "ghostnoise::ghost_statistics_input_coefficients", mutates_args=()
)(kernels.ghost_statistics_input_coefficients)


@gni_coefficients.register_fake
def _gni_coefficients_fake(mv: Tensor, *args: object, **kwargs: object) -> Tuple[Tensor, Tensor]:
    _, batch, channels = mv.shape
    return mv.new_empty(4, batch, channels), mv.new_empty(2, channels)


@gni_input_coefficients.register_fake
def _gni_input_coefficients_fake(r: Tensor, *args: object) -> Tensor:
    return r.new_empty(4, r.shape[2])


@ghost_statistics_coefficients.register_fake
def _ghost_statistics_coefficients_fake(mv: Tensor, *args: object) -> Tuple[Tensor, Tensor]:
    _, batch, channels = mv.shape
    return mv.new_empty(4, batch, channels), mv.new_empty(4, channels)


@ghost_statistics_input_coefficients.register_fake
def _ghost_statistics_input_coefficients_fake(r: Tensor, *args: object) -> Tuple[Tensor, Tensor]:
    _, batch, channels = r.shape
    return r.new_empty(2, batch, channels), r.new_empty(2, channels)
