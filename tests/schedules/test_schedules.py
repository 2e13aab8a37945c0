"""Tests for lightning_ghostnoise.schedules (pure functions of training position)."""

import copy
import doctest
import math
import pickle
from typing import Union

import pytest

import lightning_ghostnoise.schedules as schedules_module
from lightning_ghostnoise.schedules import (
    Constant,
    Cosine,
    Geometric,
    Linear,
    Piecewise,
    Schedule,
    Sequential,
    WarmUp,
    as_schedule,
    base,
    composite,
    piecewise,
    ramps,
    to_ghost_batch_size,
)

C1 = (1 - math.cos(math.pi / 4)) / 2  # 0.1464..., cosine ramp 0->1 at progress 1/4
C3 = (1 + math.cos(math.pi / 4)) / 2  # 0.8535..., cosine ramp 0->1 at progress 3/4


def per_epoch(schedule, epochs, max_epochs=None):
    return [schedule(e, max_epochs=max_epochs) for e in range(epochs)]


# --------------------------------------------------------------------------- #
# Values
# --------------------------------------------------------------------------- #
def test_constant():
    s = Constant(0.5)
    assert per_epoch(s, 3) == [0.5, 0.5, 0.5]
    assert s(7, 3, 10, 20) == 0.5
    assert isinstance(Constant(2)(0), float)


def test_linear_per_epoch():
    s = Linear(0.0, 1.0, start=2, end=4)
    assert per_epoch(s, 7) == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]


def test_linear_per_step():
    s = Linear(0.0, 1.0, start=2, end=4)
    assert s(2, step_in_epoch=5, steps_per_epoch=10) == pytest.approx(0.25)
    assert s(3, step_in_epoch=5, steps_per_epoch=10) == pytest.approx(0.75)
    assert s(1, step_in_epoch=9, steps_per_epoch=10) == 0.0
    # steps_per_epoch unknown (None, 0, inf) -> whole epoch
    assert s(2, step_in_epoch=5) == 0.0
    assert s(2, step_in_epoch=5, steps_per_epoch=0) == 0.0
    assert s(2, step_in_epoch=5, steps_per_epoch=float("inf")) == 0.0


def test_linear_per_step_false_uses_whole_epoch():
    s = Linear(0.0, 1.0, start=2, end=4, per_step=False)
    assert s(2, 5, 10) == 0.0
    assert s(3, 5, 10) == 0.5
    assert s(3, 9, 10) == 0.5


def test_step_overshoot_stays_in_epoch():
    s = Linear(0.0, 1.0, start=0, end=1)
    value = s(0, step_in_epoch=15, steps_per_epoch=10)
    assert value < 1.0
    assert value == pytest.approx(1.0)
    # And per_step=False schedules never jump to the next epoch because of overshoot.
    assert Piecewise({0: 1.0, 1: 2.0})(0, 15, 10) == 1.0


def test_linear_decreasing():
    s = Linear(1.0, 0.0, start=0, end=4)
    assert per_epoch(s, 6) == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_linear_step_change_when_end_equals_start():
    s = Linear(0.0, 1.0, start=2, end=2)
    assert per_epoch(s, 4) == [0.0, 0.0, 1.0, 1.0]
    assert s(1, 9, 10) == 0.0
    assert s(2, 0, 10) == 1.0


def test_linear_fraction_unit():
    s = Linear(0.0, 1.0, start=0.25, end=0.75, unit="fraction")
    # max_epochs=8 -> ramp over epochs 2..6
    assert per_epoch(s, 9, max_epochs=8) == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert s(3, 5, 10, max_epochs=8) == pytest.approx(0.375)


@pytest.mark.parametrize("max_epochs", [None, -1, 0])
def test_fraction_unit_needs_max_epochs(max_epochs):
    s = Linear(0.0, 1.0, start=0.0, end=0.5, unit="fraction")
    with pytest.raises(ValueError, match=r"unit='fraction'.*max_epochs.*Trainer\(max_epochs=\.\.\.\)"):
        s(1, max_epochs=max_epochs)


