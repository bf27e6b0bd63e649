"""Argument types for the ``popvec`` commands: parse a flag's text, then check it with :mod:`popvec.checks`.

Each factory returns a function for ``argparse``'s ``type=``. The range check is the library's own
(the same validators the functions behind the flags use), so ranges and their wording are defined
once; a bad value raises ``ArgumentTypeError`` with the allowed range, which the commands print as
one line (exit 2).
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

from popvec import checks

__all__ = [
    "seed",
    "integer",
    "number",
    "positive_int",
    "positive_int_or_auto",
    "positive_float",
    "nonnegative_float",
    "open_unit",
    "number_pair",
]

T = TypeVar("T")
_SUBJECT = "value"


def _checked(check: Callable[[str, Any], T], value: Any) -> T:
    """``check(value)``, its message (less the subject) re-raised for argparse."""
    try:
        return check(_SUBJECT, value)
    except ValueError as err:  # checks.CheckTypeError is a ValueError too
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"{_SUBJECT} ")) from None


def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An integer ``>= minimum`` (and ``<= maximum`` when given)."""
    check = functools.partial(checks.integer, minimum=minimum, maximum=maximum)

    def parse(text: str) -> int:
        try:
            value: Any = int(text)
        except ValueError:
            value = text  # not an integer: the check says what is allowed
        return _checked(check, value)

    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (each end open or closed)."""
    check = functools.partial(checks.number, low=low, high=high, low_open=low_open, high_open=high_open)

    def parse(text: str) -> float:
        try:
            value: Any = float(text)
        except ValueError:
            value = text  # not a number: the check says what is allowed
        return _checked(check, value)

    return parse


def number_pair(names: str = "LOW,HIGH", ordered: bool = True, minimum: float = -math.inf) -> Callable[[str], tuple[float, float]]:
    """Two comma-separated finite numbers ``>= minimum`` (``ordered``: first <= second)."""

    def parse(text: str) -> tuple[float, float]:
        parts = text.split(",")
        try:
            first, second = (float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {names} (two numbers), got {text!r}") from None
        try:
            for value in (first, second):
                checks.number(names, value, low=minimum)
        except ValueError:
            bound = f" and >= {minimum:g}" if minimum > -math.inf else ""
            raise argparse.ArgumentTypeError(f"{' and '.join(names.split(','))} must be finite{bound}, got {text!r}") from None
        if ordered and not first <= second:
            raise argparse.ArgumentTypeError(f"{names} needs the first <= the second, got {text}")
        return first, second

    return parse


def positive_int_or_auto(text: str) -> int | str:
    """An integer ``>= 1`` or the word ``auto`` (``--member-chunk-size``)."""
    if text == "auto":
        return text
    try:
        value: Any = int(text)
    except ValueError:
        value = text
    result = _checked(checks.integer_or_auto, value)
    assert result is not None
    return result


positive_int = integer(1)
positive_float = number(0.0, low_open=True)
nonnegative_float = number(0.0)
open_unit = number(0.0, 1.0, low_open=True, high_open=True)
#: ``--seed``: commands derive seeds ``seed + i`` (members, copies, data orders); 2**62 leaves room for those
#: below :data:`popvec.checks.MAX_SEED` (what ``torch.manual_seed`` and int64 seed tensors hold).
seed = integer(0, 2**62)
