"""Ramps between two values: :class:`Linear`, :class:`Cosine` and :class:`Geometric`.

Each is constant outside ``[start, end]`` (in epochs, or as a fraction of the run with
``unit="fraction"``) and monotone between its end values.

Example:
    >>> from lightning_ghostnoise.schedules import Linear
    >>> Linear(0.0, 1.0, start=0, end=2)(1)
    0.5
"""

import math
from typing import Any, Dict, Iterable, Literal, Optional

from lightning_ghostnoise.schedules.base import _UNITS, Schedule, _finite, _is_real

__all__ = ["Cosine", "Geometric", "Linear"]


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

    def _bounds(self, max_epochs: Optional[float]) -> "tuple[float, float]":
        if self.unit == "epoch":
            return self.start, self.end
        if max_epochs is None or not _is_real(max_epochs) or not math.isfinite(max_epochs) or max_epochs <= 0:
            raise ValueError(
                f"{self!r} uses unit='fraction' and needs the total number of epochs, but max_epochs={max_epochs!r}. "
                "Set a positive Trainer(max_epochs=...) (or Trainer(max_steps=...) with the GhostNoise callback), "
                "or use unit='epoch' with start/end given in epochs."
            )
        return self.start * max_epochs, self.end * max_epochs

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
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
    _cls.__doc__ = (_cls.__doc__ or "").replace("{args}", _RAMP_ARGS_DOC)
del _cls
