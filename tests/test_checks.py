"""popvec.checks, the shared argument validators, and the library entry points that rely on them.

Properties: every validator that takes numbers rejects NaN, inf (unless it documents allowing it) and
bools; interval ends are accepted or refused exactly as their open/closed flags say; every message
names the argument. Then the callers: ``Population.select`` refuses bools and floats, optimizers
refuse NaN and out-of-range hyperparameters, and ``set_hparam`` checks exactly like the constructor.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec import Population, checks, optim
from popvec.cli import argtypes

NAME = "my_arg"
MATCH = re.escape(NAME)
N = 4

fast = settings(max_examples=150, deadline=None, derandomize=True)

NON_FINITE = [math.nan, math.inf, -math.inf, float("-nan")]
BOOLS: list[Any] = [True, False, np.bool_(True), np.bool_(False)]
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def intervals(draw: Any) -> tuple[float, float, bool, bool]:
    """A non-empty interval: finite ends ``low <= high`` and open/closed flags (closed when low == high)."""
    a, b = draw(finite), draw(finite)
    low, high = min(a, b), max(a, b)
    if low == high:
        return low, high, False, False
    return low, high, draw(st.booleans()), draw(st.booleans())


def inside(v: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


def test_check_type_error_is_both_type_and_value_error() -> None:
    assert issubclass(checks.CheckTypeError, TypeError)
    assert issubclass(checks.CheckTypeError, ValueError)


# --------------------------------------------------------------------------- integer
@fast
@given(v=st.integers(-1000, 1000), low=st.integers(-100, 100), width=st.integers(0, 100))
def test_integer_accepts_exactly_the_closed_range(v: int, low: int, width: int) -> None:
    high = low + width
    if low <= v <= high:
        out = checks.integer(NAME, v, low, high)
        assert out == v and type(out) is int
    else:
        with pytest.raises(ValueError, match=MATCH):
            checks.integer(NAME, v, low, high)


@fast
@given(low=st.integers(-100, 100), width=st.integers(0, 100))
def test_integer_range_ends(low: int, width: int) -> None:
    high = low + width
    assert checks.integer(NAME, low, low, high) == low
    assert checks.integer(NAME, high, low, high) == high
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match=rf"{MATCH} must be an integer in \[{low}, {high}\]"):
            checks.integer(NAME, bad, low, high)
    assert checks.integer(NAME, 10**30, low, None) == 10**30
    assert checks.integer(NAME, -(10**30), None, None) == -(10**30)


@fast
@given(v=st.one_of(st.floats(), st.booleans(), st.text(max_size=3), st.none(), st.just(np.bool_(True)), st.just(torch.tensor(1))))
def test_integer_rejects_non_integers(v: Any) -> None:
    with pytest.raises(TypeError, match=MATCH):
        checks.integer(NAME, v, minimum=None)
    if v is None:  # optional_integer takes None
        assert checks.optional_integer(NAME, v) is None
    else:
        with pytest.raises(TypeError, match=MATCH):
            checks.optional_integer(NAME, v, minimum=None)


def test_integer_numpy_and_optional() -> None:
    assert checks.integer(NAME, np.int64(3)) == 3 and type(checks.integer(NAME, np.int64(3))) is int
    assert checks.optional_integer(NAME, None) is None
    assert checks.optional_integer(NAME, 1) == 1
    with pytest.raises(ValueError, match=f"{MATCH} must be None or an integer >= 1, got 0"):
        checks.optional_integer(NAME, 0)
    with pytest.raises(ValueError, match=f"{MATCH} must be an integer >= 2, got 2.0"):
        checks.integer(NAME, 2.0, minimum=2)


# --------------------------------------------------------------------------- number
@fast
@given(v=finite, interval=intervals())
def test_number_accepts_exactly_the_interval(v: float, interval: tuple[float, float, bool, bool]) -> None:
    low, high, low_open, high_open = interval
    if inside(v, *interval):
        assert checks.number(NAME, v, low, high, low_open, high_open) == v
        assert checks.optional_number(NAME, v, low, high, low_open, high_open) == v
    else:
        with pytest.raises(ValueError, match=MATCH):
            checks.number(NAME, v, low, high, low_open, high_open)
        with pytest.raises(ValueError, match=MATCH):
            checks.optional_number(NAME, v, low, high, low_open, high_open)


@fast
@given(interval=intervals())
def test_number_interval_ends_follow_the_flags(interval: tuple[float, float, bool, bool]) -> None:
    low, high, low_open, high_open = interval
    for end, is_open in ((low, low_open), (high, high_open)):
        if is_open:
            with pytest.raises(ValueError, match=MATCH):
                checks.number(NAME, end, low, high, low_open, high_open)
        else:
            assert checks.number(NAME, end, low, high, low_open, high_open) == end


@fast
@given(interval=intervals(), allow_inf=st.booleans())
def test_number_rejects_nan_everywhere_and_inf_unless_allowed(interval: tuple[float, float, bool, bool], allow_inf: bool) -> None:
    for args in (interval, (-math.inf, math.inf, False, False)):
        for v in NON_FINITE:
            with pytest.raises(ValueError, match=MATCH):
                checks.number(NAME, v, *args)
            with pytest.raises(ValueError, match=MATCH):
                checks.optional_number(NAME, v, *args)
        with pytest.raises(ValueError, match=MATCH):
            checks.number(NAME, math.nan, *args, allow_inf=allow_inf)
    # inf inside an interval that holds it: accepted only with allow_inf
    assert checks.number(NAME, math.inf, 0.0, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=MATCH):
        checks.number(NAME, math.inf, 0.0, math.inf, high_open=True, allow_inf=True)


@fast
@given(v=st.one_of(st.booleans(), st.just(np.bool_(False)), st.text(max_size=3), st.none(), st.just(torch.tensor(0.5)), st.just([0.5])))
def test_number_rejects_non_numbers(v: Any) -> None:
    if v is None:  # optional_number takes None
        assert checks.optional_number(NAME, v) is None
    else:
        with pytest.raises(TypeError, match=MATCH):
            checks.optional_number(NAME, v)
    with pytest.raises(TypeError, match=MATCH):
        checks.number(NAME, v)
    with pytest.raises(TypeError, match=MATCH):
        checks.unit_interval(NAME, v)


@fast
@given(v=st.one_of(st.integers(), st.integers(-(10**400), 10**400)))
def test_number_takes_ints_and_refuses_ones_too_large_for_a_float(v: int) -> None:
    try:
        expected = float(v)
    except OverflowError:
        with pytest.raises(ValueError, match=MATCH):
            checks.number(NAME, v)
    else:
        assert checks.number(NAME, v) == expected


@pytest.mark.parametrize(("low_open", "high_open"), [(False, False), (True, False), (False, True), (True, True)])
def test_unit_interval_ends(low_open: bool, high_open: bool) -> None:
    for end, is_open in ((0.0, low_open), (1.0, high_open)):
        if is_open:
            with pytest.raises(ValueError, match=MATCH):
                checks.unit_interval(NAME, end, low_open, high_open)
        else:
            assert checks.unit_interval(NAME, end, low_open, high_open) == end
    assert checks.unit_interval(NAME, 0.5, low_open, high_open) == 0.5
    for bad in (-1e-9, 1 + 1e-9, math.nan, math.inf, True):
        with pytest.raises(ValueError, match=MATCH):
            checks.unit_interval(NAME, bad, low_open, high_open)


def test_number_messages() -> None:
    cases = [
        (lambda: checks.number(NAME, -1, 0.0), f"{NAME} must be a finite number >= 0, got -1"),
        (lambda: checks.number(NAME, 0.0, 0.0, low_open=True), f"{NAME} must be a finite number > 0, got 0.0"),
        (lambda: checks.number(NAME, 2, high=1.0, high_open=True), f"{NAME} must be a finite number < 1, got 2"),
        (lambda: checks.number(NAME, math.nan), f"{NAME} must be a finite number, got nan"),
        (lambda: checks.number(NAME, 1.5, 0.0, 1.0, low_open=True), f"{NAME} must lie in (0, 1], got 1.5"),
        (lambda: checks.optional_number(NAME, 0.0, 0.0, low_open=True, allow_inf=True), f"{NAME} must be None or a number > 0, got 0.0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message
        assert "\n" not in message


def test_number_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        checks.number(NAME, 0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="low <= high"):
        checks.number(NAME, 0.5, math.nan)


# --------------------------------------------------------------------------- number_or_tensor
@fast
@given(values=st.lists(finite, min_size=1, max_size=6))
def test_number_or_tensor_checks_every_entry(values: list[float]) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    if all(v > 0 for v in t.tolist()):
        assert checks.number_or_tensor(NAME, t, 0.0, low_open=True) is t
    else:
        with pytest.raises(ValueError, match=MATCH):
            checks.number_or_tensor(NAME, t, 0.0, low_open=True)
    for bad in NON_FINITE:
        with pytest.raises(ValueError, match=MATCH):
            checks.number_or_tensor(NAME, torch.tensor([*values, bad]))
        with pytest.raises(ValueError, match=MATCH):
            checks.number_or_tensor(NAME, bad)
    with pytest.raises(TypeError, match=MATCH):
        checks.number_or_tensor(NAME, torch.tensor([True]))
    with pytest.raises(TypeError, match=MATCH):
        checks.number_or_tensor(NAME, True)


# --------------------------------------------------------------------------- choice
def test_choice() -> None:
    assert checks.choice(NAME, "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=f"{MATCH} must be one of a, b, got 'c'"):
        checks.choice(NAME, "c", ("a", "b"))
    assert checks.choice(NAME, 28, (28, 32)) == 28
    for bad in (True, np.bool_(True), 1.5, None, [28]):
        with pytest.raises(ValueError, match=MATCH):
            checks.choice(NAME, bad, (1, 28, 32))
    assert checks.choice(NAME, True, (True, False)) is True
    with pytest.raises(ValueError, match=MATCH):
        checks.choice(NAME, 1, (True, False))


# --------------------------------------------------------------------------- member_values
@fast
@given(values=st.lists(finite, min_size=N, max_size=N), interval=intervals())
def test_member_values_accepts_exactly_the_interval(values: list[float], interval: tuple[float, float, bool, bool]) -> None:
    low, high, low_open, high_open = interval
    if all(inside(v, *interval) for v in values):
        out = checks.member_values(NAME, values, N, None, low, high, low_open, high_open)
        assert out.dtype == torch.float32 and out.shape == (N,) and out.tolist() == values
    else:
        with pytest.raises(ValueError, match=MATCH):
            checks.member_values(NAME, values, N, None, low, high, low_open, high_open)


@fast
@given(values=st.lists(finite, min_size=N, max_size=N), position=st.integers(0, N - 1), bad=st.sampled_from(NON_FINITE))
def test_member_values_rejects_any_non_finite_entry(values: list[float], position: int, bad: float) -> None:
    values[position] = bad
    for value in (values, torch.tensor(values), np.array(values)):
        with pytest.raises(ValueError, match=f"{MATCH} must be finite for every member"):
            checks.member_values(NAME, value, N)
    with pytest.raises(ValueError, match=MATCH):
        checks.member_values(NAME, bad, N, low=0.0)
    allow = {"low": 0.0, "low_open": True, "allow_inf": True}
    if math.isnan(bad):
        with pytest.raises(ValueError, match=MATCH):
            checks.member_values(NAME, values, N, **allow)
    elif bad > 0 and all(v > 0 or i == position for i, v in enumerate(values)):
        assert checks.member_values(NAME, values, N, **allow)[position] == math.inf


@pytest.mark.parametrize(
    "value",
    [True, False, np.bool_(True), [True, 1.0, 1.0, 1.0], (0.5, False, 0.5, 0.5), torch.ones(N, dtype=torch.bool), np.ones(N, dtype=bool)],
    ids=["True", "False", "np_bool", "list", "tuple", "tensor", "array"],
)
def test_member_values_rejects_bools(value: Any) -> None:
    with pytest.raises(TypeError, match=f"{MATCH} must be a number or one number per member"):
        checks.member_values(NAME, value, N)


@pytest.mark.parametrize("value", ["fast", None, {"a": 1}, torch.ones(N, dtype=torch.complex64)])
def test_member_values_rejects_non_numbers(value: Any) -> None:
    with pytest.raises(TypeError, match=MATCH):
        checks.member_values(NAME, value, N)


def test_member_values_shape_and_copy() -> None:
    with pytest.raises(ValueError, match=rf"{MATCH} must be a float or have one value per member \(length {N}\)"):
        checks.member_values(NAME, [0.1] * (N + 1), N)
    with pytest.raises(ValueError, match=MATCH):
        checks.member_values(NAME, [[0.1] * N], N)
    assert checks.member_values(NAME, 0.5, N).tolist() == [0.5] * N
    assert checks.member_values(NAME, 2, N).tolist() == [2.0] * N
    source = torch.full((N,), 0.25, requires_grad=True)
    out = checks.member_values(NAME, source, N, "cpu")
    assert not out.requires_grad and out.data_ptr() != source.data_ptr()
    assert optim.as_member_values is checks.member_values


# --------------------------------------------------------------------------- positions
@fast
@given(values=st.lists(st.integers(-3, N + 3), max_size=2 * N))
def test_positions_accepts_exactly_members(values: list[int]) -> None:
    ok = all(0 <= v < N for v in values)
    if values and ok:
        assert checks.positions(NAME, values, N).tolist() == values
    else:
        with pytest.raises(ValueError, match=MATCH):
            checks.positions(NAME, values, N)
    if ok:
        assert checks.positions(NAME, values, N, allow_empty=True).tolist() == values


@pytest.mark.parametrize(
    "values",
    [
        [True, False, True, False],
        [0, True],
        [0.9, 2.7],
        [0.0, 1.0],
        torch.tensor([0.0, 1.0]),
        torch.tensor([True, False]),
        np.array([1.0]),
        np.array([True]),
    ],
    ids=["bools", "int_and_bool", "floats", "whole_floats", "float_tensor", "bool_tensor", "float_array", "bool_array"],
)
def test_positions_reject_bools_and_floats(values: Any) -> None:
    with pytest.raises(TypeError, match=MATCH):
        checks.positions(NAME, values, N)


def test_integers() -> None:
    assert checks.integers(NAME, [5, -1]).tolist() == [5, -1]
    assert checks.integers(NAME, []).tolist() == []
    for bad in ([True], [1.5], "ab"):
        with pytest.raises(TypeError, match=MATCH):
            checks.integers(NAME, bad)
    with pytest.raises(ValueError, match=MATCH):
        checks.integers(NAME, [[1, 2]])


# --------------------------------------------------------------------------- argtypes use the same ranges
@fast
@given(v=st.one_of(st.floats(), st.integers(-5, 5)))
def test_cli_numbers_agree_with_checks(v: float) -> None:
    text = repr(v)
    for parse, check in [
        (argtypes.open_unit, lambda x: checks.unit_interval("x", x, True, True)),
        (argtypes.positive_float, lambda x: checks.number("x", x, 0.0, low_open=True)),
        (argtypes.nonnegative_float, lambda x: checks.number("x", x, 0.0)),
    ]:
        try:
            expected: float | None = check(float(text))
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
        else:
            assert parse(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "two", "True", ""])
def test_cli_integers_reject_what_checks_reject(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1"):
        argtypes.positive_int(text)
    assert argtypes.positive_int("7") == 7


# --------------------------------------------------------------------------- Population.select
@pytest.mark.parametrize(
    "bad",
    [[True, False, True, False], [True], [0.9, 2.7], [0.0, 1.0], np.array([True, False]), torch.tensor([1.0])],
    ids=["mask", "single_bool", "floats", "whole_floats", "bool_array", "float_tensor"],
)
def test_population_select_rejects_bools_and_floats(bad: Any) -> None:
    pop = Population.from_factory(tiny_mlp, N)
    before = {k: v.clone() for k, v in pop.params.items()}
    with pytest.raises(TypeError, match="indices"):
        pop.select(bad)
    assert pop.n == N and pop.ids.tolist() == list(range(N))
    assert all(torch.equal(v, before[k]) for k, v in pop.params.items())
    with pytest.raises(TypeError, match="indices"):
        pop.member(True)  # type: ignore[arg-type]


def test_population_other_checks() -> None:
    with pytest.raises(TypeError, match="n must be an integer >= 1"):
        Population.from_factory(tiny_mlp, True)  # type: ignore[arg-type]
    pop = Population.from_factory(tiny_mlp, N)
    with pytest.raises(TypeError, match="copies"):
        pop.spawn([0], copies=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        pop.shrink_perturb(1.0, math.inf)


# --------------------------------------------------------------------------- optimizers
SGD_HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "max_grad_norm")
ADAM_HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm")
BASE = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "max_grad_norm": 1.0},
    "adam": {"lr": 0.1, "max_grad_norm": 1.0},
    "adamw": {"lr": 0.1, "max_grad_norm": 1.0},
}
CASES = [(kind, name) for kind, names in (("sgd", SGD_HPARAMS), ("adam", ADAM_HPARAMS), ("adamw", ADAM_HPARAMS)) for name in names]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_optimizers_reject_nan(kind: str, name: str) -> None:
    pop = Population.from_factory(tiny_mlp, N)
    for value in (math.nan, [0.1, math.nan, 0.1, 0.1], torch.tensor([math.nan] * N)):
        with pytest.raises(ValueError, match=name):
            optim.make(kind, pop, **{**BASE[kind], name: value})


def test_optimizer_constructors_reject_nan_directly() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    nan = math.nan
    calls = {
        "lr": lambda: optim.SGD(pop, lr=nan),
        "momentum": lambda: optim.SGD(pop, momentum=nan),
        "dampening": lambda: optim.SGD(pop, momentum=0.9, dampening=nan),
        "weight_decay": lambda: optim.AdamW(pop, weight_decay=nan),
        "beta1": lambda: optim.Adam(pop, betas=(nan, 0.999)),
        "beta2": lambda: optim.Adam(pop, betas=(0.9, nan)),
        "eps": lambda: optim.Adam(pop, eps=nan),
        "max_grad_norm": lambda: optim.Adam(pop, max_grad_norm=nan),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(ValueError, match="max_grad_norm"):
        optim.from_torch(pop, lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=nan)


def test_optimizer_ranges() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        optim.Adam(pop, eps=-1e-8)
    with pytest.raises(ValueError, match="dampening must be finite and >= 0"):
        optim.SGD(pop, momentum=0.9, dampening=-0.1)
    with pytest.raises(ValueError, match="beta2"):
        optim.Adam(pop, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(pop, lr=math.inf)
    with pytest.raises(TypeError, match="lr"):
        optim.SGD(pop, lr=True)
    # range ends that are allowed, and inf for max_grad_norm (clips nothing, still measures)
    optim.Adam(pop, lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, max_grad_norm=math.inf)
    optim.SGD(pop, lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0)
    assert optim.from_torch(pop, lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=math.inf).hparams["max_grad_norm"].isinf().all()
    with pytest.raises(ValueError, match="max_grad_norm"):
        optim.from_torch(pop, lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=0.0)


SET_VALUES: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    -1.0,
    -1e-12,
    0.0,
    0.5,
    0.999,
    1.0,
    2.0,
    True,
    [0.1, math.nan, 0.1, 0.1],
    [0.1] * (N + 1),
    "x",
]


def _outcome(call: Any) -> type[BaseException] | None:
    try:
        call()
    except (TypeError, ValueError) as err:
        return TypeError if isinstance(err, TypeError) else ValueError
    return None


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_set_hparam_validates_like_the_constructor(kind: str, name: str) -> None:
    pop = Population.from_factory(tiny_mlp, N)
    opt = optim.make(kind, pop, **BASE[kind])
    for value in SET_VALUES:
        before = {k: v.clone() for k, v in opt.hparams.items()}
        built = _outcome(lambda value=value: optim.make(kind, pop, **{**BASE[kind], name: value}))
        got = _outcome(lambda value=value: opt.set_hparam(name, value))
        assert got == built, (kind, name, value)
        if got is not None:
            assert all(torch.equal(v, before[k]) for k, v in opt.hparams.items()), (kind, name, value)
        else:
            opt.hparams.update(before)
            opt.hparams_changed()


def test_set_hparam_checks_nesterov() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    opt = optim.SGD(pop, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        opt.set_hparam("momentum", 0.0)
    with pytest.raises(ValueError, match="nesterov"):
        opt.set_hparam("dampening", [0.0, 0.1, 0.0, 0.0])
    assert opt.hparams["momentum"].tolist() == [pytest.approx(0.9)] * N
    assert opt.hparams["dampening"].tolist() == [0.0] * N
    opt.set_hparam("momentum", 0.5)
    with pytest.raises(ValueError, match="name must be one of"):
        opt.set_hparam("beta1", 0.9)


def test_torch_optimizer_set_hparam_checks_max_grad_norm() -> None:
    pop = Population.from_factory(tiny_mlp, N)
    opt = optim.from_torch(pop, lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=1.0)
    opt.set_hparam("max_grad_norm", math.inf)  # clips nothing, still measures
    for bad in (math.nan, 0.0, -1.0, True, [1.0] * (N + 1)):
        with pytest.raises(ValueError, match="max_grad_norm"):
            opt.set_hparam("max_grad_norm", bad)
    assert opt.hparams["max_grad_norm"].isinf().all()
    with pytest.raises(ValueError, match="name must be one of max_grad_norm"):
        opt.set_hparam("lr", 0.1)
