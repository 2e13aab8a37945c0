"""The settings of a ghost-noise layer, each checked by one function with a message that says how to fix it.

Every entry point (the layers, :func:`~lightning_ghostnoise.layers.convert.apply_ghost_noise`, the
:class:`~lightning_ghostnoise.callbacks.GhostNoise` callback) checks its arguments with these functions, so
a rule and its message live in one place.

Example:
    >>> from lightning_ghostnoise.layers.validation import validate_ghost_batch_size, validate_method
    >>> validate_method("GNI")
    'gni'
    >>> validate_ghost_batch_size(16.0, "xbn")
    16
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Tuple, cast

from torch import Tensor

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.distributed import rank_zero_warn

__all__ = [
    "MAX_STRENGTH",
    "METHODS",
    "Method",
    "RunningStats",
    "check_batched_input",
    "check_floating",
    "check_method_applies",
    "default_running_stats",
    "min_ghost_batch_size",
    "validate_ghost_batch_size",
    "validate_method",
    "validate_noise_eps",
    "validate_running_stats",
    "validate_strength",
]

#: The methods: Ghost Noise Injection (default), Ghost Batch Norm, Exclusive Batch Norm, analytic GNI.
METHODS: Tuple[str, ...] = ("gni", "gbn", "xbn", "analytic")
#: The type of a ``method`` argument (a ``Literal`` that LightningCLI validates).
Method = Literal["gni", "gbn", "xbn", "analytic"]
#: The type of a ``running_stats`` argument: GBN's running statistics from the ghost batches or the full batch.
RunningStats = Literal["ghost", "batch"]


def validate_method(method: Any) -> Method:
    """``method`` in lower case if it is one of :data:`METHODS`, else a ``ValueError``.

    Example:
        >>> validate_method("XBN")
        'xbn'
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"Unknown ghost noise method {method!r}: choose one of {', '.join(METHODS)}.")
    return cast(Method, method.lower())  # one of METHODS, checked above


def check_method_applies(method: Any, allowed: Tuple[str, ...], layer: str) -> Method:
    """``method`` (validated, lower case) if the layer family ``layer`` supports it, else a ``ValueError``.

    LayerNorm and GroupNorm normalize each sample on its own: they take ``"gni"`` and ``"analytic"`` only.

    Example:
        >>> check_method_applies("gni", ("gni", "analytic"), "LayerNorm")
        'gni'
    """
    method = validate_method(method)
    if method not in allowed:
        raise ValueError(
            f"Method {method!r} does not apply to {layer}: it normalizes each sample on its own, so there are "
            f"no batch statistics to split into ghost batches. Use one of {', '.join(allowed)} for {layer}, "
            "or exclude these layers."
        )
    return method


def min_ghost_batch_size(method: str, scale_noise: bool = True) -> int:
    """The smallest ghost batch size a method can use: 2 for XBN and analytic scale noise, else 1.

    Example:
        >>> min_ghost_batch_size("xbn"), min_ghost_batch_size("analytic", scale_noise=False)
        (2, 1)
    """
    if method == "xbn" or (method == "analytic" and scale_noise):
        return 2
    return 1


#: Per method: why it needs ``min_ghost_batch_size`` samples, and what to do instead.
_MIN_SIZE_REASONS: Dict[str, Tuple[str, str]] = {
    "xbn": (
        "XBN normalizes each sample by the other N - 1 samples of its ghost batch",
        "or method 'gbn' or 'gni', which work with ghost batches of 1 sample",
    ),
    "analytic": (
        "its scale noise is chi2 with N - 1 degrees of freedom",
        "or scale_noise=False (shift-only noise works with N = 1), or method 'gni'",
    ),
}


