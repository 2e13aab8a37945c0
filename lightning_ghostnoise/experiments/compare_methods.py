"""The columns of ``ghostnoise compare``: which methods, variants and ghost batch sizes run on a model.

For a BatchNorm model the methods are ``plain`` (BN), ``gbn``, ``xbn``, ``gni`` and ``analytic``; for a
layer-normalized model ``plain`` (LN), ``gni`` and ``analytic``. Variants are written
``method:variant`` (``gni:shift``, ``analytic:scale``, ``gbn:batch``, ...) and ``method@N`` runs that
method at one ``N`` only.

Example:
    >>> [s.label for s in method_specs("resnet8", ["plain", "gni"], [8, 32])]
    ['BN', 'GNI(8)', 'GNI(32)']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["COMPARE_METHODS", "VARIANTS", "MethodSpec", "method_specs", "width_kwargs"]

#: Methods ``--methods`` accepts; ``plain`` is the model's own normalization, without ghost noise.
COMPARE_METHODS = ("plain", "gbn", "xbn", "gni", "analytic")
#: Variants, written ``method:variant``.
VARIANTS = {"gni": ("shift", "scale"), "analytic": ("shift", "scale"), "gbn": ("batch",)}
_BN_ONLY = ("gbn", "xbn")
_NEEDS_TWO = ("xbn", "analytic")
_NAMES = {"gbn": "GBN", "xbn": "XBN", "gni": "GNI", "analytic": "analytic GNI"}
_VARIANT_NAMES = {"shift": "shift-only", "scale": "scale-only", "batch": "batch running stats"}


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a method, its variant and its ghost batch size (``None`` for ``plain``)."""

    method: str
    ghost_batch_size: Optional[int]
    label: str
    variant: Optional[str] = None

    @property
    def key(self) -> str:
        """A file-name-safe key, e.g. ``gni16``, ``gni-shift16`` or ``plain``."""
        name = self.method if self.variant is None else f"{self.method}-{self.variant}"
        return name if self.ghost_batch_size is None else f"{name}{self.ghost_batch_size}"


def _norm_family(model_name: str, width: Optional[int]) -> str:
    """``"bn"`` when the bundled model normalizes with BatchNorm, ``"ln"`` for LayerNorm/GroupNorm."""
    from torch import nn

    from lightning_ghostnoise.experiments.models import build_model

    model = build_model(model_name, **({} if width is None else width_kwargs(model_name, width)))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return "bn" if has_bn else "ln"


def width_kwargs(model_name: str, width: int) -> Dict[str, int]:
    """The constructor argument that sets a bundled model's width (``dim`` for the transformers).

    Example:
        >>> width_kwargs("vit", 64)
        {'dim': 64}
    """
    return {"dim": width} if model_name in ("vit", "tiny_transformer") else {"width": width}


def _parse_method(text: str, family: str, model: str) -> Tuple[str, Optional[str], Optional[int]]:
    spelled, at, fixed = text.lower().partition("@")
    n: Optional[int] = None
    if at:
        try:
            n = int(fixed)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{text!r} in --methods: the ghost batch size after @ must be an integer >= 1.")
    method, _, variant = spelled.partition(":")
    if method == "plain" and at:
        raise ValueError(f"{text!r} in --methods: plain has no ghost batch size.")
    if method not in COMPARE_METHODS:
        raise ValueError(f"unknown method {method!r} in --methods: choose from {', '.join(COMPARE_METHODS)}.")
    if variant and variant not in VARIANTS.get(method, ()):
        known = ", ".join(f"{m}:{v}" for m, vs in VARIANTS.items() for v in vs)
        raise ValueError(f"unknown variant {text!r} in --methods: the variants are {known}.")
    if method in _BN_ONLY and family != "bn":
        raise ValueError(
            f"method {method!r} needs BatchNorm layers, and model {model!r} is layer-normalized: use gni or analytic "
            "(they work on LayerNorm/GroupNorm), or a BatchNorm model such as resnet8."
        )
    return method, variant or None, n


def method_specs(
    model: str, methods: Optional[Sequence[str]], ghost_batch_sizes: Sequence[int], width: Optional[int] = None
) -> List[MethodSpec]:
    """The comparison's columns, validated against the model's normalization.

    Args:
        model: a bundled model name.
        methods: from :data:`COMPARE_METHODS`, optionally ``method:variant`` (:data:`VARIANTS`) and
            ``method@N`` (this method at this ``N`` only, e.g. the ``N`` a sweep selected);
            ``None`` for the default of the model's family.
        ghost_batch_sizes: every ghost method without ``@N`` runs with each of these ``N``.
        width: the model width (only used to build the model and look at its layers).

    Raises:
        ValueError: an unknown method or variant, GBN/XBN on a model without BatchNorm, or an ``N`` a
            method cannot use.

    Example:
        >>> [s.label for s in method_specs("resnet8_ln", None, [16])]
        ['LN', 'LN+GNI(16)']
        >>> [s.label for s in method_specs("resnet8", ["gni:shift"], [8])]
        ['GNI shift-only(8)']
    """
    family = _norm_family(model, width)
    if methods is None:
        methods = ("plain", "gbn", "gni") if family == "bn" else ("plain", "gni")
    if not ghost_batch_sizes:
        raise ValueError("--ghost-batch-size needs at least one value.")
    plain = "BN" if family == "bn" else "LN"
    specs: List[MethodSpec] = []
    for text in methods:
        m, variant, fixed = _parse_method(text, family, model)
        if m == "plain":
            spec_list = [MethodSpec("plain", None, plain)]
        else:
            prefix = "" if family == "bn" else "LN+"
            name = _NAMES[m] + ("" if variant is None else f" {_VARIANT_NAMES[variant]}")
            sizes = [fixed] if fixed is not None else list(dict.fromkeys(ghost_batch_sizes))
            for n in sizes:
                if n < 1:
                    raise ValueError(f"--ghost-batch-size values must be >= 1, got {n}.")
                if n < 2 and m in _NEEDS_TWO:
                    raise ValueError(f"{m} needs a ghost batch size >= 2 (N - 1 >= 1 other samples), got {n}.")
            spec_list = [MethodSpec(m, n, f"{prefix}{name}({n})", variant) for n in sizes]
        specs.extend(s for s in spec_list if s not in specs)
    return specs
