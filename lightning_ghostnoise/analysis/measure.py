"""Measure the noise that live ghost layers inject into a model, for several methods and ``N``.

:func:`analyze_noise` runs a copy of the model with ghost noise in training mode for every (method,
``N``), records each layer's noise with a :class:`~lightning_ghostnoise.analysis.recorder.NoiseRecorder`
and summarizes it against theory in a :class:`~lightning_ghostnoise.analysis.report.NoiseAnalysis`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    >>> x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    >>> result = analyze_noise(model, x, ghost_batch_sizes=[16], methods=["gni", "gbn"])
    >>> s = result.summary("gni", 16, "1")  # one value per sample: the law at N = 16, shift std 0.25
    >>> abs(s.shift_std - 0.25) < 0.02, round(s.n_eff_shift)
    (True, 16)
"""

from __future__ import annotations

import copy
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Union,
    cast,
)

import torch
from torch import Tensor, nn

from lightning_ghostnoise.analysis.recorder import LayerNoise, NoiseRecorder
from lightning_ghostnoise.analysis.report import NoiseAnalysis, _Accumulator
from lightning_ghostnoise.layers import METHODS, GhostNoiseMixin

if TYPE_CHECKING:
    from lightning_ghostnoise.layers.validation import Method

__all__ = ["analyze_noise"]


def _inputs(data: Any, num_batches: int) -> List[Tensor]:
    if isinstance(data, Tensor):
        return [data]
    out: List[Tensor] = []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"analyze_noise: a batch must be a tensor or a (input, ...) tuple, got {type(batch).__name__}. "
                "Pass one input tensor, or an iterable of batches (e.g. a DataLoader; wrap a single (x, y) in a list)."
            )
        out.append(x)
        if len(out) >= num_batches:
            break
    if not out:
        raise ValueError("analyze_noise: the data gave no batch.")
    return out


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def analyze_noise(
    model: nn.Module,
    data: Union[Tensor, Iterable[Any]],
    ghost_batch_sizes: Sequence[int] = (4, 8, 16, 32, 64),
    methods: Sequence[str] = METHODS,
    num_batches: int = 1,
    seed: int = 0,
    include_names: Optional[Sequence[str]] = None,
    exclude_names: Optional[Sequence[str]] = None,
    max_samples: int = 200_000,
    mode: str = "live",
) -> NoiseAnalysis:
    """Measure, per layer, the noise each method injects at each ghost batch size, and compare it with theory.

    For every (method, ``N``) a copy of ``model`` gets ghost noise at strength 1
    (:func:`~lightning_ghostnoise.apply_ghost_noise` with ``seed``) and runs the batches in
    training mode without gradients; a :class:`NoiseRecorder` records each layer's noise. ``model``
    itself is not changed.

    Two modes: ``"live"``, the network with ghost noise in every layer, so each layer sees the input
    that the noise of the layers before it shaped (what training with the method does); ``"isolated"``,
    each layer's noise on the input of the plain network (every layer passes on the plain layer's
    output), so that all methods are compared on the same inputs. They differ most for GBN: its
    ghost batches are the same samples at every layer, and each GBN layer standardizes every ghost
    batch, so the next layers' ghost batches have nearly the batch's statistics and their measured
    noise shrinks (see the docs page on noise analysis).

    Args:
        model: a model with BatchNorm, LayerNorm or GroupNorm layers (plain or ghost layers).
        data: one input tensor, or an iterable of batches (tensors or ``(input, ...)`` tuples, e.g. a
            ``DataLoader``); the first ``num_batches`` are used, moved to the model's device.
        ghost_batch_sizes: the ``N`` to analyze (each ``>= 2``: the scale's law has ``N - 1`` degrees of freedom).
        methods: among ``"gni"``, ``"gbn"``, ``"xbn"``, ``"analytic"``; GBN and XBN apply to
            BatchNorm layers only (a model without any is reported in ``skipped``).
        num_batches: how many batches of ``data`` to use.
        seed: the ghost layers' seed.
        include_names: analyze only layers matching one of these glob patterns.
        exclude_names: never layers matching one of these glob patterns.
        max_samples: keep at most this many values per (method, ``N``, layer) for histograms.
        mode: ``"live"`` or ``"isolated"``, see above.

    Returns:
        A :class:`NoiseAnalysis`.
    """
    from lightning_ghostnoise import apply_ghost_noise, find_norm_layers, ghost_layers

    sizes = list(ghost_batch_sizes)
    if not sizes:
        raise ValueError("analyze_noise: ghost_batch_sizes is empty; pass e.g. [4, 16, 64].")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"analyze_noise: ghost batch sizes must be integers >= 2 (the scale's law has N - 1 degrees of freedom), "
                f"got {n!r}."
            )
    methods = [m.lower() for m in methods]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"analyze_noise: unknown method {m!r}: choose from {', '.join(METHODS)}.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"analyze_noise: num_batches must be a positive integer, got {num_batches!r}.")
    if mode not in ("live", "isolated"):
        raise ValueError(f"analyze_noise: mode must be 'live' or 'isolated', got {mode!r}.")
    device = _device(model)
    inputs = [x.to(device) for x in _inputs(data, num_batches)]
    result = NoiseAnalysis(
        meta={"mode": mode, "batches": len(inputs), "batch_size": int(inputs[0].shape[0]), "seed": seed}
    )
    for method in methods:
        targets, _ = find_norm_layers(
            model, ["BatchNorm"] if method in ("gbn", "xbn") else None, None, include_names, exclude_names
        )
        if not targets:
            result.skipped[method] = (
                "no BatchNorm layer (GBN and XBN split batch statistics)"
                if method in ("gbn", "xbn")
                else "no norm layer"
            )
            continue
        for n in sizes:
            net = apply_ghost_noise(
                copy.deepcopy(model), n, cast("Method", method), strength=1.0, seed=seed, include_types=None if method in ("gni", "analytic") else ["BatchNorm"],
                include_names=include_names, exclude_names=exclude_names, warn=False,
            )  # fmt: skip
            layers = ghost_layers(net)
            acc: Dict[str, _Accumulator] = {}

            def sink(name: str, layer: GhostNoiseMixin, noise: Optional[LayerNoise]) -> None:
                if noise is not None:
                    acc.setdefault(name, _Accumulator()).add(layer, noise)  # noqa: B023  (called within this iteration)

            net.train()
            with torch.no_grad(), NoiseRecorder(layers, sink, plain_output=mode == "isolated"):
                for x in inputs:
                    net(x)
            for name, _ in layers:
                if name not in acc:
                    continue
                if name not in result.layers:
                    result.layers.append(name)
                a = acc[name]
                result.summaries.append(a.summarize(name, method, n, mode))
                z = torch.cat([t.reshape(-1) for t in a.shift])[:max_samples].float()
                s = torch.cat([t.reshape(-1) for t in a.scale])[:max_samples].float()
                result.samples[(method, n, name)] = (z, s)
    order = {name: i for i, name in enumerate(result.layers)}
    result.summaries.sort(key=lambda s: (s.ghost_batch_size, order.get(s.layer, 0), methods.index(s.method)))
    return result
