"""Ghost-noise versions of PyTorch's normalization layers.

Each class subclasses the norm layer it replaces and keeps its parameters and buffers under the same
names, so a ``state_dict`` moves freely between the plain and the ghost-noise model (``strict=True``).
The only added buffer, ``_ghost_strength``, is non-persistent: it is not part of the state dict.

In eval mode, with ``strength == 0``, or when the module itself is in eval mode during training (a
frozen BatchNorm), every layer runs the plain layer's own ``forward``.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostBatchNorm2d
    >>> bn = torch.nn.BatchNorm2d(8)
    >>> gbn = GhostBatchNorm2d.from_module(bn, method="gni", ghost_batch_size=16)
    >>> sorted(gbn.state_dict()) == sorted(bn.state_dict())
    True
    >>> gbn(torch.randn(32, 8, 4, 4)).shape
    torch.Size([32, 8, 4, 4])
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Literal, Optional, Tuple, Type

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ghostnoise import counter_rng
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.distributed import gather_rows, global_batch_moments, sync_world

__all__ = [
    "METHODS",
    "Method",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostGroupNorm",
    "GhostLayerNorm",
    "GHOST_BUFFERS",
    "GhostNoiseMixin",
    "ghost_class_for",
    "is_ghost_layer",
    "MAX_STRENGTH",
    "RunningStats",
    "default_running_stats",
    "min_ghost_batch_size",
    "validate_ghost_batch_size",
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

_STRENGTH_BUFFER = "_ghost_strength"
_STATE_BUFFER = "_ghost_state"  # int64 [seed, draws since reseed]: the counter-based generator's state
#: Names of the non-persistent buffers a ghost layer adds (not in its state_dict).
GHOST_BUFFERS = (_STRENGTH_BUFFER, _STATE_BUFFER)


def _check_method(method: str, allowed: Tuple[str, ...], layer: str) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"Unknown ghost noise method {method!r}: choose one of {', '.join(METHODS)}.")
    method = method.lower()
    if method not in allowed:
        raise ValueError(
            f"Method {method!r} does not apply to {layer}: it normalizes each sample on its own, so there are "
            f"no batch statistics to split into ghost batches. Use one of {', '.join(allowed)} for {layer}, "
            "or exclude these layers."
        )
    return method


def min_ghost_batch_size(method: str, scale_noise: bool = True) -> int:
    """The smallest ghost batch size a method can use: 2 for XBN and analytic scale noise, else 1."""
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
    """The convention a method's running statistics follow by default: ``"ghost"`` for GBN, else ``"batch"``."""
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


def validate_running_stats(value: Any, method: str) -> str:
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
    value = GF.resolve_running_stats(value, ghost=method == "gbn")
    if value == "ghost" and method != "gbn":
        why = _FULL_BATCH_REASONS.get(method, "it has no ghost batches of its own")
        raise ValueError(
            f"running_stats='ghost' applies to method 'gbn' only, got method {method!r}: {why}. Use "
            "running_stats='batch' or None (the method's default)."
        )
    return value


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


