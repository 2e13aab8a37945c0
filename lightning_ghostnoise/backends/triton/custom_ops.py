"""The Triton coefficient kernels as PyTorch custom ops, for compiled graphs (opt-in).

Under ``torch.compile`` the fused BatchNorm-family layers are traced as PyTorch formulas and inductor
generates their kernels. The full-size passes fuse well; the small per-(sample, channel) math between
them does not (about a dozen small kernels per layer). With
:func:`lightning_ghostnoise.config.enable_compiled_kernels` that small math is instead one launch of
the coefficient kernel forward and one backward, called from the graph as opaque custom ops
(``torch.ops.ghostnoise.*``), while inductor still generates the full-size passes and the running
statistics' update. Importing this module registers the ops; ``enable_compiled_kernels(True)`` does.
"""

# No `from __future__ import annotations`: torch's custom_op before 2.5 reads each op's schema from
# annotation objects, not strings.

from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_ghostnoise.backends.triton import ghost_statistics as _ghost_statistics
from lightning_ghostnoise.backends.triton import gni as _gni

__all__ = [
    "ghost_statistics_coefficients",
    "ghost_statistics_input_coefficients",
    "gni_coefficients",
    "gni_input_coefficients",
]


# The kernels' own functions, registered as custom ops (the schema comes from the annotations); the
# fake implementations give the outputs' shapes for tracing. The forward ops leave the running
# statistics to the caller (the fused layers update them in the graph from the ops' batch statistics):
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
    """:func:`~lightning_ghostnoise.backends.triton.gni.gni_coefficients` without the running statistics: ``(coef, stats)``."""
    return _gni.gni_coefficients(
        mv, weight, bias, None, None, strength, 2, 0.0, eps, shift_noise, scale_noise,
        indices=indices, noise_eps=noise_eps, normal=normal, gamma=gamma, ghost_batch_size=ghost_batch_size,
    )  # fmt: skip


gni_input_coefficients = torch.library.custom_op("ghostnoise::gni_input_coefficients", mutates_args=())(
    _gni.gni_input_coefficients
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
    """:func:`~lightning_ghostnoise.backends.triton.ghost_statistics.ghost_statistics_coefficients` without the running statistics: ``(per_sample,
    per_channel)``; the batch mean is ``per_channel[0] + per_channel[1]``, its variance ``per_channel[2]``."""
    return _ghost_statistics.ghost_statistics_coefficients(
        mv, weight, bias, None, None, strength, 2, 0.0, eps, ghost_batch_size, exclusive, shift_noise, scale_noise
    )


ghost_statistics_input_coefficients = torch.library.custom_op(
    "ghostnoise::ghost_statistics_input_coefficients", mutates_args=()
)(_ghost_statistics.ghost_statistics_input_coefficients)


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
