"""Piecewise-constant schedules: :class:`Piecewise`, values that change at milestone epochs.

Example:
    >>> from lightning_ghostnoise.schedules import Piecewise
    >>> Piecewise({0: 64, 3: 32})(4)
    32.0
"""

from typing import Any, Dict, Iterable, Optional

from lightning_ghostnoise.schedules.base import Schedule, _epoch_int, _finite

__all__ = ["Piecewise"]


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

    def value_at(self, t: float, max_epochs: Optional[float]) -> float:
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
