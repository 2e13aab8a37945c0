"""Schedules for the ``ghost_batch_size`` and ``strength`` of ghost noise.

A schedule maps a training position to a number. Schedules are pure functions
of the position (epoch, step in the epoch), never of call history, so a run
resumed from a checkpoint in the middle of an epoch gets exactly the values an
uninterrupted run would have had.

Position:
    Every schedule is called as ``schedule(epoch, step_in_epoch,
    steps_per_epoch, max_epochs)``. The position used for interpolation is

    * ``t = epoch + step_in_epoch / steps_per_epoch`` when the schedule
      interpolates per step (``per_step=True``, the default of the ramps
      :class:`Linear`, :class:`Cosine` and :class:`Geometric`) and
      ``steps_per_epoch`` is known;
    * ``t = epoch`` otherwise (``per_step=False``, :class:`Piecewise`, or
      ``steps_per_epoch`` is ``None``, ``0`` or infinite).

    The fraction ``step_in_epoch / steps_per_epoch`` is clamped to ``[0, 1)``,
    so a ``step_in_epoch`` that overshoots an estimated ``steps_per_epoch``
    never moves the position into the next epoch.

Composition:
    :class:`WarmUp` and :class:`Sequential` switch between schedules at whole
    epochs, and evaluate the active schedule at the *absolute* position
    (not relative to the switch epoch).

All classes are plain classes with type-hinted constructor arguments, so they
can be given in LightningCLI YAML with ``class_path``/``init_args``:

.. code-block:: yaml

    strength:
      class_path: lightning_ghostnoise.schedules.WarmUp
      init_args:
        epochs: 2
        schedule:
          class_path: lightning_ghostnoise.schedules.Cosine
          init_args: {start_value: 0.0, end_value: 1.0, start: 2, end: 10}

Example:
    >>> s = Linear(0.0, 1.0, start=2, end=4)
    >>> [s(epoch) for epoch in range(6)]
    [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    >>> s(2, step_in_epoch=5, steps_per_epoch=10)
    0.25
    >>> to_ghost_batch_size(Geometric(8, 32, end=2)(1))
    16
"""

import math
import numbers
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

__all__ = [
    "Schedule",
    "Constant",
    "Piecewise",
    "Linear",
    "Cosine",
    "Geometric",
    "WarmUp",
    "Sequential",
    "as_schedule",
    "to_ghost_batch_size",
]

ScheduleKind = Literal["ghost_batch_size", "strength"]
_KINDS = ("ghost_batch_size", "strength")
_UNITS = ("epoch", "fraction")


# --------------------------------------------------------------------------- #
# Argument checking helpers
# --------------------------------------------------------------------------- #
def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(owner: str, name: str, value: Any) -> float:
    """Return ``value`` as a finite float or raise a helpful error."""
    if not _is_real(value):
        raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: `{name}` must be a finite number, got {value!r}.")
    return value


