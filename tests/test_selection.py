"""Selection policies: elimination schedule arithmetic, ranking, and SuccessiveHalving decisions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec.selection import MetricsTable, SelectionPolicy, SuccessiveHalving, elimination_schedule, rank


# --------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("num_models", "reduce_factor", "expected"),
    [
        (10, 0.5, [10, 5, 2, 1]),
        (10, 0.3, [10, 3, 1]),
        (10, 0.9, [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
        (1, 0.5, [1]),
        (1, 0.9, [1]),
        (2, 0.5, [2, 1]),
        (3, 0.5, [3, 1]),
        (16, 0.5, [16, 8, 4, 2, 1]),
        (100, 0.1, [100, 10, 1]),
    ],
)
def test_elimination_schedule_examples(num_models: int, reduce_factor: float, expected: list[int]) -> None:
    assert elimination_schedule(num_models, reduce_factor) == expected


@settings(max_examples=300, deadline=None)
@given(
    num_models=st.integers(min_value=1, max_value=100_000),
    reduce_factor=st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
)
def test_elimination_schedule_property(num_models: int, reduce_factor: float) -> None:
    sizes = elimination_schedule(num_models, reduce_factor)
    assert sizes[0] == num_models
    assert sizes[-1] == 1
    for prev, cur in zip(sizes, sizes[1:]):
        assert cur < prev  # strictly decreasing
        assert cur == max(1, int(prev * reduce_factor))
    assert all(s >= 1 for s in sizes)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("reduce_factor", [0, 1, 1.5, -0.1, 0.0, 1.0, float("nan")])
def test_successive_halving_rejects_reduce_factor(reduce_factor: float) -> None:
    with pytest.raises(ValueError, match="reduce_factor"):
        SuccessiveHalving(interval=5, reduce_factor=reduce_factor)


@pytest.mark.parametrize("interval", [0, -1, -100])
def test_successive_halving_rejects_interval(interval: int) -> None:
    with pytest.raises(ValueError, match="interval"):
        SuccessiveHalving(interval=interval, reduce_factor=0.5)


def test_successive_halving_is_a_policy() -> None:
    assert isinstance(SuccessiveHalving(5), SelectionPolicy)


def test_metrics_table_rejects_ragged_columns() -> None:
    with pytest.raises(ValueError, match="val_loss"):
        MetricsTable([0, 1, 2], {"val_loss": [0.1, 0.2]})


def test_metrics_table_rows() -> None:
    table = MetricsTable([4, 2], {"val_loss": [0.5, 0.25], "val_accuracy": [0.8, 0.9]}, step=7)
    assert len(table) == 2
    assert table.rows() == [
        {"id": 4, "val_loss": 0.5, "val_accuracy": 0.8},
        {"id": 2, "val_loss": 0.25, "val_accuracy": 0.9},
    ]


# --------------------------------------------------------------------------- rank
def test_rank_ascending_nan_last_ties_by_id() -> None:
    nan = float("nan")
    # positions:       0     1     2     3     4
    table = MetricsTable([3, 1, 2, 0, 5], {"val_loss": [0.5, nan, 0.5, 0.1, 0.5]})
    # 0.1 (pos 3) first; the three 0.5 ties ordered by id: id 2 (pos 2), id 3 (pos 0), id 5 (pos 4); NaN last.
    assert rank(table, "val_loss") == [3, 2, 0, 4, 1]


def test_rank_descending_nan_still_last() -> None:
    nan = float("nan")
    table = MetricsTable([0, 1, 2, 3], {"val_accuracy": [0.5, nan, 0.9, 0.5]})
    assert rank(table, "val_accuracy", descending=True) == [2, 0, 3, 1]


def test_rank_all_nan_by_id() -> None:
    nan = float("nan")
    table = MetricsTable([7, 3, 5], {"val_loss": [nan, nan, nan]})
    assert rank(table, "val_loss") == [1, 2, 0]


def test_rank_infinite_before_nan() -> None:
    table = MetricsTable([0, 1, 2], {"val_loss": [float("nan"), math.inf, 1.0]})
    assert rank(table, "val_loss") == [2, 1, 0]


def test_rank_repeated_ids_break_ties_by_position() -> None:
    table = MetricsTable([1, 1, 0], {"val_loss": [0.3, 0.3, 0.3]})
    assert rank(table, "val_loss") == [2, 0, 1]


def test_rank_unknown_metric() -> None:
    with pytest.raises(ValueError, match="metric"):
        rank(MetricsTable([0], {"val_loss": [1.0]}), "accuracy")


# --------------------------------------------------------------------------- decide
@pytest.mark.parametrize("reduce_factor", [0.1, 0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 13])
def test_decide_keeps_max_1_int_n_rf(n: int, reduce_factor: float) -> None:
    losses = [float((7 * i) % n) + 0.01 * i for i in range(n)]
    table = MetricsTable(list(range(n)), {"val_loss": losses}, step=5)
    keep = SuccessiveHalving(5, reduce_factor).decide(table)
    assert len(keep) == max(1, int(n * reduce_factor))
    assert keep == sorted(range(n), key=lambda p: (losses[p], p))[: len(keep)]


def test_decide_keeps_lowest_losses_by_position() -> None:
    table = MetricsTable([10, 11, 12, 13], {"val_loss": [0.4, 0.1, 0.3, 0.2]}, step=5)
    assert SuccessiveHalving(5, 0.5).decide(table) == [1, 3]


def test_decide_custom_metric_descending() -> None:
    table = MetricsTable([0, 1, 2, 3], {"val_loss": [0.1, 0.2, 0.3, 0.4], "val_accuracy": [0.1, 0.9, 0.5, 0.7]}, step=5)
    assert SuccessiveHalving(5, 0.5, metric="val_accuracy", descending=True).decide(table) == [1, 3]


def test_final_step_keeps_one_at_end_of_budget() -> None:
    policy = SuccessiveHalving(5, 0.5, final_step=12)
    losses = {"val_loss": [0.4, 0.1, 0.3, 0.2]}
    assert policy.decide(MetricsTable([0, 1, 2, 3], losses, step=10)) == [1, 3]
    assert policy.decide(MetricsTable([0, 1, 2, 3], losses, step=12)) == [1]
    # a regular decision that falls on the end of the budget keeps only the best too
    assert SuccessiveHalving(5, 0.9, final_step=10).decide(MetricsTable([0, 1, 2, 3], losses, step=10)) == [1]


def test_no_final_step_keeps_fraction() -> None:
    policy = SuccessiveHalving(5, 0.5)
    assert policy.decide(MetricsTable([0, 1, 2, 3], {"val_loss": [0.4, 0.1, 0.3, 0.2]}, step=10_000)) == [1, 3]


# --------------------------------------------------------------------------- next_decision
def test_next_decision_arithmetic() -> None:
    policy = SuccessiveHalving(5, 0.5)
    assert policy.next_decision(0, 10) == 5
    assert policy.next_decision(4, 10) == 5
    assert policy.next_decision(5, 5) == 10
    assert policy.next_decision(7, 5) == 10
    assert policy.next_decision(10, 2) == 15
    assert policy.next_decision(10, 1) is None
    assert policy.next_decision(0, 1) is None


def test_next_decision_with_final_step() -> None:
    policy = SuccessiveHalving(5, 0.5, final_step=12)
    assert policy.next_decision(0, 10) == 5
    assert policy.next_decision(5, 5) == 10
    assert policy.next_decision(10, 2) == 12  # min(15, 12): the budget ends first
    assert policy.next_decision(10, 1) is None
    assert SuccessiveHalving(100, 0.5, final_step=38).next_decision(0, 6) == 38


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(min_value=1, max_value=1000),
    step=st.integers(min_value=0, max_value=100_000),
    n=st.integers(min_value=2, max_value=100),
)
def test_next_decision_is_next_multiple(interval: int, step: int, n: int) -> None:
    nxt = SuccessiveHalving(interval, 0.5).next_decision(step, n)
    assert nxt is not None
    assert nxt > step and nxt % interval == 0 and nxt - step <= interval


def test_simulated_run_follows_schedule() -> None:
    """Driving the policy like the trainer does visits exactly elimination_schedule's sizes."""
    for n0, rf in [(10, 0.5), (10, 0.3), (10, 0.9), (7, 0.5), (1, 0.5)]:
        policy = SuccessiveHalving(3, rf)
        step, ids, sizes = 0, list(range(n0)), [n0]
        while (decision := policy.next_decision(step, len(ids))) is not None:
            step = decision
            table = MetricsTable(ids, {"val_loss": [float(-i) for i in ids]}, step=step)
            ids = [ids[p] for p in policy.decide(table)]
            sizes.append(len(ids))
        assert sizes == elimination_schedule(n0, rf)
        assert step == 3 * (len(sizes) - 1)
        assert ids == [n0 - 1]  # the highest id has the lowest (most negative) loss
