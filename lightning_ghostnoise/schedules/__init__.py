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

Modules: :mod:`~lightning_ghostnoise.schedules.base` (:class:`Schedule`, :class:`Constant`,
:func:`as_schedule`, :func:`to_ghost_batch_size`), :mod:`~lightning_ghostnoise.schedules.piecewise`,
:mod:`~lightning_ghostnoise.schedules.ramps` and :mod:`~lightning_ghostnoise.schedules.composite`.
Every class is importable from ``lightning_ghostnoise.schedules``, the path configs use.

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

from lightning_ghostnoise.schedules.base import Constant, Schedule, as_schedule, to_ghost_batch_size
from lightning_ghostnoise.schedules.base import ScheduleKind as ScheduleKind  # a type for annotations
from lightning_ghostnoise.schedules.composite import Sequential, WarmUp
from lightning_ghostnoise.schedules.piecewise import Piecewise
from lightning_ghostnoise.schedules.ramps import Cosine, Geometric, Linear

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