def test_cosine():
    s = Cosine(0.0, 1.0, start=0, end=4)
    assert per_epoch(s, 6) == pytest.approx([0.0, C1, 0.5, C3, 1.0, 1.0])
    assert Cosine(0.0, 1.0, start=0, end=1)(0, 5, 10) == pytest.approx(0.5)
    d = Cosine(10.0, 2.0, start=1, end=3)
    assert per_epoch(d, 5) == pytest.approx([10.0, 10.0, 6.0, 2.0, 2.0])


def test_cosine_fraction_unit():
    s = Cosine(0.0, 1.0, start=0.0, end=1.0, unit="fraction")
    assert per_epoch(s, 5, max_epochs=4) == pytest.approx([0.0, C1, 0.5, C3, 1.0])


def test_geometric():
    s = Geometric(8, 64, start=0, end=3)
    assert per_epoch(s, 5) == pytest.approx([8.0, 16.0, 32.0, 64.0, 64.0])
    assert s(0) == 8.0 and s(3) == 64.0  # end values are exact
    down = Geometric(64, 16, start=0, end=2)
    assert per_epoch(down, 3) == pytest.approx([64.0, 32.0, 16.0])
    # step 5 of 10 in epoch 0 of a 2-epoch ramp 16 -> 64: 16 * 4 ** 0.25 = 16 * sqrt(2)
    up = Geometric(16, 64, start=0, end=2)
    assert up(0, 5, 10) == pytest.approx(16 * math.sqrt(2))
    assert to_ghost_batch_size(up(0, 5, 10)) == 23
    assert Geometric(16, 64, start=0, end=2, per_step=False)(0, 5, 10) == 16.0


def test_piecewise():
    s = Piecewise({2: 0.5, 5: 1.0}, initial=0.0)
    assert per_epoch(s, 7) == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    # Always per epoch.
    assert s(1, 9, 10) == 0.0
    assert s(4, 9, 10) == 0.5


def test_piecewise_starting_at_zero_and_key_normalisation():
    s = Piecewise({"0": 64, "3": 32, 6: 16})
    assert per_epoch(s, 8) == [64.0, 64.0, 64.0, 32.0, 32.0, 32.0, 16.0, 16.0]
    assert s == Piecewise({0: 64.0, 3: 32.0, 6: 16.0})
    # Order of the dict does not matter; it is sorted.
    assert Piecewise({6: 16, 0: 64, 3: 32}) == s
    assert list(Piecewise({6: 16, 0: 64, 3: 32}).milestones) == [0, 3, 6]
    assert Piecewise({2.0: 1.0}, initial=0.0).milestones == {2: 1.0}


def test_warmup_cosine():
    s = WarmUp(2, Cosine(0.0, 1.0, start=2, end=4))
    assert per_epoch(s, 6) == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    assert s(1, 9, 10) == 0.0
    # epoch 2, step 5/10 -> t = 2.5 -> progress 0.25
    assert s(2, 5, 10) == pytest.approx(C1)


def test_warmup_uses_absolute_position():
    s = WarmUp(3, Linear(0.0, 1.0, start=0, end=4))
    assert per_epoch(s, 5) == [0.0, 0.0, 0.0, 0.75, 1.0]


def test_warmup_defaults_and_numbers():
    assert per_epoch(WarmUp(2), 4) == [0.0, 0.0, 1.0, 1.0]
    assert per_epoch(WarmUp(0, 0.5), 2) == [0.5, 0.5]
    assert per_epoch(WarmUp(1, 16, off_value=1024), 3) == [1024.0, 16.0, 16.0]
    assert WarmUp(2, 1.0) == WarmUp(2, Constant(1.0))


def test_sequential():
    s = Sequential([Constant(0.0), Linear(0.0, 1.0, start=2, end=4), Constant(0.5)], milestones=[2, 5])
    assert per_epoch(s, 7) == [0.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.5]
    assert s(1, 9, 10) == 0.0
    assert s(2, 5, 10) == pytest.approx(0.25)


