"""The state and settings every ghost-noise layer shares: :class:`GhostNoiseMixin`.

A ghost layer subclasses the mixin and the plain norm layer it replaces (``class
GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d)``): the mixin comes first in the method resolution
order, so its ``forward`` wraps the plain layer's and falls back to it when the noise is off. The
mixin is itself an :class:`torch.nn.Module`, so its code sees the module's attributes with their types.

Parameters and buffers keep the plain layer's names, so a ``state_dict`` moves freely between the
plain and the ghost-noise model (``strict=True``). The added buffers (:data:`GHOST_BUFFERS`) are
non-persistent: they are not part of the state dict.

Example:
    >>> import torch
    >>> from lightning_ghostnoise.layers import GhostBatchNorm1d, GhostNoiseMixin
    >>> layer = GhostBatchNorm1d.from_module(torch.nn.BatchNorm1d(4), ghost_batch_size=8)
    >>> isinstance(layer, GhostNoiseMixin), layer.ghost_batch_size
    (True, 8)
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Tuple, Type, TypeVar

import torch
from torch import Tensor, nn

from lightning_ghostnoise import backends
from lightning_ghostnoise import functional as GF
from lightning_ghostnoise.distributed import gather_rows, sync_world
from lightning_ghostnoise.functional import counter_rng
from lightning_ghostnoise.layers.validation import (
    METHODS,
    RunningStats,
    check_method_applies,
    default_running_stats,
    min_ghost_batch_size,
    validate_ghost_batch_size,
    validate_noise_eps,
    validate_running_stats,
    validate_strength,
)

__all__ = ["GHOST_BUFFERS", "GhostNoiseMixin", "is_ghost_layer"]

_STRENGTH_BUFFER = "_ghost_strength"
_STATE_BUFFER = "_ghost_state"  # int64 [seed, draws since reseed]: the counter-based generator's state
#: Names of the non-persistent buffers a ghost layer adds (not in its state_dict).
GHOST_BUFFERS = (_STRENGTH_BUFFER, _STATE_BUFFER)

_Layer = TypeVar("_Layer", bound="GhostNoiseMixin")


class GhostNoiseMixin(nn.Module):
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
        counter_rng: draw from the counter-based generator (:mod:`lightning_ghostnoise.functional.counter_rng`)
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
    process_group: Optional[Any]
    counter_rng: bool
    _ghost_batch_size: int
    _strength_value: float
    _noise_on: bool
    _scale_noise: bool
    _running_stats: str
    _generator: Optional[torch.Generator]
    #: ``observer(layer, draws)``, called with every forward's random draws (GNI, analytic GNI) when set:
    #: how :mod:`lightning_ghostnoise.analysis` and :class:`~lightning_ghostnoise.callbacks.GhostNoiseMonitor`
    #: see the noise a live layer injects. ``None`` (the default) costs nothing.
    noise_observer: Optional[Callable[["GhostNoiseMixin", GF.GhostDraws], None]] = None

    # ------------------------------------------------------------------ construction / reversal
    @classmethod
    def from_module(
        cls: Type[_Layer],
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
    ) -> _Layer:
        """Build the ghost-noise layer around ``module``'s parameters and buffers (shared, not copied).

        ``running_stats``: ``"ghost"`` or ``"batch"`` (see :func:`~lightning_ghostnoise.layers.validation.validate_running_stats`); ``None``
        is the method's default (``"ghost"`` for GBN, ``"batch"`` otherwise).

        Raises:
            TypeError: ``module`` is not exactly this class's plain layer.
            ValueError: a bad setting; the message says which and why.
        """
        if type(module) is not cls._base:
            raise TypeError(f"{cls.__name__}.from_module expects a {cls._base.__name__}, got {type(module).__name__}.")
        new = cls.__new__(cls)
        # validate everything before touching any state, so an error leaves nothing half-done
        method = check_method_applies(method, cls._methods, cls._base.__name__)
        resolved_stats = validate_running_stats(running_stats, method)
        cls._check_module(module)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
        new.method = method
        new.shift_noise = bool(shift_noise)
        new._scale_noise = bool(scale_noise)
        new.fused = bool(fused)
        new._running_stats = resolved_stats
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
        for t in list(self._parameters.values()) + list(self._buffers.values()):
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
        """``"ghost"`` or ``"batch"``: where the running statistics come from.

        Settable (``None``: the method's default; see
        :func:`~lightning_ghostnoise.layers.validation.validate_running_stats`). A layer pickled before
        the option existed has the default."""
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

        Above 1 the noise is extrapolated and warned about once (see :func:`~lightning_ghostnoise.layers.validation.validate_strength`)."""
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
        state = self._buffers.get(_STATE_BUFFER)
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
        out = super()._apply(fn, *args, **kwargs)
        buf = self._buffers.get(_STRENGTH_BUFFER)
        if buf is not None and buf.dtype != torch.float32:  # .half()/.to(bf16): keep the strength exact
            self._buffers[_STRENGTH_BUFFER] = torch.full((), self._strength_value, device=buf.device)
        # device moves: the generator follows the layer
        if self._generator is not None and self._generator.device != self._state_device():
            self.reseed(self.seed)
        return out

    # ------------------------------------------------------------------ noise
    def _noise_active(self) -> bool:
        return bool(self.training and self._noise_on)

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
        return GF.ghost_noise(
            both[:, :channels], both[:, channels:], draws.indices[first : first + batch], eps=self.noise_eps
        )

    def _inject(
        self,
        x: Tensor,
        normalize: Callable[[Tensor], Tensor],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        channel_dim: int,
    ) -> Tensor:
        """GNI after a per-sample normalization (LayerNorm, GroupNorm): ``normalize``, noise, then the affine.

        Analytic GNI's noise does not depend on the data: its per-sample moments are not computed."""
        noise_fn = GF.MomentFreeNoise(self._draw_noise) if self.method == "analytic" else self._draw_noise
        return backends.normalized_noise(
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
            + (
                f", running_stats={self.running_stats}"
                if self.running_stats != default_running_stats(self.method)
                else ""
            )
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.ghost_extra_repr()


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


def is_ghost_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ghost-noise layer."""
    return isinstance(module, GhostNoiseMixin)
