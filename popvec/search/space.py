"""Declared hyperparameter search spaces and their seeded sampling to one value per member.

A :class:`SearchSpace` maps hyperparameter names to distributions (:class:`LogUniform`,
:class:`Uniform`, :class:`Choice`). ``space.sample(n, seed)`` draws one value per member; each
name has its own stream (seeded by ``seed`` and the name), so adding a hyperparameter to a space
does not change the values drawn for the others. Names are those of the vectorized optimizers
(``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``beta1``, ``beta2``, ``eps``,
``max_grad_norm``) and of per-member losses (``label_smoothing``, see :mod:`popvec.losses`);
:func:`popvec.search.run.build_optimizer` turns sampled values into an optimizer plus loss
hyperparameters. Spaces load from TOML or YAML with :func:`popvec.search.files.load_space`::

    [space]
    lr = { distribution = "loguniform", low = 1e-4, high = 1e-1 }
    weight_decay = { distribution = "uniform", low = 0.0, high = 1e-3 }
    momentum = { distribution = "choice", values = [0.0, 0.9] }
    beta2 = 0.99            # a plain number: fixed for every member
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from popvec import checks

__all__ = [
    "LogUniform",
    "Uniform",
    "Choice",
    "SearchSpace",
]


@dataclass(frozen=True)
class LogUniform:
    """``exp(U(log low, log high))``, ``0 < low <= high``; continuous (PBT perturbs it)."""

    low: float
    high: float
    continuous = True

    def check(self, name: str) -> None:
        low, high = checks.number(f"{name}.low", self.low), checks.number(f"{name}.high", self.high)
        if not 0 < low <= high:
            raise ValueError(f"{name}: loguniform needs 0 < low <= high, got low={low}, high={high}")

    def draw(self, rng: np.random.Generator, n: int) -> list[float]:
        values = np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))
        return np.clip(values, self.low, self.high).tolist()

    def clip(self, value: float) -> float:
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class Uniform:
    """``U(low, high)``, ``low <= high``; continuous (PBT perturbs it)."""

    low: float
    high: float
    continuous = True

    def check(self, name: str) -> None:
        low, high = checks.number(f"{name}.low", self.low), checks.number(f"{name}.high", self.high)
        if not low <= high:
            raise ValueError(f"{name}: uniform needs low <= high, got low={low}, high={high}")

    def draw(self, rng: np.random.Generator, n: int) -> list[float]:
        return np.clip(rng.uniform(self.low, self.high, n), self.low, self.high).tolist()

    def clip(self, value: float) -> float:
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class Choice:
    """One of ``values`` uniformly (PBT's explore moves to a neighbouring value)."""

    values: tuple[float, ...]
    continuous = False

    def __init__(self, values: Sequence[float]) -> None:
        object.__setattr__(self, "values", tuple(values) if isinstance(values, (list, tuple)) else values)

    def check(self, name: str) -> None:
        if not isinstance(self.values, tuple) or not self.values:
            raise ValueError(f"{name}: choice needs a non-empty list of values, got {self.values!r}")
        for i, v in enumerate(self.values):
            checks.number(f"{name}.values[{i}]", v)

    def draw(self, rng: np.random.Generator, n: int) -> list[float]:
        return [float(self.values[i]) for i in rng.integers(0, len(self.values), n)]

    def neighbour(self, value: float, direction: int) -> float:
        """The value ``direction`` (-1/+1) places from the one nearest ``value``, clipped to the ends."""
        here = min(range(len(self.values)), key=lambda i: abs(self.values[i] - value))
        return float(self.values[min(max(here + direction, 0), len(self.values) - 1)])


Distribution = LogUniform | Uniform | Choice
_KINDS = {"loguniform": LogUniform, "log_uniform": LogUniform, "log-uniform": LogUniform, "uniform": Uniform, "choice": Choice}


class SearchSpace:
    """Named distributions; sampling is seeded per (seed, name)."""

    def __init__(self, params: Mapping[str, Distribution]) -> None:
        if not params:
            raise ValueError("a search space needs at least one hyperparameter")
        for name, dist in params.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"hyperparameter names must be non-empty strings, got {name!r}")
            if not isinstance(dist, (LogUniform, Uniform, Choice)):
                raise TypeError(f"{name}: expected LogUniform, Uniform or Choice, got {type(dist).__name__}")
            dist.check(name)
        self.params: dict[str, Distribution] = dict(params)

    def __repr__(self) -> str:
        return f"SearchSpace({self.params})"

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @staticmethod
    def _rng(seed: int, name: str) -> np.random.Generator:
        return np.random.default_rng([seed % 2**63, zlib.crc32(name.encode())])

    def sample(self, n: int, seed: int = 0) -> dict[str, list[float]]:
        """``n`` values per hyperparameter (Python floats, within the declared bounds)."""
        checks.integer("n", n)
        return {name: dist.draw(self._rng(seed, name), n) for name, dist in self.params.items()}

    def sample_tensors(self, n: int, seed: int = 0, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """``sample`` as ``[n]`` float32 tensors."""
        return {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in self.sample(n, seed).items()}

    def resample(self, name: str, rng: random.Random) -> float:
        """One fresh value of ``name`` drawn with ``rng``."""
        dist = self.params[name]
        return dist.draw(np.random.default_rng(rng.getrandbits(63)), 1)[0]

    def perturb(self, name: str, value: float, factor: float) -> float:
        """PBT's explore step: a continuous value times ``factor`` (clipped to the bounds); a choice
        moves one place down (``factor < 1``) or up."""
        dist = self.params[name]
        if isinstance(dist, Choice):
            return dist.neighbour(value, -1 if factor < 1 else 1)
        return dist.clip(value * factor)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], where: str = "space") -> SearchSpace:
        """From ``{name: {"distribution": ..., "low": ..., "high": ...} | {"values": [...]} | number | [numbers]}``."""
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"{where} must be a non-empty table of hyperparameters, got {spec!r}")
        params: dict[str, Distribution] = {}
        for name, entry in spec.items():
            key = f"{where}.{name}"
            if isinstance(entry, (int, float)) and not isinstance(entry, bool):
                params[name] = Choice([checks.number(key, entry)])
            elif isinstance(entry, list):
                params[name] = Choice([checks.number(f"{key}[{i}]", v) for i, v in enumerate(entry)])
            elif isinstance(entry, Mapping):
                kind = entry.get("distribution", entry.get("type"))
                if kind is None and "values" in entry:
                    kind = "choice"
                if kind not in _KINDS:
                    raise ValueError(f"{key}.distribution must be one of loguniform, uniform, choice, got {kind!r}")
                allowed = {"distribution", "type", "values"} if _KINDS[kind] is Choice else {"distribution", "type", "low", "high"}
                unknown = set(entry) - allowed
                if unknown:
                    raise ValueError(f"{key}: unknown keys {sorted(unknown)} for a {kind} distribution")
                if _KINDS[kind] is Choice:
                    values = entry.get("values")
                    if not isinstance(values, list) or not values:
                        raise ValueError(f"{key}.values must be a non-empty list, got {values!r}")
                    params[name] = Choice([checks.number(f"{key}.values[{i}]", v) for i, v in enumerate(values)])
                else:
                    for bound in ("low", "high"):
                        if bound not in entry:
                            raise ValueError(f"{key}.{bound} is missing")
                    params[name] = _KINDS[kind](checks.number(f"{key}.low", entry["low"]), checks.number(f"{key}.high", entry["high"]))
            else:
                raise ValueError(f"{key} must be a table, a number or a list of numbers, got {entry!r}")
        try:
            return cls(params)
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, dist in self.params.items():
            if isinstance(dist, Choice):
                out[name] = {"distribution": "choice", "values": list(dist.values)}
            else:
                out[name] = {
                    "distribution": "loguniform" if isinstance(dist, LogUniform) else "uniform",
                    "low": dist.low,
                    "high": dist.high,
                }
        return out


_MOVED = {
    "load_config": "popvec.search.files",
    "load_space": "popvec.search.files",
    "build_optimizer": "popvec.search.run",
    "OPTIMIZERS": "popvec.optim",
    "OPTIMIZER_HPARAMS": "popvec.optim",
}


def __getattr__(name: str) -> Any:
    """Names that lived here before the module was split still import from here."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