def test_sequential_respects_children_per_step_and_numbers():
    s = Sequential([1.0, Linear(0.0, 1.0, start=2, end=4, per_step=False)], milestones=[2])
    assert s.schedules[0] == Constant(1.0)
    assert s(1, 5, 10) == 1.0
    assert s(3, 5, 10) == 0.5
    assert per_epoch(Sequential([Constant(3.0)], milestones=[]), 2) == [3.0, 3.0]


def test_nested_composition():
    s = WarmUp(1, Sequential([Linear(0.0, 1.0, start=0, end=2), Constant(0.25)], milestones=[3]))
    assert per_epoch(s, 5) == [0.0, 0.5, 1.0, 0.25, 0.25]


def test_values_helper():
    assert Linear(0, 1, start=0, end=1).values(2, steps_per_epoch=4) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    # max_epochs defaults to `epochs`
    assert Linear(0, 1, start=0, end=1, unit="fraction").values(5) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert Linear(0, 1, start=0, end=1, unit="fraction").values(5, max_epochs=4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        Schedule().value_at(0.0, None)


# --------------------------------------------------------------------------- #
# Construction-time validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "factory, error, match",
    [
        (lambda: Constant(float("nan")), ValueError, r"Constant: `value` must be a finite number"),
        (lambda: Constant("1"), TypeError, r"`value` must be a number"),
        (lambda: Piecewise({}), ValueError, r"non-empty dict"),
        (lambda: Piecewise([(0, 1.0)]), ValueError, r"non-empty dict"),
        (lambda: Piecewise({"1": 0.1, 1: 0.2}, initial=0.0), ValueError, r"epoch 1 appears more than once"),
        (lambda: Piecewise({-1: 0.5}), ValueError, r"must be >= 0"),
        (lambda: Piecewise({1.5: 0.5}, initial=0.0), ValueError, r"whole epoch"),
        (lambda: Piecewise({"two": 0.5}, initial=0.0), TypeError, r"whole epoch"),
        (lambda: Piecewise({2: 0.5}), ValueError, r"first milestone is at epoch 2.*initial"),
        (lambda: Piecewise({0: 0.5}, initial=0.0), ValueError, r"`initial` is never used"),
        (lambda: Piecewise({0: float("nan")}), ValueError, r"milestones\[0\]` must be a finite"),
        (lambda: Piecewise({1: 1.0}, initial=float("inf")), ValueError, r"`initial` must be a finite"),
        (lambda: Linear(0.0, 1.0, start=4, end=2), ValueError, r"`end` \(2.0\) must be >= `start` \(4.0\)"),
        (lambda: Linear(0.0, 1.0, start=-1, end=2), ValueError, r"`start` must be >= 0 epochs"),
        (lambda: Cosine(0.0, 1.0, start=0.0, end=1.5, unit="fraction"), ValueError, r"`end`.*\[0, 1\]"),
        (lambda: Linear(0.0, 1.0, start=-0.1, end=0.5, unit="fraction"), ValueError, r"`start`.*\[0, 1\]"),
        (lambda: Linear(0.0, 1.0, unit="steps"), ValueError, r"`unit` must be 'epoch' or 'fraction'"),
        (lambda: Linear(float("nan"), 1.0), ValueError, r"`start_value` must be a finite"),
        (lambda: Cosine(0.0, float("inf")), ValueError, r"`end_value` must be a finite"),
        (lambda: Linear(0.0, 1.0, end=float("inf")), ValueError, r"`end` must be a finite"),
        (lambda: Linear(0.0, 1.0, per_step="yes"), TypeError, r"`per_step` must be True or False"),
        (lambda: Geometric(0.0, 16.0), ValueError, r"Geometric: `start_value` must be > 0"),
        (lambda: Geometric(16.0, -2.0), ValueError, r"Geometric: `end_value` must be > 0"),
        (lambda: Geometric(4.0, 16.0, start=3, end=1), ValueError, r"must be >= `start`"),
        (lambda: WarmUp(-1), ValueError, r"WarmUp: `epochs` must be >= 0"),
        (lambda: WarmUp(1.5), ValueError, r"WarmUp: `epochs` must be a whole epoch"),
        (lambda: WarmUp(2, "cosine"), TypeError, r"WarmUp: `schedule` is invalid.*string"),
        (lambda: WarmUp(2, off_value=float("nan")), ValueError, r"`off_value` must be a finite"),
        (lambda: Sequential([], []), ValueError, r"non-empty list"),
        (lambda: Sequential([Constant(0.0), Constant(1.0)], []), ValueError, r"needs 1 switch epochs"),
        (lambda: Sequential([Constant(0.0)], [2]), ValueError, r"needs 0 switch epochs"),
        (lambda: Sequential([0.0, 1.0, 2.0], [5, 2]), ValueError, r"strictly increasing"),
        (lambda: Sequential([0.0, 1.0, 2.0], [2, 2]), ValueError, r"strictly increasing"),
        (lambda: Sequential([0.0, 1.0], [0]), ValueError, r"milestones must be > 0"),
        (lambda: Sequential([0.0, 1.0], [-3]), ValueError, r"milestones\[0\]` must be >= 0"),
        (lambda: Sequential([0.0, None], [2]), TypeError, r"schedules\[1\] is invalid"),
        (lambda: Sequential([0.0, 1.0], 2), TypeError, r"`milestones` must be a list"),
    ],
)
def test_construction_errors(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1,), r"epoch must be a number >= 0"),
        ((0, -1, 10), r"step_in_epoch must be a number >= 0"),
        ((0, 1, -10), r"steps_per_epoch must be >= 0"),
    ],
)
def test_call_errors(args, match):
    with pytest.raises(ValueError, match=match):
        Linear(0.0, 1.0)(*args)