class GhostNoiseMixin:
    """State and settings shared by every ghost-noise layer.

    Attributes:
        method: ``"gni"``, ``"gbn"``, ``"xbn"`` or ``"analytic"``.
        ghost_batch_size: ``N``; settable (a schedule changes it between steps).
        strength: ``0 <= s <= MAX_STRENGTH``; settable; stored also as a tensor buffer so that a compiled model does
            not recompile when it changes.
        shift_noise: apply the shift (mean) part of the noise.
        scale_noise: apply the scale (variance) part of the noise.
        noise_eps: the epsilon inside GNI's noise scale (the paper's 1e-3).
        seed: the seed of the layer's own random generator (see :meth:`reseed`).
        counter_rng: draw from the counter-based generator (:mod:`lightning_ghostnoise.counter_rng`)
            instead of the layer's ``torch.Generator``; always so under ``torch.compile``, where a
            generator attribute would break the graph. Same law, another (equally reproducible) stream.
        running_stats: where a BatchNorm layer's running statistics come from in training: ``"ghost"``
            (GBN's default: the mean over ghost batches of their means and unbiased variances, as
            published) or ``"batch"`` (the full batch's, as plain BatchNorm; XBN, GNI, analytic GNI).
        fused: the fused autograd functions in eager mode, first-order gradients only: BatchNorm methods
            as fast as BatchNorm's own kernels; LayerNorm and GroupNorm keep only their input for the
            backward, as the plain layers do (:func:`~lightning_ghostnoise.functional.normalized_noise`).
            ``False`` uses plain autograd (double backward, e.g. gradient penalties, works).
    """

    _base: ClassVar[Type[nn.Module]]
    _methods: ClassVar[Tuple[str, ...]] = METHODS
    _ghost_attrs: ClassVar[Tuple[str, ...]] = (
        "method",
        "_ghost_batch_size",
        "_strength_value",
        "_noise_on",
        "shift_noise",
        "_scale_noise",
        "fused",
        "_running_stats",
        "noise_eps",
        "seed",
        "_generator",
        "sync",
        "process_group",
        "counter_rng",
        "noise_observer",
    )

    method: str
    shift_noise: bool
    fused: bool
    noise_eps: float
    seed: int
    sync: bool
    #: ``observer(layer, draws)``, called with every forward's random draws (GNI, analytic GNI) when set:
    #: how :mod:`lightning_ghostnoise.analysis` and :class:`~lightning_ghostnoise.monitor.GhostNoiseMonitor`
    #: see the noise a live layer injects. ``None`` (the default) costs nothing.
    noise_observer: Optional[Callable[["GhostNoiseMixin", GF.GhostDraws], None]] = None

    # ------------------------------------------------------------------ construction / reversal
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        method: str = "gni",
        ghost_batch_size: int = 16,
        strength: float = 1.0,
        shift_noise: bool = True,
        scale_noise: bool = True,
        noise_eps: float = GF.NOISE_EPS,
        seed: int = 0,
        fused: bool = True,
        running_stats: Optional[RunningStats] = None,
    ) -> "GhostNoiseMixin":
        """Build the ghost-noise layer around ``module``'s parameters and buffers (shared, not copied).

        ``running_stats``: ``"ghost"`` or ``"batch"`` (see :func:`validate_running_stats`); ``None``
        is the method's default (``"ghost"`` for GBN, ``"batch"`` otherwise).

        Raises:
            TypeError: ``module`` is not exactly this class's plain layer.
            ValueError: a bad setting; the message says which and why.
        """
        if type(module) is not cls._base:
            raise TypeError(f"{cls.__name__}.from_module expects a {cls._base.__name__}, got {type(module).__name__}.")
        new = cls.__new__(cls)
        # validate everything before touching any state, so an error leaves nothing half-done
        method = _check_method(method, cls._methods, cls._base.__name__)
        running_stats = validate_running_stats(running_stats, method)
        cls._check_module(module)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        new.method = method
        new.shift_noise = bool(shift_noise)
        new._scale_noise = bool(scale_noise)
        new.fused = bool(fused)
        new._running_stats = running_stats
        new.counter_rng = False
        new._strength_value = 0.0
        new._noise_on = False
        new._ghost_batch_size = 1
        new.sync = False
        new.process_group = None
        new._generator = None
        new.seed = 0
        new.noise_eps = validate_noise_eps(noise_eps)
        new.ghost_batch_size = ghost_batch_size
        device = new._state_device()
        new.register_buffer(_STRENGTH_BUFFER, torch.zeros((), device=device, dtype=torch.float32), persistent=False)
        new.register_buffer(_STATE_BUFFER, torch.zeros(2, device=device, dtype=torch.int64), persistent=False)
        new.strength = strength
        new.reseed(seed)
        return new

    @classmethod
    def _check_module(cls, module: nn.Module) -> None:
        """Refuse layer configurations the method cannot handle (overridden per family)."""

    def to_plain(self) -> nn.Module:
        """Return the plain layer with the same parameters and buffers (shared, not copied).

        Example:
            >>> from lightning_ghostnoise.layers import GhostBatchNorm1d
            >>> type(GhostBatchNorm1d.from_module(torch.nn.BatchNorm1d(3)).to_plain()).__name__
            'BatchNorm1d'
        """
        base = self._base
        plain = base.__new__(base)
        state = {k: v for k, v in self.__dict__.items() if k not in self._ghost_attrs}
        plain.__dict__.update(state)
        plain._parameters = dict(self._parameters)
        plain._buffers = {k: v for k, v in self._buffers.items() if k not in GHOST_BUFFERS}
        plain._non_persistent_buffers_set = set(self._non_persistent_buffers_set) - set(GHOST_BUFFERS)
        return plain

    def _state_device(self) -> torch.device:
        for t in list(self._parameters.values()) + list(self._buffers.values()):  # type: ignore[attr-defined]
            if t is not None:
                return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ settings
    @property
    def ghost_batch_size(self) -> int:
        """The ghost batch size ``N`` (an int ``>= 1``; ``>= 2`` for XBN and analytic scale noise)."""
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, value: int) -> None:
        self._ghost_batch_size = validate_ghost_batch_size(value, self.method, self.scale_noise)

    @property
    def running_stats(self) -> str:
        """``"ghost"`` or ``"batch"``: where the running statistics come from (see :func:`validate_running_stats`);
        settable (``None``: the method's default). A layer pickled before the option existed has the default."""
        return self.__dict__.get("_running_stats") or default_running_stats(self.method)

    @running_stats.setter
    def running_stats(self, value: Optional[str]) -> None:
        self._running_stats = validate_running_stats(value, self.method)

    @property
    def scale_noise(self) -> bool:
        """Whether the scale (variance) part of the noise is applied."""
        return self._scale_noise

    @scale_noise.setter
    def scale_noise(self, value: bool) -> None:
        low = min_ghost_batch_size(self.method, bool(value))
        if self._ghost_batch_size < low:
            raise ValueError(
                f"scale_noise=True needs ghost_batch_size >= {low} for method {self.method!r} (chi2 with N - 1 degrees "
                f"of freedom), but ghost_batch_size is {self._ghost_batch_size}: raise it first."
            )
        self._scale_noise = bool(value)

    @property
    def strength(self) -> float:
        """The noise strength ``0 <= s <= MAX_STRENGTH``: 0 is the plain layer, 1 the method exactly.

        Above 1 the noise is extrapolated and warned about once (see :func:`validate_strength`)."""
        return self._strength_value

    @strength.setter
    def strength(self, value: float) -> None:
        value = validate_strength(value, self.method)
        self._strength_value = value
        self._noise_on = value != 0.0
        buf = getattr(self, _STRENGTH_BUFFER, None)
        if buf is not None:
            with torch.no_grad():
                buf.fill_(value)

    # ------------------------------------------------------------------ randomness
    def reseed(self, seed: int) -> None:
        """(Re)seed the layer's own generator; the global RNG is never used.

        The generator lives on the device of the layer's tensors and follows the layer when it moves.
        """
        seed = int(seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}.")
        self.seed = seed
        device = self._state_device()
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        state = self._buffers.get(_STATE_BUFFER)  # type: ignore[attr-defined]
        if state is not None:
            with torch.no_grad():
                state[0].fill_(seed)
                state[1].fill_(0)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generator = gen
        return gen

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        buf = self._buffers.get(_STRENGTH_BUFFER)  # type: ignore[attr-defined]
        if buf is not None and buf.dtype != torch.float32:  # .half()/.to(bf16): keep the strength exact
            self._buffers[_STRENGTH_BUFFER] = torch.full((), self._strength_value, device=buf.device)  # type: ignore[attr-defined]
        # device moves: the generator follows the layer
        if self._generator is not None and self._generator.device != self._state_device():
            self.reseed(self.seed)
        return out

    # ------------------------------------------------------------------ noise
    def _noise_active(self) -> bool:
        return bool(self.training and self._noise_on)  # type: ignore[attr-defined]

    def _sync_world(self) -> Optional[Tuple[int, int]]:
        return sync_world(self.process_group) if self.sync else None

    def _random_source(self, device: torch.device) -> Tuple[Optional[torch.Generator], Optional[Tensor]]:
        """``(generator, key)``: the layer's generator in eager mode, a counter-based key under compile."""
        if self.counter_rng or torch.compiler.is_compiling():
            # a torch.Generator attribute breaks the compiled graph: draw from a counter-based
            # generator keyed by the same seed (and the number of draws since the last reseed)
            state = getattr(self, _STATE_BUFFER)
            key = _saved_not_recomputed(counter_rng.mix_key(state[0], state[1]))
            state[1:].add_(1)
            return None, key
        return self._generator_for(device), None

    def _draws(self, pool: int, channels: int, device: torch.device) -> GF.GhostDraws:
        """This step's random draws for a pool of ``pool`` samples: ghost indices, or analytic noise."""
        gen, key = self._random_source(device)
        if self.method == "analytic":
            n = self._ghost_batch_size
            normal, gamma = GF.analytic_draws(pool, channels, n, generator=gen, device=device, key=key)
            draws = GF.GhostDraws(normal=normal, gamma=gamma, ghost_batch_size=n)
        else:
            idx = GF.ghost_indices(pool, self._ghost_batch_size, generator=gen, device=device, key=key)
            draws = GF.GhostDraws(indices=idx, eps=self.noise_eps)
        if self.noise_observer is not None:
            self.noise_observer(self, draws)
        return draws

    def _draw_noise(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-(sample, channel) ``(shift, scale)`` for GNI or analytic GNI.

        ``mean``/``var`` are the per-sample moments ``(B, C)`` of the normalized features. With
        ``sync`` in a process group the draws cover the global batch (identical on every process) and
        each process keeps its own rows.
        """
        batch, channels = mean.shape
        world = self._sync_world()
        if not world:
            return self._draws(batch, channels, mean.device)(mean, var)
        first, pool = world[0] * batch, batch * world[1]
        draws = self._draws(pool, channels, mean.device)
        if draws.indices is None:  # analytic: no data needed, keep this process's rows
            shift, scale = draws(mean, var)
            return shift[first : first + batch], scale[first : first + batch]
        both = gather_rows(torch.cat([mean, var], 1), self.process_group)
        return GF.ghost_noise(both[:, :channels], both[:, channels:], draws.indices[first : first + batch], eps=self.noise_eps)

    def _inject(
        self, x: Tensor, normalize: Callable[[Tensor], Tensor], weight: Optional[Tensor], bias: Optional[Tensor], channel_dim: int
    ) -> Tensor:
        """GNI after a per-sample normalization (LayerNorm, GroupNorm): ``normalize``, noise, then the affine.

        Analytic GNI's noise does not depend on the data: its per-sample moments are not computed."""
        noise_fn = GF.MomentFreeNoise(self._draw_noise) if self.method == "analytic" else self._draw_noise
        return GF.normalized_noise(
            x,
            normalize,
            noise_fn,
            weight,
            bias,
            strength=getattr(self, _STRENGTH_BUFFER),
            channel_dim=channel_dim,
            shift_noise=self.shift_noise,
            scale_noise=self.scale_noise,
            fused=None if self.fused else False,
        )

    def ghost_extra_repr(self) -> str:
        return (
            f"method={self.method}, ghost_batch_size={self._ghost_batch_size}, strength={self._strength_value:g}"
            + ("" if self.shift_noise else ", shift_noise=False")
            + ("" if self.scale_noise else ", scale_noise=False")
            + (f", running_stats={self.running_stats}" if self.running_stats != default_running_stats(self.method) else "")
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.ghost_extra_repr()  # type: ignore[misc]


def _saved_not_recomputed(key: Tensor) -> Tensor:
    """``key`` unchanged, as an op that ``torch.compile``'s partitioner saves for the backward.

    The draws derive from the key, and the key from the state buffer that this forward advances in
    place. Inductor's min-cut partitioner may recompute cheap values in the backward instead of
    saving them; recomputing the draws from the state reads it after the increment, so the backward
    would see other draws than the forward: silently wrong gradients under inductor (seen for
    analytic GNI with torch 2.13), a version-counter error under ``aot_eager_decomp_partition``.
    PyTorch has an open fix (pytorch/pytorch#197039, not recomputing reads of mutated inputs). Until
    then: the partitioner never recomputes an op outside its allowlist, and a product over one
    element is such an op, so the 8-byte key is saved and the draws are recomputed from it.
    """
    return key.reshape(1).prod(0)


def _check_floating(x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"ghost noise layers need a floating point input, got dtype {x.dtype}.")


class _GhostBatchNorm(GhostNoiseMixin):
    """Forward of the BatchNorm family: GNI and analytic after BN; GBN and XBN with ghost statistics."""

    def _running_factor(self) -> float:
        # mirrors torch.nn.modules.batchnorm._BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.track_running_stats and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if self.momentum is None:  # type: ignore[attr-defined]
                factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        return factor

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        _check_floating(x)
        if x.numel() == x.shape[1]:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                "(as torch.nn.BatchNorm: one value carries no variance)."
            )
        factor = self._running_factor()
        settings: Dict[str, Any] = dict(
            running_mean=self.running_mean,  # type: ignore[attr-defined]
            running_var=self.running_var,  # type: ignore[attr-defined]
            weight=self.weight,  # type: ignore[attr-defined]
            bias=self.bias,  # type: ignore[attr-defined]
            momentum=factor,
            eps=self.eps,  # type: ignore[attr-defined]
            strength=getattr(self, _STRENGTH_BUFFER),
            shift_noise=self.shift_noise,
            scale_noise=self.scale_noise,
            fused=None if self.fused else False,
        )
        world = self._sync_world()
        if self.method in ("gbn", "xbn"):
            if world:
                raise RuntimeError(
                    f"sync=True supports the methods 'gni' and 'analytic'; {self.method!r} forms its ghost batches "
                    "inside each process's batch. Use sync=False (identical when the per-process batch is a "
                    "multiple of ghost_batch_size)."
                )
            if self.method == "gbn":
                return GF.ghost_batch_norm(x, self._ghost_batch_size, **settings, running_stats=self.running_stats)
            return GF.exclusive_batch_norm(x, self._ghost_batch_size, **settings)
        if world:
            settings["stats_fn"] = self._global_statistics(x.numel() // x.shape[1] * world[1], settings["running_mean"])
            return GF.ghost_noise_batch_norm(x, self._draw_noise, **settings)
        # draws made up front: the fused CUDA kernels compute the noise from them in-kernel
        return GF.ghost_noise_batch_norm(x, self._draws(x.shape[0], x.shape[1], x.device), **settings)

    def _global_statistics(self, count: int, running_mean: Optional[Tensor]) -> Callable[[Tensor, Tensor], Tuple[Tensor, Tensor, int]]:
        """``stats_fn`` for ``sync=True``: the global batch's moments (``count`` values per channel)."""
        group = self.process_group

        def stats(mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor, int]:
            return (*global_batch_moments(mean, var, running_mean, group), count)

        return stats


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with ghost noise, for ``(B, C)`` and ``(B, C, L)`` inputs."""

    _base = nn.BatchNorm1d


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with ghost noise, for ``(B, C, H, W)`` inputs (any memory format)."""

    _base = nn.BatchNorm2d


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with ghost noise, for ``(B, C, D, H, W)`` inputs."""

    _base = nn.BatchNorm3d


class GhostLayerNorm(GhostNoiseMixin, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` over the last dimension, then GNI across the batch, then the affine.

    Input ``(B, *, D)``: the channel is the last dimension and every middle dimension (tokens,
    positions) plays the role of spatial positions. The batch is dimension 0 (use ``batch_first=True``
    transformers). Methods: ``"gni"`` and ``"analytic"``.
    """

    _base = nn.LayerNorm
    _methods = ("gni", "analytic")

    @classmethod
    def _check_module(cls, module: nn.Module) -> None:
        if len(module.normalized_shape) != 1:  # type: ignore[arg-type]
            raise ValueError(
                f"GhostLayerNorm supports LayerNorm over the last dimension only, got normalized_shape="
                f"{tuple(module.normalized_shape)}. Exclude this layer, or use GroupNorm(1, C) for "  # type: ignore[arg-type]
                "channel-first feature maps."
            )

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)
        _check_floating(x)
        if x.dim() < 2:
            raise ValueError(
                f"GhostLayerNorm needs a batch dimension: got an input of shape {tuple(x.shape)}, expected (B, *, D)."
            )
        norm = GF.NativeLayerNorm(self.normalized_shape, self.eps)
        return self._inject(x, norm, self.weight, self.bias, channel_dim=-1)


class GhostGroupNorm(GhostNoiseMixin, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (e.g. ``GroupNorm(1, C)``, a channel-first LayerNorm), then GNI, then the affine.

    Methods: ``"gni"`` and ``"analytic"``.
    """

    _base = nn.GroupNorm
    _methods = ("gni", "analytic")

    def forward(self, x: Tensor) -> Tensor:
        if not self._noise_active():
            return super().forward(x)
        _check_floating(x)
        if x.dim() < 2:
            raise ValueError(
                f"GhostGroupNorm needs a batch dimension: got an input of shape {tuple(x.shape)}, expected (B, C, *)."
            )
        norm = GF.NativeGroupNorm(self.num_groups, self.eps)
        return self._inject(x, norm, self.weight, self.bias, channel_dim=1)


_GHOST_CLASSES: Dict[Type[nn.Module], Type[GhostNoiseMixin]] = {
    cls._base: cls  # type: ignore[misc]
    for cls in (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostLayerNorm, GhostGroupNorm)
}


def ghost_class_for(module_type: Type[nn.Module]) -> Optional[Type[GhostNoiseMixin]]:
    """The ghost-noise class for an exact plain norm layer type, else ``None``."""
    return _GHOST_CLASSES.get(module_type)


def is_ghost_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ghost-noise layer."""
    return isinstance(module, GhostNoiseMixin)
