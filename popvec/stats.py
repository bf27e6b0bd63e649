"""Summary statistics over replicates: mean, sample standard deviation and a Student-t confidence interval.

Every study with replicates (seeds) reports its numbers through :func:`summarize`, so a reader
always sees n, the spread and a 95% confidence interval, never a bare mean. Non-finite values
(a diverged replicate) are never dropped silently: the statistics are taken over the finite
values and ``n_finite`` says how many of the ``n`` those are. With fewer than two finite values
the standard deviation and the interval are NaN (unknown), never 0.

The Student-t quantile is computed here (no scipy): the two-sided tail of the t distribution is
a regularized incomplete beta function, evaluated by its continued fraction and inverted by
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Summary", "summarize", "t_quantile", "normal_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def normal_quantile(p: float) -> float:
    """The standard normal quantile Phi^-1(p) for p in (0, 1), by bisection on ``math.erfc``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: float) -> float:
    """The Student-t quantile t_{p, df}, e.g. ``t_quantile(0.975, 4) = 2.776``; df may be fractional.

    Solves ``0.5 * I_x(df/2, 1/2) = 1 - p`` (the upper tail, with ``x = df / (df + t^2)``) for x by
    bisection, then ``t = sqrt(df (1 - x) / x)``; accurate to about 1e-10. Very large df (> 1e7)
    use the normal quantile, which it equals there to well below that accuracy.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:  # also refuses NaN
        raise ValueError(f"df must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df > 1e7:
        return normal_quantile(p)
    target = 2.0 * (1.0 - p)  # I_x(df/2, 1/2) increases with x; find x with I_x = target
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(0.5 * df, 0.5, mid) < target:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and Student-t confidence interval of n replicates.

    ``n`` counts every value given, ``n_finite`` the finite ones; all statistics are over the finite
    values. ``std``, ``ci_low`` and ``ci_high`` are NaN with fewer than two finite values; every
    field is NaN with none. ``confidence`` is the interval's level (0.95 for a 95% interval).
    """

    n: int
    n_finite: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the confidence interval's width (NaN when the interval is)."""
        return 0.5 * (self.ci_high - self.ci_low)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain numbers (JSON writers turn NaN into null)."""
        return asdict(self)

    def scaled(self, factor: float) -> Summary:
        """The summary of the values times ``factor`` (e.g. 100 for percent); a negative factor swaps the bounds."""
        low, high = sorted((self.ci_low * factor, self.ci_high * factor))
        lo_v, hi_v = sorted((self.min * factor, self.max * factor))
        return Summary(self.n, self.n_finite, self.mean * factor, self.std * abs(factor), low, high, lo_v, hi_v, self.confidence)

    def format(self, fmt: str = ".3g") -> str:
        """Compact text, e.g. ``"30.2 ± 34.6 (95% CI 0.4 to 60.0, n=5)"``; with non-finite values
        it says so (``n=5, 1 non-finite``), and with one finite value it gives no spread (``n=1``)."""
        level = f"{100 * self.confidence:g}%"
        if self.n_finite == self.n:
            count = f"n={self.n}"
        else:
            count = f"n={self.n}, {self.n - self.n_finite} non-finite"
        if self.n_finite == 0:
            return f"nan ({count})"
        if self.n_finite == 1:
            return f"{self.mean:{fmt}} ({count})"
        return f"{self.mean:{fmt}} ± {self.std:{fmt}} ({level} CI {self.ci_low:{fmt}} to {self.ci_high:{fmt}}, {count})"

    def __str__(self) -> str:
        return self.format()


def summarize(values: Iterable[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> Summary:
    """Summarize replicate values: mean, sample std, and the Student-t ``confidence`` interval of the mean.

    ``values`` is any iterable of numbers (floats, ints, 0-d tensors). Non-finite values are
    counted in ``n`` but not in ``n_finite`` and not in the statistics. The interval is
    ``mean ± t_{(1 + confidence) / 2, n_finite - 1} * std / sqrt(n_finite)``, clipped to ``bounds``
    (the range the quantity can take, e.g. ``(0, 1)`` for an accuracy) when given.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    all_values = [float(v) for v in values]
    finite = [v for v in all_values if math.isfinite(v)]
    n, k = len(all_values), len(finite)
    nan = math.nan
    if k == 0:
        return Summary(n, 0, nan, nan, nan, nan, nan, nan, confidence)
    mean = math.fsum(finite) / k
    if k == 1:
        return Summary(n, 1, mean, nan, nan, nan, finite[0], finite[0], confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (k - 1))
    half = t_quantile(0.5 * (1.0 + confidence), k - 1) * std / math.sqrt(k)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(n, k, mean, std, low, high, min(finite), max(finite), confidence)