# --------------------------------------------------------------------------- #
# validate_for
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "schedule",
    [
        Constant(1.0),
        Geometric(8, 64),
        Piecewise({0: 64, 3: 2}),
        WarmUp(0, 16),
        WarmUp(2, Geometric(8, 64, start=2, end=5), off_value=1024),
        Sequential([64.0, Cosine(64, 1, start=2, end=6)], [2]),
    ],
)
def test_validate_for_ghost_batch_size_ok(schedule):
    assert schedule.validate_for("ghost_batch_size") is schedule


@pytest.mark.parametrize(
    "schedule, match",
    [
        (Constant(0.5), r"ghost_batch_size=0.5.*at least 1"),
        (Linear(16, 0.0, start=0, end=4), r"ghost_batch_size=0.0"),
        (Piecewise({3: 16}, initial=0.0), r"ghost_batch_size=0.0"),
        (WarmUp(2, 16), r"off_value during the warm-up.*ghost_batch_size=0.0"),
        (Sequential([16.0, Cosine(16, 0.5, start=2, end=4)], [2]), r"Cosine\(.*ghost_batch_size=0.5"),
    ],
)
def test_validate_for_ghost_batch_size_errors(schedule, match):
    with pytest.raises(ValueError, match=match):
        schedule.validate_for("ghost_batch_size")


@pytest.mark.parametrize(
    "schedule",
    [Constant(0.0), Linear(1.0, 0.0), WarmUp(2, Cosine(0, 1, start=2, end=4)), Piecewise({0: 0.0, 2: 3.0})],
)
def test_validate_for_strength_ok(schedule):
    assert schedule.validate_for("strength") is schedule


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(-0.1),
        Linear(1.0, -0.1),
        Piecewise({0: 1.0, 2: -1.0}),
        WarmUp(1, 1.0, off_value=-1.0),
        Sequential([0.0, -2.0], [1]),
    ],
)
def test_validate_for_strength_errors(schedule):
    with pytest.raises(ValueError, match=r"strength=-.*must be >= 0"):
        schedule.validate_for("strength")


