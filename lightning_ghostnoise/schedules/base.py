"""The :class:`Schedule` base class, :class:`Constant`, and the helpers every schedule uses.

A schedule maps a training position ``(epoch, step_in_epoch)`` to a number; see
:mod:`lightning_ghostnoise.schedules` for how the position is computed.

Example:
    >>> from lightning_ghostnoise.schedules import Constant, as_schedule, to_ghost_batch_size
    >>> as_schedule(0.5) == Constant(0.5)
    True
    >>> to_ghost_batch_size(2.5)
    3
"""

import math
import numbers
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

__all__ = ["Constant", "Schedule", "ScheduleKind", "as_schedule", "to_ghost_batch_size"]

#: What a schedule produces: checked by :meth:`Schedule.validate_for`.
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
            raise TypeError(f"{owner}: `{name}` must be a whole epoch number, got the string {original!r}.") from None
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
        max_epochs: Optional[float] = None,
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

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
        """Value at position ``t`` (in epochs, possibly fractional). Implemented by subclasses."""
        raise NotImplementedError

    def values(
        self,
        epochs: int,
        steps_per_epoch: Optional[int] = None,
        max_epochs: Optional[float] = None,
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

    def _evaluate(self, t: float, max_epochs: Optional[float]) -> float:
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
        assert isinstance(other, Schedule)  # same type as self
        return self._init_args() == other._init_args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


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

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
        return self.value

    def _extreme_values(self) -> Iterable[float]:
        return (self.value,)

    def _init_args(self) -> Dict[str, Any]:
        return {"value": self.value}


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
