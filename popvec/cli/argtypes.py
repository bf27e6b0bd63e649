"""Argument types for the ``popvec`` commands: parse a flag's text and check its range.

Each factory returns a function for ``argparse``'s ``type=``; a bad value raises
``ArgumentTypeError`` with the allowed range, which the commands print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["integer", "number", "positive_int", "positive_float", "nonnegative_float", "open_unit", "number_pair"]


def integer(minimum: int = 1) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (each end open or closed)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    return parse


def number_pair(names: str = "LOW,HIGH", ordered: bool = True, minimum: float = -math.inf) -> Callable[[str], tuple[float, float]]:
    """Two comma-separated finite numbers ``>= minimum`` (``ordered``: first <= second)."""

    def parse(text: str) -> tuple[float, float]:
        parts = text.split(",")
        try:
            first, second = (float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {names} (two numbers), got {text!r}") from None
        if not all(math.isfinite(v) and v >= minimum for v in (first, second)):
            raise argparse.ArgumentTypeError(f"{' and '.join(names.split(','))} must be finite and >= {minimum:g}, got {text!r}")
        if ordered and not first <= second:
            raise argparse.ArgumentTypeError(f"{names} needs the first <= the second, got {text}")
        return first, second

    return parse


positive_int = integer(1)
positive_float = number(0.0, low_open=True)
nonnegative_float = number(0.0)
open_unit = number(0.0, 1.0, low_open=True, high_open=True)