def test_validate_for_unknown_kind():
    with pytest.raises(ValueError, match=r"Unknown schedule kind 'lr'"):
        Constant(1.0).validate_for("lr")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def test_as_schedule():
    assert as_schedule(0.5) == Constant(0.5)
    assert as_schedule(2) == Constant(2.0)
    s = Linear(0.0, 1.0)
    assert as_schedule(s) is s


@pytest.mark.parametrize(
    "value, match",
    [("0.5", r"got str '0.5' \(a string"), (True, r"got bool True"), (None, r"got NoneType"), ([1.0], r"got list")],
)
def test_as_schedule_errors(value, match):
    with pytest.raises(TypeError, match=r"Expected a number or a Schedule.*" + match):
        as_schedule(value)


@pytest.mark.parametrize(
    "value, expected",
    [(2.5, 3), (0.2, 1), (2.49, 2), (3.5, 4), (1.5, 2), (0.5, 1), (16.0, 16), (16, 16), (22.63, 23), (0.0, 1), (-3, 1)],
)
def test_to_ghost_batch_size(value, expected):
    result = to_ghost_batch_size(value)
    assert result == expected
    assert type(result) is int


def test_to_ghost_batch_size_rejects_non_finite():
    with pytest.raises(ValueError, match=r"must be a finite number"):
        to_ghost_batch_size(float("nan"))


# --------------------------------------------------------------------------- #
# repr / equality / pickling
# --------------------------------------------------------------------------- #
ALL_KINDS = [
    Constant(0.5),
    Piecewise({0: 64, 3: 32}),
    Piecewise({2: 1.0}, initial=0.0),
    Linear(0.0, 1.0, start=2, end=4),
    Cosine(0.0, 1.0, start=0.1, end=0.9, unit="fraction", per_step=False),
    Geometric(8, 64, end=3),
    WarmUp(2, Cosine(0.0, 1.0, start=2, end=4)),
    Sequential([0.0, Linear(0.0, 1.0, start=2, end=4)], [2]),
]


@pytest.mark.parametrize("schedule", ALL_KINDS, ids=lambda s: type(s).__name__)
def test_repr_round_trips_and_equality(schedule):
    namespace = {name: getattr(schedules_module, name) for name in schedules_module.__all__}
    rebuilt = eval(repr(schedule), namespace)
    assert rebuilt == schedule
    assert hash(rebuilt) == hash(schedule)
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    assert copy.deepcopy(schedule) == schedule


def test_repr_shows_args():
    assert repr(Linear(0, 1, start=2, end=4)) == (
        "Linear(start_value=0.0, end_value=1.0, start=2.0, end=4.0, per_step=True, unit='epoch')"
    )
    assert repr(WarmUp(2)) == "WarmUp(epochs=2, schedule=Constant(value=1.0), off_value=0.0)"


def test_inequality():
    assert Linear(0.0, 1.0) != Cosine(0.0, 1.0)
    assert Linear(0.0, 1.0) != Linear(0.0, 1.0, per_step=False)
    assert Constant(1.0) != 1.0


# --------------------------------------------------------------------------- #
# jsonargparse / LightningCLI YAML
# --------------------------------------------------------------------------- #
jsonargparse = pytest.importorskip("jsonargparse")


def _instantiate(parser, cfg):
    """``parser.instantiate`` (jsonargparse >= 4.49), ``instantiate_classes`` before it."""
    return parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)


def _parse(yaml_value: str):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--s", type=Union[float, Schedule])
    cfg = parser.parse_string(f"s: {yaml_value}")
    return _instantiate(parser, cfg).s


@pytest.mark.parametrize("yaml_value, expected", [("0.5", 0.5), ("3", 3.0)])
def test_yaml_plain_number_stays_float(yaml_value, expected):
    value = _parse(yaml_value)
    assert type(value) is float
    assert value == expected


