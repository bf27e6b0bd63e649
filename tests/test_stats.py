"""popvec.stats: the Student-t quantile against tabulated values, and the summary's invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec.stats import Summary, normal_quantile, summarize, t_quantile

# t_{0.975, df} (two-sided 95%), to 6 significant digits, from standard tables.
T975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 9: 2.26216, 10: 2.22814, 29: 2.04523, 30: 2.04227, 100: 1.98397}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(T975[df], rel=2e-6)


def test_t_quantile_other_levels_and_limits() -> None:
    assert t_quantile(0.995, 4) == pytest.approx(4.60409, rel=1e-5)
    assert t_quantile(0.95, 10) == pytest.approx(1.81246, rel=1e-5)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy, exact
    assert t_quantile(0.975, 2) == pytest.approx(2 * 0.475 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-9)  # df=2, exact
    assert t_quantile(0.025, 4) == pytest.approx(-T975[4], rel=2e-6)
    assert t_quantile(0.5, 3) == 0.0
    assert normal_quantile(0.975) == pytest.approx(1.959964, rel=1e-6)
    for df in (1e5, 1e8, 1e12):
        assert t_quantile(0.975, df) == pytest.approx(1.959964, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)


@given(st.floats(0.5, 1000.0))
@settings(max_examples=30, deadline=None)
def test_t_quantile_falls_with_df_towards_the_normal(df: float) -> None:
    assert t_quantile(0.975, df) > t_quantile(0.975, df * 1.5) > 1.959963


def test_summary_known_values() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.n, s.n_finite, s.mean, s.min, s.max) == (5, 5, 3.0, 1.0, 5.0)
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.ci_high - s.mean == pytest.approx(T975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
    assert s.format(".2f") == "3.00 ± 1.58 (95% CI 1.04 to 4.96, n=5)"
    assert set(s.to_dict()) == {"n", "n_finite", "mean", "std", "ci_low", "ci_high", "min", "max", "confidence"}


def test_one_value_has_unknown_spread_not_zero() -> None:
    s = summarize([0.7])
    assert (s.n, s.n_finite, s.mean, s.min, s.max) == (1, 1, 0.7, 0.7, 0.7)
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert s.format(".2f") == "0.70 (n=1)"


def test_non_finite_values_are_counted_and_reported() -> None:
    s = summarize([1.0, math.nan, 3.0, math.inf])
    assert (s.n, s.n_finite, s.mean) == (4, 2, 2.0)
    assert "n=4, 2 non-finite" in s.format()
    empty = summarize([math.nan, math.nan])
    assert (empty.n, empty.n_finite) == (2, 0) and math.isnan(empty.mean) and math.isnan(empty.std)
    assert empty.format() == "nan (n=2, 2 non-finite)"
    none = summarize([])
    assert none.n == 0 and math.isnan(none.mean)


values_strategy = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=30)


@given(values_strategy)
@settings(max_examples=60, deadline=None)
def test_interval_contains_the_mean_and_the_range_brackets_it(values: list[float]) -> None:
    s = summarize(values)
    assert s.ci_low <= s.mean <= s.ci_high
    assert s.min <= s.mean + 1e-9 * (1 + abs(s.mean)) and s.mean <= s.max + 1e-9 * (1 + abs(s.mean))
    assert s.std >= 0
    assert s.ci_high - s.ci_low == pytest.approx(2 * t_quantile(0.975, len(values) - 1) * s.std / math.sqrt(len(values)), abs=1e-6)


@given(values_strategy, st.floats(-1e3, 1e3), st.floats(0.01, 100.0))
@settings(max_examples=60, deadline=None)
def test_shift_and_scale_equivariance(values: list[float], shift: float, scale: float) -> None:
    s = summarize(values)
    moved = summarize([scale * v + shift for v in values])
    tol = 1e-6 * (1 + scale * max(abs(v) for v in values) + abs(shift))
    assert moved.mean == pytest.approx(scale * s.mean + shift, abs=tol)
    assert moved.std == pytest.approx(scale * s.std, abs=tol)
    assert moved.ci_low == pytest.approx(scale * s.ci_low + shift, abs=tol)
    assert moved.ci_high == pytest.approx(scale * s.ci_high + shift, abs=tol)
    flipped = s.scaled(-scale)
    assert flipped.ci_low <= flipped.mean <= flipped.ci_high and flipped.min <= flipped.max


def test_wider_confidence_gives_a_wider_interval() -> None:
    values = [0.1, 0.4, 0.2, 0.3]
    assert summarize(values, 0.99).half_width > summarize(values, 0.95).half_width > summarize(values, 0.8).half_width
    assert isinstance(summarize(values), Summary)


def test_the_interval_stays_within_the_bounds_given() -> None:
    """An accuracy's interval never leaves [0, 1]; without bounds it is the plain t-interval."""
    free, bounded = summarize([0.80, 0.86]), summarize([0.80, 0.86], bounds=(0.0, 1.0))
    assert free.ci_high > 1.0 and bounded.ci_high == 1.0 and bounded.ci_low == free.ci_low
