"""Argument validators: one definition of every range and message, used across popvec.

Each validator checks one argument and returns it normalized (an ``int``, a ``float``, an ``[n]``
tensor of per-member values, an int64 index tensor) or raises with a one-line message that names
the argument, says what it accepts and shows what it got::

    integer("num_models", 0)          # ValueError: num_models must be an integer >= 1, got 0
    unit_interval("fraction", 1.5, high_open=True)   # fraction must lie in [0, 1), got 1.5

A value of the right kind outside the allowed set raises :class:`InvalidArgument` (a
``ValueError``). A value of the wrong kind (a bool or a float where an integer is needed, a string
where a number is) raises :class:`CheckTypeError`, which is a ``TypeError`` and also an
:class:`InvalidArgument`, so code that caught ``ValueError`` from the checks this module replaced
keeps working. The ``popvec`` command prints either as one line (exit 2).

Rules shared by every validator:

* a bool is never a number or an integer (``True`` is not 1 member, nor a learning rate of 1);
* a number must be finite unless the validator says otherwise (``allow_inf``): NaN fails every
  range, because each comparison is written as ``not (low <= v)``, never ``v < low``;
* a float is never an integer, even ``2.0``; NumPy integer and floating scalars are accepted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MAX_SEED",
    "CheckTypeError",
    "InvalidArgument",
    "seed",
    "device",
    "model_fn",
    "labels",
    "xy_batch",
    "integer",
    "optional_integer",
    "number",
    "optional_number",
    "unit_interval",
    "number_or_tensor",
    "choice",
    "member_values",
    "integers",
    "positions",
]

T = TypeVar("T")
INF = math.inf


#: The largest seed: ``torch.manual_seed`` and the int64 seed tensors of the loaders hold it.
MAX_SEED = 2**63 - 1


class InvalidArgument(ValueError):
    """An argument outside what it accepts: the one-line message names it and the allowed values."""


class CheckTypeError(TypeError, InvalidArgument):
    """A value of the wrong kind. Both a ``TypeError`` and (for callers written against the
    earlier checks) a ``ValueError``."""


# ---------------------------------------------------------------------------- predicates
def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _in_interval(v: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    """``v`` in the interval; False for NaN (every comparison is written to fail on NaN)."""
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return bool(above and below)


def _fmt(bound: float) -> str:
    return f"{bound:g}"


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open or high == INF else ']'}"


def _number_phrase(low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool, optional: bool = False) -> str:
    """What a number check accepts, after "must": ``be a finite number > 0``, ``lie in (0, 1]``."""
    kind = "a number" if allow_inf else "a finite number"
    prefix = "be None or " if optional else "be "
    if low == -INF and high == INF:
        return f"{prefix}{kind}"
    if high == INF:
        return f"{prefix}{kind} {'>' if low_open else '>='} {_fmt(low)}"
    if low == -INF:
        return f"{prefix}{kind} {'<' if high_open else '<='} {_fmt(high)}"
    interval = _interval(low, high, low_open, high_open)
    return f"{prefix}{kind} in {interval}" if optional else f"lie in {interval}"


def _integer_phrase(minimum: int | None, maximum: int | None, optional: bool = False) -> str:
    prefix = "be None or " if optional else "be "
    if minimum is not None and maximum is not None:
        return f"{prefix}an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"{prefix}an integer >= {minimum}"
    if maximum is not None:
        return f"{prefix}an integer <= {maximum}"
    return f"{prefix}an integer"


def _check_bounds(low: float, high: float) -> None:
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"bounds must satisfy low <= high, got low={low!r}, high={high!r}")


# ---------------------------------------------------------------------------- scalars
def integer(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None``: unbounded on that side).

    Bools and floats (even ``2.0``) raise :class:`CheckTypeError`; out of range raises ``ValueError``.
    """
    return _integer(name, value, minimum, maximum, optional=False)


def optional_integer(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None) -> int | None:
    """``None``, or ``value`` checked as by :func:`integer`."""
    return None if value is None else _integer(name, value, minimum, maximum, optional=True)