def _epoch_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` as a non-negative int epoch (integral floats and digit strings accepted)."""
    original = value
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise TypeError(
                f"{owner}: `{name}` must be a whole epoch number, got the string {original!r}."
            ) from None
    if not _is_real(value):
        raise TypeError(f"{owner}: `{name}` must be a whole epoch number, got {type(original).__name__} {original!r}.")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{owner}: `{name}` must be a whole epoch number, got {original!r}.")
    value = int(value)
    if value < 0:
        raise ValueError(f"{owner}: `{name}` must be >= 0 (epochs count from 0), got {original!r}.")
    return value


def _check_kind(kind: Any) -> None:
    if kind not in _KINDS:
        raise ValueError(f"Unknown schedule kind {kind!r}; expected one of {list(_KINDS)}.")


def _check_value_for(kind: str, value: float, where: str) -> None:
    if kind == "ghost_batch_size" and value < 1:
        raise ValueError(
            f"{where} can produce ghost_batch_size={value!r}, but a ghost batch needs at least 1 sample. "
            "Use values >= 1 (xbn and analytic GNI need >= 2). Smaller values give more noise; larger ones less: "
            "gni, analytic and xbn still add some noise at any size, even above the batch size, while gbn with a "
            "ghost batch size >= the batch size is plain BatchNorm."
        )
    if kind == "strength" and value < 0:
        raise ValueError(
            f"{where} can produce strength={value!r}, but the strength must be >= 0 (0 disables ghost noise)."
        )


# --------------------------------------------------------------------------- #
# Base class
# --------------------------------------------------------------------------- #
class Schedule:
    """Abstract base of all schedules: a pure function of the training position.

    Subclasses implement :meth:`value_at` (value at position ``t`` in epochs)
    and :meth:`_init_args` (the constructor arguments, used for ``repr``,
    equality and hashing). They set ``per_step`` to say whether the position
    includes the fraction of the current epoch.

    Example:
        >>> s = Constant(0.5)
        >>> s(epoch=3, step_in_epoch=7, steps_per_epoch=10, max_epochs=20)
        0.5
        >>> s.values(3)
        [0.5, 0.5, 0.5]
    """

    #: Whether the position includes ``step_in_epoch / steps_per_epoch``.
    per_step: bool = False

    # ------------------------------------------------------------------ API
    def __call__(
        self,
        epoch: int,
        step_in_epoch: int = 0,
        steps_per_epoch: Optional[int] = None,
        max_epochs: Optional[int] = None,
    ) -> float:
        """Value at ``epoch`` (0-based) and ``step_in_epoch`` (0-based batch index in that epoch).

        Args:
            epoch: Current epoch, ``>= 0``.
            step_in_epoch: Index of the current step within the epoch, ``>= 0``.
            steps_per_epoch: Number of steps in an epoch; ``None``, ``0`` or infinite
                means unknown (the position is then the whole epoch).
            max_epochs: Total number of epochs; needed only by ``unit="fraction"``
                ramps. ``None`` or a value ``<= 0`` (e.g. Lightning's ``-1``) means unknown.

        Returns:
            The scheduled value as a float.
        """
        return float(self._evaluate(self._position(epoch, step_in_epoch, steps_per_epoch), max_epochs))

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        """Value at position ``t`` (in epochs, possibly fractional). Implemented by subclasses."""
        raise NotImplementedError

    def values(
        self,
        epochs: int,
        steps_per_epoch: Optional[int] = None,
        max_epochs: Optional[int] = None,
    ) -> List[float]:
        """Values over a whole run, for documentation and plots.

        Args:
            epochs: Number of epochs to evaluate.
            steps_per_epoch: If given, one value per step (``epochs * steps_per_epoch``
                values); otherwise one value per epoch.
            max_epochs: Total epochs for ``unit="fraction"`` schedules; defaults to ``epochs``.

        Example:
            >>> Linear(0, 1, start=0, end=1).values(2, steps_per_epoch=4)
            [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
        """
        max_epochs = epochs if max_epochs is None else max_epochs
        if steps_per_epoch:
            return [self(e, s, steps_per_epoch, max_epochs) for e in range(epochs) for s in range(steps_per_epoch)]
        return [self(e, max_epochs=max_epochs) for e in range(epochs)]

    def validate_for(self, kind: ScheduleKind) -> "Schedule":
        """Check that every value this schedule can produce is valid for ``kind``.

        ``"ghost_batch_size"`` requires values ``>= 1`` and ``"strength"`` values ``>= 0``.
        The check is conservative: ramps are checked at both end values (their
        extremes); piecewise schedules at every value they can take; compositions
        at every value of every part that can become active.

        Args:
            kind: ``"ghost_batch_size"`` or ``"strength"``.

        Returns:
            ``self``, so that calls can be chained.

        Raises:
            ValueError: if some value is out of range, or ``kind`` is unknown.

        Example:
            >>> Linear(0.0, 1.0).validate_for("strength")
            Linear(start_value=0.0, end_value=1.0, start=0.0, end=1.0, per_step=True, unit='epoch')
        """
        _check_kind(kind)
        for value in self._extreme_values():
            _check_value_for(kind, value, repr(self))
        return self

    def value_range(self) -> "tuple[float, float]":
        """The smallest and largest value this schedule can produce, over any run length.

        Exact for every schedule here: ramps are monotone between their end values, piecewise
        schedules take only their listed values, and compositions the values of their parts
        (:class:`WarmUp`'s ``off_value`` included when it has warm-up epochs). It needs no
        ``max_epochs``, so ``unit="fraction"`` schedules can be checked before training starts.

        Example:
            >>> WarmUp(2, Linear(8, 32), off_value=64).value_range()
            (8.0, 64.0)
        """
        values = list(self._extreme_values())
        return min(values), max(values)

    @property
    def uses_fraction(self) -> bool:
        """Whether some part of the schedule has ``unit="fraction"`` (it then needs the run's length).

        Example:
            >>> WarmUp(1, Linear(0.0, 1.0, end=0.5, unit="fraction")).uses_fraction
            True
        """
        return False

    # ------------------------------------------------------------- internals
    def _extreme_values(self) -> Iterable[float]:
        """All values needed to bound what the schedule can produce."""
        raise NotImplementedError

    def _init_args(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _evaluate(self, t: float, max_epochs: Optional[int]) -> float:
        """Evaluate at full position ``t``, dropping the in-epoch fraction unless ``per_step``."""
        return self.value_at(t if self.per_step else float(math.floor(t)), max_epochs)

    @staticmethod
    def _position(epoch: int, step_in_epoch: int, steps_per_epoch: Optional[int]) -> float:
        if not _is_real(epoch) or epoch < 0 or not math.isfinite(epoch):
            raise ValueError(f"epoch must be a number >= 0, got {epoch!r}.")
        if not _is_real(step_in_epoch) or step_in_epoch < 0:
            raise ValueError(f"step_in_epoch must be a number >= 0, got {step_in_epoch!r}.")
        base = float(math.floor(epoch))
        if steps_per_epoch is None or steps_per_epoch == 0 or not math.isfinite(steps_per_epoch):
            return base
        if steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0 or None, got {steps_per_epoch!r}.")
        t = base + min(step_in_epoch / steps_per_epoch, 1.0)
        if t >= base + 1.0:  # overshooting steps stay inside the current epoch
            t = math.nextafter(base + 1.0, -math.inf)
        return t

    # ---------------------------------------------------------- dunder utils
    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._init_args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return self._init_args() == other._init_args()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


# --------------------------------------------------------------------------- #
# Leaf schedules
# --------------------------------------------------------------------------- #
class Constant(Schedule):
    """The same value at every position.

    Args:
        value: The value (finite).

    Example:
        >>> Constant(16)(epoch=5)
        16.0
    """

    def __init__(self, value: float) -> None:
        self.value = _finite("Constant", "value", value)

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        return self.value

    def _extreme_values(self) -> Iterable[float]:
        return (self.value,)

    def _init_args(self) -> Dict[str, Any]:
        return {"value": self.value}


class Piecewise(Schedule):
    """Piecewise-constant per epoch, like Lightning's ``GradientAccumulationScheduler``.

    At epoch ``e`` the value is that of the largest milestone epoch ``<= e``;
    before the first milestone it is ``initial``. Values change only at epoch
    boundaries (never within an epoch). Milestones may be given in any order;
    keys given as strings (e.g. from YAML/JSON) are converted to ``int``.

    Args:
        milestones: ``{epoch: value}`` with whole epochs ``>= 0`` and finite values.
        initial: Value before the first milestone. Required if the first milestone
            is after epoch 0, and not allowed if there is a milestone at epoch 0
            (it would never be used).

    Example:
        >>> s = Piecewise({2: 0.5, 5: 1.0}, initial=0.0)
        >>> [s(e) for e in range(7)]
        [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]

    In YAML::

        class_path: lightning_ghostnoise.schedules.Piecewise
        init_args:
          milestones: {0: 64, 3: 32, 6: 16}
    """

    per_step = False

    def __init__(self, milestones: Dict[int, float], initial: Optional[float] = None) -> None:
        if not isinstance(milestones, dict) or not milestones:
            raise ValueError(
                f"Piecewise: `milestones` must be a non-empty dict {{epoch: value}}, e.g. {{0: 1.0, 5: 0.5}}; "
                f"got {milestones!r}."
            )
        converted: Dict[int, float] = {}
        for key, value in milestones.items():
            epoch = _epoch_int("Piecewise", f"milestone epoch {key!r}", key)
            if epoch in converted:
                raise ValueError(
                    f"Piecewise: milestone epoch {epoch} appears more than once in {milestones!r} "
                    "(after converting keys to int); give each epoch once."
                )
            converted[epoch] = _finite("Piecewise", f"milestones[{epoch}]", value)
        self.milestones: Dict[int, float] = dict(sorted(converted.items()))
        self._epochs = list(self.milestones)
        first = self._epochs[0]
        if initial is None and first > 0:
            raise ValueError(
                f"Piecewise: the first milestone is at epoch {first}, so the value for epochs 0..{first - 1} "
                f"is undefined. Pass `initial=<value>` or add a milestone at epoch 0."
            )
        if initial is not None and first == 0:
            raise ValueError(
                "Piecewise: `initial` is never used because `milestones` has an entry for epoch 0; "
                "remove `initial` or the epoch-0 milestone."
            )
        self.initial: Optional[float] = None if initial is None else _finite("Piecewise", "initial", initial)

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        value = self.initial
        for epoch in self._epochs:
            if epoch <= t:
                value = self.milestones[epoch]
            else:
                break
        assert value is not None
        return value

    def _extreme_values(self) -> Iterable[float]:
        values = list(self.milestones.values())
        if self.initial is not None:
            values.insert(0, self.initial)
        return values

    def _init_args(self) -> Dict[str, Any]:
        return {"milestones": dict(self.milestones), "initial": self.initial}


class _Ramp(Schedule):
    """Shared implementation of :class:`Linear`, :class:`Cosine` and :class:`Geometric`."""

    def __init__(
        self,
        start_value: float,
        end_value: float,
        start: float = 0.0,
        end: float = 1.0,
        per_step: bool = True,
        unit: Literal["epoch", "fraction"] = "epoch",
    ) -> None:
        name = type(self).__name__
        self.start_value = _finite(name, "start_value", start_value)
        self.end_value = _finite(name, "end_value", end_value)
        if unit not in _UNITS:
            raise ValueError(f"{name}: `unit` must be 'epoch' or 'fraction', got {unit!r}.")
        self.unit: str = unit
        self.start = _finite(name, "start", start)
        self.end = _finite(name, "end", end)
        if unit == "epoch":
            for arg in ("start", "end"):
                if getattr(self, arg) < 0:
                    raise ValueError(f"{name}: `{arg}` must be >= 0 epochs, got {getattr(self, arg)!r}.")
        else:
            for arg in ("start", "end"):
                if not 0.0 <= getattr(self, arg) <= 1.0:
                    raise ValueError(
                        f"{name}: with unit='fraction', `{arg}` is a fraction of max_epochs and must be in "
                        f"[0, 1], got {getattr(self, arg)!r}. Use unit='epoch' to give it in epochs."
                    )
        if self.end < self.start:
            raise ValueError(
                f"{name}: `end` ({self.end!r}) must be >= `start` ({self.start!r}). To decrease the value, "
                f"swap start_value/end_value instead. end == start gives a step change at `start`."
            )
        if not isinstance(per_step, bool):
            raise TypeError(f"{name}: `per_step` must be True or False, got {per_step!r}.")
        self.per_step = per_step

    @property
    def uses_fraction(self) -> bool:
        return self.unit == "fraction"

    def _bounds(self, max_epochs: Optional[int]) -> "tuple[float, float]":
        if self.unit == "epoch":
            return self.start, self.end
        if max_epochs is None or not _is_real(max_epochs) or not math.isfinite(max_epochs) or max_epochs <= 0:
            raise ValueError(
                f"{self!r} uses unit='fraction' and needs the total number of epochs, but max_epochs={max_epochs!r}. "
                "Set a positive Trainer(max_epochs=...) (or Trainer(max_steps=...) with the GhostNoise callback), "
                "or use unit='epoch' with start/end given in epochs."
            )
        return self.start * max_epochs, self.end * max_epochs

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        start, end = self._bounds(max_epochs)
        if t >= end:  # also the step change when end == start
            return self.end_value
        if t <= start:
            return self.start_value
        return self._interpolate((t - start) / (end - start))

    def _interpolate(self, progress: float) -> float:
        raise NotImplementedError

    def _extreme_values(self) -> Iterable[float]:
        return (self.start_value, self.end_value)

    def _init_args(self) -> Dict[str, Any]:
        return {
            "start_value": self.start_value,
            "end_value": self.end_value,
            "start": self.start,
            "end": self.end,
            "per_step": self.per_step,
            "unit": self.unit,
        }


_RAMP_ARGS_DOC = """
    Args:
        start_value: Value at and before ``start``.
        end_value: Value at and after ``end``.
        start: Where the ramp begins, in epochs (``unit="epoch"``, ``>= 0``) or as a
            fraction of ``max_epochs`` (``unit="fraction"``, in ``[0, 1]``).
        end: Where the ramp ends (same unit as ``start``); must be ``>= start``.
            ``end == start`` gives a step change: ``start_value`` before ``start``,
            ``end_value`` from ``start`` on.
        per_step: If True (default) the position includes the fraction of the current
            epoch (``step_in_epoch / steps_per_epoch``) when ``steps_per_epoch`` is known,
            so the value changes smoothly within epochs. If False the value changes only
            at epoch boundaries.
        unit: ``"epoch"`` (default) or ``"fraction"``. With ``"fraction"``, ``max_epochs``
            must be passed when the schedule is called, else a ``ValueError`` is raised.
            The ``GhostNoise`` callback passes the run's length in epochs: the Trainer's
            ``max_epochs``, or ``max_steps`` converted to epochs when that ends training
            first (or ``max_epochs=-1``); it refuses a run with neither.
"""


class Linear(_Ramp):
    """Linear ramp from ``start_value`` to ``end_value``; constant outside ``[start, end]``.
    {args}
    Example:
        >>> s = Linear(0.0, 1.0, start=2, end=4)
        >>> [s(e) for e in range(6)]
        [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
        >>> s(2, step_in_epoch=5, steps_per_epoch=10)
        0.25
        >>> Linear(0.0, 1.0, start=0, end=0.5, unit="fraction")(5, max_epochs=20)
        0.5
    """

    def _interpolate(self, progress: float) -> float:
        return self.start_value + (self.end_value - self.start_value) * progress


class Cosine(_Ramp):
    """Half-cosine ramp from ``start_value`` to ``end_value``; constant outside ``[start, end]``.

    The value is ``end_value + (start_value - end_value) * (1 + cos(pi * p)) / 2``
    with ``p`` the progress through the ramp in ``[0, 1]``: flat at both ends,
    steepest in the middle, monotone between the end values.
    {args}
    Example:
        >>> s = Cosine(0.0, 1.0, start=0, end=4)
        >>> [round(s(e), 4) for e in range(5)]
        [0.0, 0.1464, 0.5, 0.8536, 1.0]
    """

    def _interpolate(self, progress: float) -> float:
        return self.end_value + (self.start_value - self.end_value) * (1.0 + math.cos(math.pi * progress)) / 2.0


class Geometric(_Ramp):
    """Geometric (log-space) ramp from ``start_value`` to ``end_value``; both must be ``> 0``.

    The value is ``start_value * (end_value / start_value) ** p`` with ``p`` the
    progress through the ramp in ``[0, 1]``. This suits ``ghost_batch_size``:
    ghost noise scales roughly like ``1 / sqrt(N)``, so doubling ``N`` at a steady
    rate changes the noise at a steady rate. Round with :func:`to_ghost_batch_size`.
    {args}
    Example:
        >>> s = Geometric(8, 64, start=0, end=3)
        >>> [round(s(e), 6) for e in range(5)]
        [8.0, 16.0, 32.0, 64.0, 64.0]
    """

    def __init__(
        self,
        start_value: float,
        end_value: float,
        start: float = 0.0,
        end: float = 1.0,
        per_step: bool = True,
        unit: Literal["epoch", "fraction"] = "epoch",
    ) -> None:
        super().__init__(start_value, end_value, start=start, end=end, per_step=per_step, unit=unit)
        for arg in ("start_value", "end_value"):
            if getattr(self, arg) <= 0:
                raise ValueError(
                    f"Geometric: `{arg}` must be > 0 (interpolation is in log space), got {getattr(self, arg)!r}. "
                    "Use Linear or Cosine for ramps that reach 0."
                )

    def _interpolate(self, progress: float) -> float:
        return self.start_value * (self.end_value / self.start_value) ** progress


for _cls in (Linear, Cosine, Geometric):
    _cls.__doc__ = _cls.__doc__.replace("{args}", _RAMP_ARGS_DOC)  # type: ignore[union-attr]
del _cls


# --------------------------------------------------------------------------- #
# Composition
# --------------------------------------------------------------------------- #
class WarmUp(Schedule):
    """``off_value`` for the first ``epochs`` epochs, then the wrapped schedule.

    The wrapped schedule is evaluated at the **absolute** position (epoch 0 is
    the first epoch of training, not the first epoch after the warm-up), so
    ``WarmUp(2, Linear(0, 1, start=2, end=4))`` starts its ramp right at the
    end of the warm-up. The switch happens at an epoch boundary.

    Args:
        epochs: Number of warm-up epochs (whole, ``>= 0``).
        schedule: Schedule (or number) used from epoch ``epochs`` on.
        off_value: Value during the warm-up. The default ``0.0`` suits ``strength``
            (no noise); a ``ghost_batch_size`` needs a value ``>= 1`` (``>= 2`` for xbn
            and analytic GNI). A large ghost batch size means little noise, but only
            gbn becomes exactly plain BatchNorm (at sizes ``>=`` the batch size); for
            no noise at all during a warm-up, schedule ``strength`` instead.

    Example:
        >>> s = WarmUp(2, Cosine(0.0, 1.0, start=2, end=4))
        >>> [round(s(e), 4) for e in range(6)]
        [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    """

    per_step = True  # pass the full position through; the wrapped schedule decides

    def __init__(self, epochs: int, schedule: Union[Schedule, float] = 1.0, off_value: float = 0.0) -> None:
        self.epochs = _epoch_int("WarmUp", "epochs", epochs)
        try:
            self.schedule = as_schedule(schedule)
        except TypeError as err:
            raise TypeError(f"WarmUp: `schedule` is invalid: {err}") from None
        self.off_value = _finite("WarmUp", "off_value", off_value)

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        if math.floor(t) < self.epochs:
            return self.off_value
        return self.schedule._evaluate(t, max_epochs)

    @property
    def uses_fraction(self) -> bool:
        return self.schedule.uses_fraction

    def validate_for(self, kind: ScheduleKind) -> "Schedule":
        _check_kind(kind)
        if self.epochs > 0:
            _check_value_for(kind, self.off_value, f"{self!r} (off_value during the warm-up)")
        self.schedule.validate_for(kind)
        return self

    def _extreme_values(self) -> Iterable[float]:
        values = list(self.schedule._extreme_values())
        if self.epochs > 0:
            values.insert(0, self.off_value)
        return values

    def _init_args(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "schedule": self.schedule, "off_value": self.off_value}


class Sequential(Schedule):
    """Run ``schedules[0]`` until ``milestones[0]``, then ``schedules[1]``, and so on.

    ``schedules[i]`` is active for epochs ``milestones[i-1] <= epoch < milestones[i]``
    (``schedules[0]`` from epoch 0, the last one until the end). Switches happen
    at epoch boundaries. Each schedule is evaluated at the **absolute** position
    (not relative to the milestone where it becomes active), so write its
    ``start``/``end`` in absolute epochs.

    Args:
        schedules: The schedules (numbers are turned into :class:`Constant`).
        milestones: Epochs at which to switch to the next schedule;
            ``len(milestones) == len(schedules) - 1``, strictly increasing, ``> 0``.

    Example:
        >>> s = Sequential([Constant(0.0), Linear(0.0, 1.0, start=2, end=4), Constant(0.5)], milestones=[2, 5])
        >>> [s(e) for e in range(7)]
        [0.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.5]
    """

    per_step = True  # pass the full position through; the active schedule decides

    def __init__(self, schedules: List[Union[Schedule, float]], milestones: List[int]) -> None:
        if not isinstance(schedules, (list, tuple)) or not schedules:
            raise ValueError(f"Sequential: `schedules` must be a non-empty list of schedules, got {schedules!r}.")
        converted = []
        for i, schedule in enumerate(schedules):
            try:
                converted.append(as_schedule(schedule))
            except TypeError as err:
                raise TypeError(f"Sequential: schedules[{i}] is invalid: {err}") from None
        self.schedules: List[Schedule] = converted
        if not isinstance(milestones, (list, tuple)):
            raise TypeError(f"Sequential: `milestones` must be a list of epochs, got {milestones!r}.")
        if len(milestones) != len(converted) - 1:
            raise ValueError(
                f"Sequential: got {len(converted)} schedules, so `milestones` needs {len(converted) - 1} "
                f"switch epochs (one fewer than schedules), but got {len(milestones)}: {list(milestones)!r}."
            )
        self.milestones: List[int] = [_epoch_int("Sequential", f"milestones[{i}]", m) for i, m in enumerate(milestones)]
        if self.milestones and self.milestones[0] <= 0:
            raise ValueError(
                f"Sequential: milestones must be > 0 (schedules[0] starts at epoch 0), got {self.milestones!r}."
            )
        for previous, current in zip(self.milestones, self.milestones[1:]):
            if current <= previous:
                raise ValueError(
                    f"Sequential: milestones must be strictly increasing (no repeats), got {self.milestones!r}."
                )

    def _active(self, t: float) -> Schedule:
        epoch = math.floor(t)
        index = 0
        for milestone in self.milestones:
            if epoch >= milestone:
                index += 1
            else:
                break
        return self.schedules[index]

    def value_at(self, t: float, max_epochs: Optional[int]) -> float:
        return self._active(t)._evaluate(t, max_epochs)

    @property
    def uses_fraction(self) -> bool:
        return any(schedule.uses_fraction for schedule in self.schedules)

    def validate_for(self, kind: ScheduleKind) -> "Schedule":
        _check_kind(kind)
        for schedule in self.schedules:
            schedule.validate_for(kind)
        return self

    def _extreme_values(self) -> Iterable[float]:
        return [v for schedule in self.schedules for v in schedule._extreme_values()]

    def _init_args(self) -> Dict[str, Any]:
        return {"schedules": list(self.schedules), "milestones": list(self.milestones)}


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def as_schedule(value: Union[float, int, Schedule]) -> Schedule:
    """Return ``value`` as a :class:`Schedule`: numbers become :class:`Constant`.

    Args:
        value: A number or a :class:`Schedule` (returned unchanged).

    Raises:
        TypeError: for anything else (including ``bool`` and strings).

    Example:
        >>> as_schedule(0.5)
        Constant(value=0.5)
    """
    if isinstance(value, Schedule):
        return value
    if _is_real(value):
        return Constant(value)
    hint = " (a string; convert it with float(...) first)" if isinstance(value, str) else ""
    raise TypeError(
        f"Expected a number or a Schedule (e.g. Linear(0.0, 1.0, start=0, end=5)), "
        f"got {type(value).__name__} {value!r}{hint}."
    )


def to_ghost_batch_size(value: float) -> int:
    """Round a scheduled ghost batch size to a whole number of samples.

    Rule: round half up to the nearest integer (``floor(value + 0.5)``), and at
    least 1. So ``2.5 -> 3``, ``2.49 -> 2``, ``0.2 -> 1``.

    Raises:
        ValueError: if ``value`` is not finite.

    Example:
        >>> to_ghost_batch_size(2.5), to_ghost_batch_size(0.2)
        (3, 1)
    """
    value = _finite("to_ghost_batch_size", "value", value)
    return max(1, int(math.floor(value + 0.5)))
