"""Schedules built from schedules: :class:`WarmUp` and :class:`Sequential` switch between them at whole epochs.

The active schedule is evaluated at the *absolute* position (not relative to the switch epoch).

Example:
    >>> from lightning_ghostnoise.schedules import Constant, Sequential
    >>> Sequential([Constant(0.0), Constant(1.0)], milestones=[2])(3)
    1.0
"""

import math
from typing import Any, Dict, Iterable, List, Optional, Union

from lightning_ghostnoise.schedules.base import (
    Schedule,
    ScheduleKind,
    _check_kind,
    _check_value_for,
    _epoch_int,
    _finite,
    as_schedule,
)

__all__ = ["Sequential", "WarmUp"]


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

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
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

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
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