def integer_or_auto(name: str, value: Any, minimum: int = 1) -> int | str | None:
    """``None``, ``"auto"``, or an integer ``>= minimum`` (e.g. ``member_chunk_size``); else a one-line ValueError."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if _is_integer(value) and value >= minimum:
        return int(value)
    raise ValueError(f"{name} must be an integer >= {minimum}, 'auto' or None, got {value!r}")


def _integer(name: str, value: Any, minimum: int | None, maximum: int | None, optional: bool) -> int:
    is_integer = _is_integer(value)
    if is_integer and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    error = InvalidArgument if is_integer else CheckTypeError
    raise error(f"{name} must {_integer_phrase(minimum, maximum, optional)}, got {value!r}")


def number(
    name: str,
    value: Any,
    low: float = -INF,
    high: float = INF,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a ``float`` in the interval from ``low`` to ``high`` (each end open or closed).

    NaN always fails; ``inf`` fails unless ``allow_inf`` (and the interval holds it). Bools and
    non-numbers raise :class:`CheckTypeError`.
    """
    return _number(name, value, low, high, low_open, high_open, allow_inf, optional=False)


def optional_number(
    name: str,
    value: Any,
    low: float = -INF,
    high: float = INF,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """``None``, or ``value`` checked as by :func:`number`."""
    return None if value is None else _number(name, value, low, high, low_open, high_open, allow_inf, optional=True)


def _number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool, optional: bool) -> float:
    _check_bounds(low, high)
    is_real = _is_real(value)
    if is_real:
        try:
            v = float(value)
        except OverflowError:  # an int too large for a float
            v = INF if value > 0 else -INF
        if (allow_inf or math.isfinite(v)) and _in_interval(v, low, high, low_open, high_open):
            return v
    error = InvalidArgument if is_real else CheckTypeError
    raise error(f"{name} must {_number_phrase(low, high, low_open, high_open, allow_inf, optional)}, got {value!r}")