@pytest.mark.parametrize(
    "yaml_value, expected",
    [
        (
            '{"class_path": "lightning_ghostnoise.schedules.Cosine",'
            ' "init_args": {"start_value": 0.0, "end_value": 1.0, "start": 2, "end": 4}}',
            Cosine(0.0, 1.0, start=2, end=4),
        ),
        (
            "{class_path: lightning_ghostnoise.schedules.Piecewise, init_args: {milestones: {0: 64, 3: 32, 6: 16}}}",
            Piecewise({0: 64.0, 3: 32.0, 6: 16.0}),
        ),
        (
            "{class_path: Piecewise, init_args: {milestones: {'2': 0.5}, initial: 0}}",
            Piecewise({2: 0.5}, initial=0.0),
        ),
        (
            "{class_path: Linear,"
            " init_args: {start_value: 0, end_value: 1, end: 0.5, unit: fraction, per_step: false}}",
            Linear(0.0, 1.0, end=0.5, unit="fraction", per_step=False),
        ),
        (
            "{class_path: Geometric, init_args: {start_value: 8, end_value: 64, end: 3}}",
            Geometric(8, 64, end=3),
        ),
        (
            "{class_path: WarmUp, init_args: {epochs: 2, schedule: "
            "{class_path: Cosine, init_args: {start_value: 0, end_value: 1, start: 2, end: 4}}}}",
            WarmUp(2, Cosine(0.0, 1.0, start=2, end=4)),
        ),
        ("{class_path: WarmUp, init_args: {epochs: 1, schedule: 0.3}}", WarmUp(1, 0.3)),
        (
            "{class_path: Sequential, init_args: {schedules: "
            "[0.0, {class_path: Linear, init_args: {start_value: 0, end_value: 1, start: 2, end: 4}}], "
            "milestones: [2]}}",
            Sequential([0.0, Linear(0.0, 1.0, start=2, end=4)], [2]),
        ),
    ],
)
def test_yaml_round_trip(yaml_value, expected):
    value = _parse(yaml_value)
    assert value == expected


def test_yaml_block_style_in_a_signature():
    def make(strength: Union[float, Schedule] = 0.0, ghost_batch_size: Union[int, float, Schedule] = 32):
        """Stand-in for the callback's constructor."""

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(make)
    config = """
ghost_batch_size:
  class_path: lightning_ghostnoise.schedules.Piecewise
  init_args:
    milestones:
      0: 64
      5: 16
strength:
  class_path: lightning_ghostnoise.schedules.WarmUp
  init_args:
    epochs: 2
    schedule:
      class_path: lightning_ghostnoise.schedules.Linear
      init_args: {start_value: 0.0, end_value: 1.0, start: 2, end: 4}
"""
    cfg = parser.parse_string(config)
    init = _instantiate(parser, cfg)
    assert init.ghost_batch_size == Piecewise({0: 64, 5: 16})
    assert init.strength == WarmUp(2, Linear(0.0, 1.0, start=2, end=4))
    # and the parsed config dumps back to YAML that parses to the same objects
    again = _instantiate(parser, parser.parse_string(parser.dump(cfg)))
    assert again.ghost_batch_size == init.ghost_batch_size
    assert again.strength == init.strength


def test_yaml_invalid_config_reports_our_message():
    with pytest.raises((ValueError, jsonargparse.ArgumentError), match=r"must be >= `start`"):
        _parse("{class_path: Linear, init_args: {start_value: 0, end_value: 1, start: 3, end: 1}}")


# --------------------------------------------------------------------------- #
# Docstring examples
# --------------------------------------------------------------------------- #
def test_docstring_examples():
    """The examples of the package and of each of its modules (which may use any public schedule)."""
    namespace = {name: getattr(schedules_module, name) for name in schedules_module.__all__}
    attempted = failed = 0
    for module in (schedules_module, base, composite, piecewise, ramps):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, extraglobs=namespace)
        attempted, failed = attempted + result.attempted, failed + result.failed
    assert attempted > 10
    assert failed == 0