def validate_ghost_batch_size(value: Any, method: str, scale_noise: bool = True, source: str = "") -> int:
    """``value`` as a valid ghost batch size for ``method``, or a ``ValueError`` that says how to fix it.

    Args:
        value: the ghost batch size ``N``, a whole number.
        method: one of :data:`METHODS`.
        scale_noise: whether the scale part of the noise is on (analytic GNI needs ``N >= 2`` for it).
        source: where the value comes from, added to the message (e.g. which schedule produces it).

    Example:
        >>> validate_ghost_batch_size(16.0, "xbn")
        16
        >>> validate_ghost_batch_size(1, "analytic", scale_noise=False)
        1
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"ghost_batch_size must be a whole number, got {value!r}.")
    value = int(value)
    low = min_ghost_batch_size(method, scale_noise)
    if value < low:
        why, instead = _MIN_SIZE_REASONS.get(method, ("a ghost batch needs at least one sample", ""))
        raise ValueError(
            f"ghost_batch_size must be >= {low} for method {method!r} ({why}), got {value}{source}. "
            f"Use a ghost batch size >= {low}{(', ' + instead) if instead else ''}."
        )
    return value


#: The largest ``strength`` a ghost layer accepts. Above 1 the noise is extrapolated beyond the method:
#: the scale part enters as ``scale**-s``, whose rare small scales grow much faster than at ``s = 1``.
MAX_STRENGTH = 2.0
_warned_strength_above_one = False


def validate_strength(value: Any, method: str) -> float:
    """``value`` as a valid noise strength ``0 <= s <= MAX_STRENGTH`` for ``method``.

    ``s > 1`` is allowed up to :data:`MAX_STRENGTH` with a warning (once per process): the scale
    noise is raised to the power ``s``, so its heavy tail at small ghost batch sizes is amplified.

    Example:
        >>> validate_strength(0.5, "gni")
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {value!r}.")
    value = float(value)
    if value > MAX_STRENGTH:
        raise ValueError(
            f"strength must be <= {MAX_STRENGTH:g} (MAX_STRENGTH), got {value:g} for method {method!r}. Above 1 the "
            "scale noise is raised to the power s, so its rare small scales explode (analytic GNI with N = 2 at "
            "s = 5 gave outputs above 1e15). For more noise, use a smaller ghost_batch_size at strength <= 1."
        )
    global _warned_strength_above_one
    if value > 1.0 and not _warned_strength_above_one:
        _warned_strength_above_one = True
        rank_zero_warn(
            f"Ghost noise strength {value:g} > 1 extrapolates beyond method {method!r} (s = 1 is the method): the "
            "scale noise enters as scale**-s, so its rare small scales are amplified far more than at s = 1, the "
            "more so the smaller the ghost batch size (with N <= 4 the largest outputs reach 1e2-1e5 at s = 2, far "
            "more for analytic GNI at N = 2). For more "
            "noise prefer a smaller ghost_batch_size at strength <= 1; with strength > 1 keep N >= 16."
        )
    return value


def default_running_stats(method: str) -> str:
    """The convention a method's running statistics follow by default: ``"ghost"`` for GBN, else ``"batch"``.

    Example:
        >>> default_running_stats("gbn"), default_running_stats("gni")
        ('ghost', 'batch')
    """
    return "ghost" if method == "gbn" else "batch"


#: Per method: why its running statistics come from the full batch (``running_stats="ghost"`` is refused).
_FULL_BATCH_REASONS: Dict[str, str] = {
    "xbn": "XBN normalizes each sample by the leave-one-out statistics of the others in its ghost batch, which "
    "are no batch's own statistics, so its running statistics come from the full batch",
    "gni": "GNI normalizes with the full batch's statistics before it adds its noise, so the full batch is what "
    "training normalized with",
    "analytic": "analytic GNI normalizes with the full batch's statistics before it adds its noise, so the full "
    "batch is what training normalized with",
}


def validate_running_stats(value: Optional[Any], method: str) -> str:
    """``value`` as a valid ``running_stats`` for ``method``, ``None`` resolved to the method's default.

    ``"ghost"`` (GBN's default): the running statistics follow the ghost batches' mean moments, as
    published (:func:`~lightning_ghostnoise.functional.ghost_running_targets`). ``"batch"``: the full
    batch's, as plain BatchNorm (the only choice for XBN, GNI and analytic GNI).

    Example:
        >>> validate_running_stats(None, "gbn"), validate_running_stats(None, "xbn")
        ('ghost', 'batch')
        >>> validate_running_stats("batch", "gbn")
        'batch'
    """
    if value is None:
        return default_running_stats(method)
    resolved = GF.resolve_running_stats(value, ghost=method == "gbn")
    if resolved == "ghost" and method != "gbn":
        why = _FULL_BATCH_REASONS.get(method, "it has no ghost batches of its own")
        raise ValueError(
            f"running_stats='ghost' applies to method 'gbn' only, got method {method!r}: {why}. Use "
            "running_stats='batch' or None (the method's default)."
        )
    return resolved


def validate_noise_eps(eps: Any) -> float:
    """``eps`` as a valid GNI noise epsilon (finite, ``> 0``), else a ``ValueError``.

    Example:
        >>> validate_noise_eps(1e-3)
        0.001
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(
            f"noise_eps must be a positive finite number, got {eps!r}; the paper's value is {GF.NOISE_EPS:g}."
        )
    return float(eps)


def check_floating(x: Tensor) -> None:
    """Refuse a non-floating-point input of a ghost layer in training (``TypeError``).

    Example:
        >>> import torch
        >>> check_floating(torch.zeros(2, 3))
    """
    if not x.is_floating_point():
        raise TypeError(f"ghost noise layers need a floating point input, got dtype {x.dtype}.")


def check_batched_input(x: Tensor, layer: str, expected: str) -> None:
    """Refuse an input of a per-sample norm layer in training that is not floating point (``TypeError``)
    or has no batch dimension (``ValueError``: the noise mixes samples across the batch).

    Example:
        >>> import torch
        >>> check_batched_input(torch.zeros(2, 3), "GhostLayerNorm", "(B, *, D)")
    """
    check_floating(x)
    if x.dim() < 2:
        raise ValueError(
            f"{layer} needs a batch dimension: got an input of shape {tuple(x.shape)}, expected {expected}."
        )