def unit_interval(name: str, value: Any, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in ``[0, 1]``, either end open: ``unit_interval("fraction", f, True, True)`` is (0, 1)."""
    return number(name, value, 0.0, 1.0, low_open, high_open)


def number_or_tensor(
    name: str,
    value: Any,
    low: float = -INF,
    high: float = INF,
    low_open: bool = False,
    high_open: bool = False,
) -> float | Tensor:
    """A number checked as by :func:`number`, or a real tensor of any shape whose every entry is.

    Returns the float, or the tensor itself (unchanged). For per-member fields whose member count
    is not known yet (schedules); with a known count use :func:`member_values`.
    """
    if not isinstance(value, Tensor):
        return number(name, value, low, high, low_open, high_open)
    _check_bounds(low, high)
    if value.dtype == torch.bool or value.is_complex():
        raise CheckTypeError(f"{name} must be a number or a tensor of real numbers, got dtype {value.dtype}")
    if value.numel() and not bool(_member_ok(value.detach().double(), low, high, low_open, high_open, False).all()):
        raise InvalidArgument(
            f"{name} must be {_member_phrase(low, high, low_open, high_open, False)} for every entry, got {value.tolist()}"
        )
    return value


def choice(name: str, value: T, allowed: Collection[Any]) -> T:
    """``value`` if it is one of ``allowed`` (a bool never stands in for 0 or 1), else ``ValueError``."""

    def same(a: Any) -> bool:
        try:
            return (a is value) or (_is_bool(a) == _is_bool(value) and bool(a == value))
        except (TypeError, ValueError, RuntimeError):  # arrays, tensors: ambiguous truth values
            return False

    if not any(same(a) for a in allowed):
        raise InvalidArgument(f"{name} must be one of {', '.join(str(a) for a in allowed)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------- per-member values
def _member_phrase(low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool) -> str:
    """``finite and >= 0``, ``finite and in [0, 1)``, ``> 0 (inf allowed)``."""
    if high == INF and low == -INF:
        cond = ""
    elif high == INF:
        cond = f"{'>' if low_open else '>='} {_fmt(low)}"
    elif low == -INF:
        cond = f"{'<' if high_open else '<='} {_fmt(high)}"
    else:
        cond = f"in {_interval(low, high, low_open, high_open)}"
    if allow_inf:
        return f"{cond} (inf allowed)" if cond else "a number (not NaN)"
    return f"finite and {cond}" if cond else "finite"


def _member_ok(values: Tensor, low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool) -> Tensor:
    """Per entry: in the interval (NaN is never; ``inf`` only with ``allow_inf``)."""
    above = values > low if low_open else values >= low
    below = values < high if high_open else values <= high
    ok = above & below
    return ok if allow_inf else ok & torch.isfinite(values)


def member_values(
    name: str,
    value: Any,
    n: int,
    device: torch.device | str | None = None,
    low: float = -INF,
    high: float = INF,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> Tensor:
    """A number (shared) or one number per member (a length-``n`` sequence, array or tensor) as a
    fresh ``[n]`` float32 tensor on ``device`` (the CPU when None).

    Bools (alone, in a sequence or as a bool tensor) and non-numbers raise
    :class:`CheckTypeError`; the wrong length, a non-finite entry (unless ``allow_inf``: then only
    NaN) or an entry outside the interval raises ``ValueError``. The range is checked on the
    float32 values that will be used.
    """
    _check_bounds(low, high)
    kind = f"{name} must be a number or one number per member"
    if _is_bool(value) or (isinstance(value, (list, tuple)) and any(_is_bool(v) for v in value)):
        raise CheckTypeError(f"{kind}, got a bool")
    try:
        values = value if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise CheckTypeError(f"{kind}, got {value!r}") from None
    if values.dtype == torch.bool:
        raise CheckTypeError(f"{kind}, got a bool")
    if values.is_complex():
        raise CheckTypeError(f"{kind}, got dtype {values.dtype}")
    values = values.detach().to(torch.float32)
    if values.dim() == 0:
        values = values.expand(n)
    if values.shape != (n,):
        raise InvalidArgument(f"{name} must be a float or have one value per member (length {n}), got shape {tuple(values.shape)}")
    if not bool(_member_ok(values, low, high, low_open, high_open, allow_inf).all()):
        raise InvalidArgument(
            f"{name} must be {_member_phrase(low, high, low_open, high_open, allow_inf)} for every member, got {values.tolist()}"
        )
    return values.to(device if device is not None else "cpu").clone()


# ---------------------------------------------------------------------------- positions
def _integer_dtype(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def integers(name: str, values: Any) -> Tensor:
    """A 1-D sequence, array or tensor of integers (possibly empty) as an int64 CPU tensor.

    Bools and floats raise :class:`CheckTypeError` (they are neither silently truncated nor read as
    positions); any other shape raises ``ValueError``.
    """
    kind = f"{name} must be a 1-D sequence of integers"
    if _is_bool(values) or (isinstance(values, (list, tuple)) and any(_is_bool(v) for v in values)):
        raise CheckTypeError(f"{kind}, got bools {values!r}")
    try:
        index = values if isinstance(values, Tensor) else torch.as_tensor(values if isinstance(values, np.ndarray) else list(values))
    except (TypeError, ValueError, RuntimeError):
        raise CheckTypeError(f"{kind}, got {values!r}") from None
    if index.numel() == 0 and index.dim() == 1:
        return torch.zeros(0, dtype=torch.long)
    if not _integer_dtype(index):
        raise CheckTypeError(f"{kind}, got dtype {index.dtype}")
    if index.dim() != 1:
        raise InvalidArgument(f"{kind}, got shape {tuple(index.shape)}")
    return index.detach().cpu().long()


def positions(
    name: str,
    values: Any,
    n: int,
    device: torch.device | str | None = None,
    allow_empty: bool = False,
) -> Tensor:
    """Member positions: integers in ``[0, n)`` as an int64 tensor on ``device`` (the input's
    device when None). Repeats are allowed (they copy a member). Non-empty unless ``allow_empty``.

    Bools (a mask is not a list of positions) and floats raise :class:`CheckTypeError`.
    """
    if isinstance(values, Tensor):
        index = values
        if not _integer_dtype(index):
            raise CheckTypeError(f"{name} must be integers, got dtype {index.dtype}")
    else:
        if _is_bool(values) or (isinstance(values, (list, tuple)) and any(_is_bool(v) for v in values)):
            raise CheckTypeError(f"{name} must be integers (member positions), got bools {values!r}")
        try:
            index = torch.as_tensor(values if isinstance(values, np.ndarray) else list(values))
        except (TypeError, ValueError, RuntimeError):
            raise CheckTypeError(f"{name} must be a 1-D sequence of member positions, got {values!r}") from None
        if index.numel() == 0:
            index = index.long()
        elif not _integer_dtype(index):
            raise CheckTypeError(f"{name} must be integers, got dtype {index.dtype}")
    if index.dim() != 1 or (index.numel() == 0 and not allow_empty):
        what = "a 1-D sequence" if allow_empty else "a non-empty 1-D sequence"
        raise InvalidArgument(f"{name} must be {what} of member positions, got shape {tuple(index.shape)}")
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            raise InvalidArgument(f"{name} must lie in [0, {n - 1}] for a population of {n} members, got {lo}..{hi}")
    return index.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------- seeds, devices, models, labels
def seed(name: str, value: Any, n: int = 1) -> int:
    """A seed as an ``int`` in ``[0, MAX_SEED - (n - 1)]``: ``n`` consecutive seeds ``value + i`` all fit."""
    return integer(name, value, 0, MAX_SEED - (n - 1))


def device(name: str, value: Any) -> torch.device:
    """``value`` (a ``torch.device`` or a string such as ``"cpu"``, ``"cuda:1"``) as a ``torch.device``;
    a CUDA device on a machine without CUDA is refused."""
    if isinstance(value, torch.device) and not (value.type == "cuda" and not torch.cuda.is_available()):
        return value
    if not isinstance(value, (str, int)) or _is_bool(value):
        raise CheckTypeError(f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {value!r}")
    try:
        result = torch.device(value)
    except RuntimeError:
        raise InvalidArgument(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:0', got {value!r}") from None
    if result.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"{name} is {value!r} but CUDA is not available; use 'cpu'")
    return result


def model_fn(name: str, value: Any) -> Any:
    """A callable returning a new ``nn.Module`` (a class, a function, a lambda); not a module itself."""
    if isinstance(value, torch.nn.Module):
        raise CheckTypeError(
            f"{name} must be a callable returning a new nn.Module; got an nn.Module instance ({type(value).__name__}): "
            f"pass its class or a lambda that builds one"
        )
    if not callable(value):
        raise CheckTypeError(f"{name} must be a callable returning a new nn.Module, got {type(value).__name__}")
    return value


def labels(name: str, y: Tensor, num_classes: int) -> None:
    """Class labels: an integer tensor with every entry in ``[0, num_classes)`` (one reduction, one host sync)."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise CheckTypeError(f"{name} must hold integer class labels in [0, {num_classes - 1}], got dtype {y.dtype}")
    if y.numel():
        lo, hi = torch.stack([y.min(), y.max()]).tolist()
        if lo < 0 or hi >= num_classes:
            raise InvalidArgument(
                f"{name} must hold class labels in [0, {num_classes - 1}] (the model has {num_classes} outputs), got {lo}..{hi}"
            )


def xy_batch(name: str, batch: Any) -> tuple[Tensor, Tensor]:
    """One batch of ``name`` as ``(x, y)``: a pair (tuple or list) of tensors, else :class:`CheckTypeError`."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise CheckTypeError(f"{name} must yield (x, y) pairs of tensors, got a batch of type {type(batch).__name__}")
    return batch[0], batch[1]
