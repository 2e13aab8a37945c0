"""Find, replace and revert normalization layers in any ``nn.Module`` (no Lightning needed).

The functions here were ``lightning_ghostnoise.surgery``; that path still works.

Example:
    >>> import torch
    >>> from lightning_ghostnoise import apply_ghost_noise, revert_ghost_noise, ghost_layers
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = apply_ghost_noise(model, ghost_batch_size=16)
    >>> [name for name, _ in ghost_layers(model)]
    ['1']
    >>> model = revert_ghost_noise(model)
    >>> type(model[1]).__name__
    'BatchNorm2d'
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type

from torch import nn

from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.distributed import rank_zero_warn
from lightning_ghostnoise.layers.base import GhostNoiseMixin, is_ghost_layer
from lightning_ghostnoise.layers.batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from lightning_ghostnoise.layers.group_norm import GhostGroupNorm
from lightning_ghostnoise.layers.layer_norm import GhostLayerNorm
from lightning_ghostnoise.layers.validation import (
    Method,
    RunningStats,
    validate_ghost_batch_size,
    validate_method,
    validate_running_stats,
    validate_strength,
)
from lightning_ghostnoise.seeding import derive_seed, validate_seed

__all__ = [
    "LAYER_TYPES",
    "SurgeryReport",
    "apply_ghost_noise",
    "find_norm_layers",
    "ghost_class_for",
    "ghost_layers",
    "revert_ghost_noise",
    "set_ghost_batch_size",
    "set_strength",
]

_NORM_BASES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

_GHOST_CLASSES: Dict[Type[nn.Module], Type[GhostNoiseMixin]] = {
    cls._base: cls for cls in (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostLayerNorm, GhostGroupNorm)
}

#: Layer type names accepted by ``include_types`` / ``exclude_types`` (case-insensitive).
LAYER_TYPES: Tuple[str, ...] = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "BatchNorm")

TypeNames = Optional[Sequence[str]]
Patterns = Optional[Sequence[str]]


@dataclass
class SurgeryReport:
    """What :func:`apply_ghost_noise` did: replaced layer names by type, and skipped layers with why."""

    replaced: Dict[str, List[str]] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    @property
    def num_replaced(self) -> int:
        return sum(len(v) for v in self.replaced.values())

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in sorted(self.replaced.items())]
        return ", ".join(parts) if parts else "no layer"


def ghost_class_for(module_type: Type[nn.Module]) -> Optional[Type[GhostNoiseMixin]]:
    """The ghost-noise class for an exact plain norm layer type, else ``None``.

    Example:
        >>> import torch
        >>> ghost_class_for(torch.nn.BatchNorm2d).__name__, ghost_class_for(torch.nn.Linear)
        ('GhostBatchNorm2d', None)
    """
    return _GHOST_CLASSES.get(module_type)


def _type_matches(module: nn.Module, names: Sequence[str]) -> bool:
    base = getattr(type(module), "_base", type(module))
    lowered = {n.lower() for n in names}
    own = base.__name__.lower()
    return own in lowered or ("batchnorm" in lowered and issubclass(base, nn.modules.batchnorm._BatchNorm))


def _check_type_names(names: TypeNames, arg: str) -> None:
    if names is None:
        return
    if isinstance(names, str):
        raise TypeError(f"{arg} must be a list of layer type names, e.g. [{names!r}], not a bare string.")
    known = {n.lower() for n in LAYER_TYPES}
    for n in names:
        if n.lower() not in known:
            raise ValueError(f"Unknown layer type {n!r} in {arg}: choose from {', '.join(LAYER_TYPES)}.")


def _check_patterns(patterns: Patterns, arg: str) -> None:
    if isinstance(patterns, str):
        raise TypeError(f"{arg} must be a list of name patterns, e.g. [{patterns!r}], not a bare string.")


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_norm_layers(
    model: nn.Module,
    include_types: TypeNames = None,
    exclude_types: TypeNames = None,
    include_names: Patterns = None,
    exclude_names: Patterns = None,
) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, str]]:
    """The normalization layers ghost noise can rewrite, and those it must skip (with the reason).

    Args:
        model: any module (the root itself may be a norm layer, named ``""``).
        include_types: only these layer types (see :data:`LAYER_TYPES`; ``"BatchNorm"`` means all three).
        exclude_types: never these layer types.
        include_names: only layers whose qualified name matches one of these glob patterns.
        exclude_names: never layers whose qualified name matches one of these glob patterns.

    Returns:
        ``(targets, skipped)``: ``[(name, module)]`` of plain or ghost layers to (re)configure, and
        ``{name: reason}`` of norm layers that are left alone for a reason the user should know.
    """
    _check_type_names(include_types, "include_types")
    _check_type_names(exclude_types, "exclude_types")
    _check_patterns(include_names, "include_names")
    _check_patterns(exclude_names, "exclude_names")
    targets: List[Tuple[str, nn.Module]] = []
    skipped: Dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _NORM_BASES):
            continue
        if include_types is not None and not _type_matches(module, include_types):
            continue
        if exclude_types is not None and _type_matches(module, exclude_types):
            continue
        if include_names is not None and not _name_matches(name, include_names):
            continue
        if exclude_names is not None and _name_matches(name, exclude_names):
            continue
        if is_ghost_layer(module) or ghost_class_for(type(module)) is not None:
            targets.append((name, module))
            continue
        skipped[name] = (
            f"{type(module).__module__}.{type(module).__qualname__} subclasses a norm layer with behaviour of its own "
            "(its forward or its distributed statistics), which ghost noise would silently drop"
        )
    return targets, skipped


def _become(target: nn.Module, source: nn.Module) -> None:
    """Turn ``target`` into ``source`` in place: its class and state, keeping the object.

    The layers are converted in place, not replaced, so everything holding the module object itself
    keeps a valid reference: its parent, hooks, and the sharded strategies (FSDP, ``fully_shard``),
    which put each module's unsharded parameters back on the object they recorded at wrap time.
    ``source`` was built from ``target``'s own attributes (parameters and buffers shared).
    """
    state = dict(vars(source))
    vars(target).clear()
    vars(target).update(state)
    target.__class__ = type(source)


def apply_ghost_noise(
    model: nn.Module,
    ghost_batch_size: int = 16,
    method: Method = "gni",
    strength: float = 1.0,
    shift_noise: bool = True,
    scale_noise: bool = True,
    noise_eps: float = GF.NOISE_EPS,
    seed: int = 0,
    fused: bool = True,
    include_types: TypeNames = None,
    exclude_types: TypeNames = None,
    include_names: Patterns = None,
    exclude_names: Patterns = None,
    warn: bool = True,
    report: Optional[SurgeryReport] = None,
    running_stats: Optional[RunningStats] = None,
) -> nn.Module:
    """Rewrite ``model``'s normalization layers with ghost noise, in place; returns ``model``.

    Each layer becomes its ghost counterpart in place: the same module object, with the same
    parameters and buffers (the optimizer's, hooks' and sharded strategies' references stay valid),
    under the same names, so ``state_dict`` keys do not change. Applying again reconfigures the ghost
    layers: noise is never stacked. Everything is validated before anything changes.

    Args:
        model: any module.
        ghost_batch_size: ``N``, the ghost batch size.
        method: ``"gni"`` (default), ``"gbn"``, ``"xbn"`` or ``"analytic"``. LayerNorm and GroupNorm
            take ``"gni"`` and ``"analytic"`` only: with ``"gbn"``/``"xbn"`` and no ``include_types``,
            only BatchNorm layers are targets (naming LayerNorm in ``include_types`` is an error).
        strength: ``0 <= s <= MAX_STRENGTH`` (2); 0 is the plain layer, 1 the method exactly; above 1 the
            noise is extrapolated, with a warning (see :func:`~lightning_ghostnoise.layers.validation.validate_strength`).
        shift_noise: inject the shift (mean) part of the noise.
        scale_noise: inject the scale (variance) part of the noise.
        noise_eps: GNI's epsilon in the noise scale.
        seed: base seed of the layers' own generators (a layer uses ``derive_seed(seed, crc32(its name))``,
            so separate calls with different filters never give two layers the same stream).
        fused: use the fused autograd paths (BatchNorm methods, and LayerNorm/GroupNorm, whose fused
            path keeps only the input for the backward; first-order gradients only; ``False`` for double
            backward).
        include_types, exclude_types, include_names, exclude_names: see :func:`find_norm_layers`.
        warn: warn about skipped layers and about a model without target layers.
        report: filled with what was replaced and skipped, if given.
        running_stats: where the BatchNorm layers' running statistics come from in training: ``"ghost"``
            (the mean over ghost batches of their means and unbiased variances, GBN as published) or
            ``"batch"`` (the full batch's, as plain BatchNorm). ``None``: the method's default, ``"ghost"``
            for ``"gbn"`` and ``"batch"`` otherwise; ``"ghost"`` with another method is an error.

    Example:
        >>> import torch
        >>> m = apply_ghost_noise(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), 8)
        >>> m[1].method, m[1].ghost_batch_size
        ('gni', 8)
    """
    validate_seed(seed)
    lowered = validate_method(method)
    validate_running_stats(running_stats, lowered)  # also where no layer is a target
    if include_types is None and lowered in ("gbn", "xbn"):
        # GBN and XBN split batch statistics: only BatchNorm layers have them
        include_types = ["BatchNorm"]
    targets, skipped = find_norm_layers(model, include_types, exclude_types, include_names, exclude_names)
    # build (and so validate) every replacement first: an error leaves the model untouched
    new_layers: List[Tuple[str, GhostNoiseMixin]] = []
    for name, module in targets:
        plain = module.to_plain() if isinstance(module, GhostNoiseMixin) else module
        cls = ghost_class_for(type(plain))
        assert cls is not None
        try:
            layer = cls.from_module(
                plain,
                method=method,
                ghost_batch_size=ghost_batch_size,
                strength=strength,
                shift_noise=shift_noise,
                scale_noise=scale_noise,
                noise_eps=noise_eps,
                seed=derive_seed(seed, zlib.crc32(name.encode())),
                fused=fused,
                running_stats=running_stats,
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"Cannot apply ghost noise to layer {name or '<root>'!r}: {err}") from err
        new_layers.append((name, layer))
    for (_, module), (_, layer) in zip(targets, new_layers):
        _become(module, layer)
    out = report if report is not None else SurgeryReport()
    for name, layer in new_layers:
        out.replaced.setdefault(layer._base.__name__, []).append(name)
    out.skipped.update(skipped)
    if warn:
        for name, why in skipped.items():
            rank_zero_warn(f"Ghost noise skipped layer {name!r}: {why}. Exclude it to silence this warning.")
        if not new_layers:
            rank_zero_warn(
                "Ghost noise found no BatchNorm, LayerNorm or GroupNorm layer to rewrite (after include/exclude "
                "filters): it has no effect on this model."
            )
    return model


def revert_ghost_noise(model: nn.Module) -> nn.Module:
    """Turn the ghost layers back into plain layers, in place (same objects, parameters and buffers).

    Returns ``model``.

    Example:
        >>> import torch
        >>> m = apply_ghost_noise(torch.nn.BatchNorm1d(3))
        >>> type(revert_ghost_noise(m)).__name__
        'BatchNorm1d'
    """
    for _, layer in ghost_layers(model):
        _become(layer, layer.to_plain())
    return model


def ghost_layers(model: nn.Module) -> List[Tuple[str, GhostNoiseMixin]]:
    """All ghost-noise layers in ``model`` as ``(qualified name, layer)``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GhostNoiseMixin)]


def set_strength(model: nn.Module, strength: float) -> None:
    """Set the noise strength of every ghost layer (no recompilation under ``torch.compile``).

    Validated (``0 <= strength <= MAX_STRENGTH``) before any layer changes."""
    layers = ghost_layers(model)
    for _, layer in layers[:1]:
        validate_strength(strength, layer.method)
    for _, layer in layers:
        layer.strength = strength


def set_ghost_batch_size(model: nn.Module, ghost_batch_size: int) -> None:
    """Set the ghost batch size of every ghost layer (validated on all layers before any changes)."""
    layers = ghost_layers(model)
    for name, layer in layers:
        try:
            validate_ghost_batch_size(ghost_batch_size, layer.method, layer.scale_noise)
        except ValueError as err:
            raise ValueError(f"ghost_batch_size {ghost_batch_size} is too small for layer {name!r}: {err}") from None
    for _, layer in layers:
        layer.ghost_batch_size = ghost_batch_size
