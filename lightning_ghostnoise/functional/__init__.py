"""The reference math of ghost noise: pure torch, differentiable, no module state, no backend choice.

One function computes each quantity; :mod:`lightning_ghostnoise.backends` computes the same forward
with fewer passes (and a closed-form backward), and its tests check it against these functions.

- :mod:`~lightning_ghostnoise.functional.moments`: per-sample and batch moments.
- :mod:`~lightning_ghostnoise.functional.sampling`: ghost indices, the analytic law's variates, and
  the counter-based generator used under ``torch.compile``
  (:mod:`~lightning_ghostnoise.functional.counter_rng`).
- :mod:`~lightning_ghostnoise.functional.noise`: GNI's shift and scale, the one fold of the noise
  into an affine, GNI after LayerNorm/GroupNorm.
- :mod:`~lightning_ghostnoise.functional.affine`: the per-(sample, channel) affine every method ends with.
- :mod:`~lightning_ghostnoise.functional.batch_norm`: ghost batches and the BatchNorm family's coefficients.
- :mod:`~lightning_ghostnoise.functional.running_stats`: running statistics (full batch or ghost batches).

Example:
    >>> import torch
    >>> from lightning_ghostnoise import functional as GF
    >>> x = torch.randn(32, 8, 4, 4)
    >>> x_hat = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> g = torch.Generator().manual_seed(0)
    >>> idx = GF.ghost_indices(32, 16, generator=g)
    >>> shift, scale = GF.ghost_noise(*GF.per_sample_moments(x_hat), idx)
    >>> y = GF.apply_noise(x_hat, shift, scale, strength=1.0)
    >>> y.shape
    torch.Size([32, 8, 4, 4])
"""

from __future__ import annotations

from typing import Any

from lightning_ghostnoise.functional import counter_rng
from lightning_ghostnoise.functional.affine import (
    broadcast_channels,
    sample_affine,
    with_affine,
)
from lightning_ghostnoise.functional.batch_norm import (
    effective_statistics,
    ghost_averaging_matrix,
    ghost_groups,
    ghost_statistics_batch_norm,
    ghost_statistics_coefficients,
    gni_batch_norm,
    noise_coefficients,
)
from lightning_ghostnoise.functional.moments import batch_moments, per_sample_moments
from lightning_ghostnoise.functional.noise import (
    NOISE_EPS,
    GhostDraws,
    MomentFreeNoise,
    analytic_noise,
    analytic_noise_from_draws,
    apply_noise,
    ghost_noise,
    gni_normalized,
    noise_fold,
)
from lightning_ghostnoise.functional.running_stats import (
    RUNNING_STATS,
    ghost_running_targets,
    resolve_running_stats,
    update_ghost_running_stats,
    update_running_stats,
)
from lightning_ghostnoise.functional.sampling import analytic_draws, ghost_indices

__all__ = [
    "NOISE_EPS",
    "RUNNING_STATS",
    "GhostDraws",
    "MomentFreeNoise",
    "analytic_draws",
    "analytic_noise",
    "analytic_noise_from_draws",
    "apply_noise",
    "batch_moments",
    "broadcast_channels",
    "counter_rng",
    "effective_statistics",
    "ghost_averaging_matrix",
    "ghost_groups",
    "ghost_indices",
    "ghost_noise",
    "ghost_running_targets",
    "ghost_statistics_batch_norm",
    "ghost_statistics_coefficients",
    "gni_batch_norm",
    "gni_normalized",
    "noise_coefficients",
    "noise_fold",
    "per_sample_moments",
    "resolve_running_stats",
    "sample_affine",
    "update_ghost_running_stats",
    "update_running_stats",
    "with_affine",
]

# The fused entry points and native-norm wrappers lived here before they moved to
# lightning_ghostnoise.backends; these names keep `from lightning_ghostnoise.functional import ...`
# working. Resolved on first access, so that importing the reference math never imports a backend.
_MOVED_TO_BACKENDS = (
    "exclusive_batch_norm",
    "ghost_batch_norm",
    "ghost_noise_batch_norm",
    "moment_affine",
    "normalized_noise",
    "NativeNorm",
    "NativeLayerNorm",
    "NativeGroupNorm",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_BACKENDS:
        from lightning_ghostnoise import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
