"""Learning-rate schedules as small composable multipliers, per member.

A schedule maps each member's step count ``t`` (``[N]``, the number of updates already taken) to a
factor ``[N]`` that multiplies the member's base learning rate. Every numeric field may be a float
(shared) or a length-N tensor (one value per member); tensor fields follow members through
``select``. They match the closed forms of ``torch.optim.lr_scheduler``'s StepLR,
CosineAnnealingLR, LinearLR and CosineAnnealingWarmRestarts.

>>> schedule = warmup(100, cosine(900))        # linear warmup, then cosine decay
>>> schedule = step_decay(30, gamma=0.1) * warmup(5, start_factor=0.1)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from popvec import checks

__all__ = [
    "Schedule",
    "constant",
    "step_decay",
    "cosine",
    "warmup",
    "cosine_restarts",
]

Value = float | Tensor


class Schedule:
    """Base class: ``schedule(t) -> factor``, both ``[N]`` tensors."""

    def __call__(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def __mul__(self, other: Schedule) -> Schedule:
        return _Product(self, other)

    def select(self, index: Tensor) -> Schedule:
        """The schedule of the members ``index`` (tensor fields are gathered; others kept)."""
        changes: dict[str, Tensor | Schedule] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() == 1:
                changes[f.name] = value.index_select(0, index.to(value.device))
            elif isinstance(value, Schedule):
                changes[f.name] = value.select(index)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(self, device: torch.device | str) -> Schedule:
        changes = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, (Tensor, Schedule)):
                changes[f.name] = value.to(device)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class _Constant(Schedule):
    def __call__(self, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=torch.float32)


@dataclass(frozen=True)
class _StepDecay(Schedule):
    step_size: Value
    gamma: Value

    def __call__(self, t: Tensor) -> Tensor:
        exponent = torch.div(t, self.step_size, rounding_mode="floor")
        return torch.as_tensor(self.gamma, dtype=torch.float32, device=t.device) ** exponent


@dataclass(frozen=True)
class _Cosine(Schedule):
    total_steps: Value
    min_factor: Value

    def __call__(self, t: Tensor) -> Tensor:
        progress = torch.clamp(t / self.total_steps, max=1.0)
        return self.min_factor + (1 - self.min_factor) * (1 + torch.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class _Warmup(Schedule):
    warmup_steps: Value
    start_factor: Value
    after: Schedule

    def __call__(self, t: Tensor) -> Tensor:
        ramp = self.start_factor + (1 - self.start_factor) * torch.clamp(t / self.warmup_steps, max=1.0)
        later = self.after(torch.clamp(t - self.warmup_steps, min=0))
        return torch.where(t < self.warmup_steps, ramp, later)


@dataclass(frozen=True)
class _CosineRestarts(Schedule):
    first_cycle: Value
    cycle_mult: float
    min_factor: Value

    def __call__(self, t: Tensor) -> Tensor:
        t = t.float()
        if self.cycle_mult == 1:
            length = torch.as_tensor(self.first_cycle, dtype=torch.float32, device=t.device).expand_as(t)
            t_cur = torch.remainder(t, length)
        else:
            # cycle k spans first * (mult**k - 1) / (mult - 1) ... ; find k in closed form.
            k = torch.floor(torch.log(t / self.first_cycle * (self.cycle_mult - 1) + 1) / math.log(self.cycle_mult))
            start = self.first_cycle * (self.cycle_mult**k - 1) / (self.cycle_mult - 1)
            t_cur = t - start
            length = self.first_cycle * self.cycle_mult**k
        return self.min_factor + (1 - self.min_factor) * (1 + torch.cos(math.pi * t_cur / length)) / 2


@dataclass(frozen=True)
class _Product(Schedule):
    left: Schedule
    right: Schedule

    def __call__(self, t: Tensor) -> Tensor:
        return self.left(t) * self.right(t)


def constant() -> Schedule:
    """Factor 1 forever."""
    return _Constant()


def step_decay(step_size: Value, gamma: Value = 0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (``StepLR``)."""
    checks.number_or_tensor("step_size", step_size, 0.0, low_open=True)
    return _StepDecay(step_size, gamma)


def cosine(total_steps: Value, min_factor: Value = 0.0) -> Schedule:
    """Half-cosine from 1 to ``min_factor`` over ``total_steps``, then flat (``CosineAnnealingLR``)."""
    checks.number_or_tensor("total_steps", total_steps, 0.0, low_open=True)
    return _Cosine(total_steps, min_factor)


def warmup(warmup_steps: Value, after: Schedule | None = None, start_factor: Value = 0.0) -> Schedule:
    """Linear ramp from ``start_factor`` to 1 over ``warmup_steps`` (``LinearLR``), then ``after``.

    ``after`` sees steps counted from the end of the warmup.
    """
    checks.number_or_tensor("warmup_steps", warmup_steps, 0.0, low_open=True)
    return _Warmup(warmup_steps, start_factor, after or constant())


def cosine_restarts(first_cycle: Value, cycle_mult: float = 1.0, min_factor: Value = 0.0) -> Schedule:
    """Cosine decay restarted every cycle; cycles grow by ``cycle_mult`` (``CosineAnnealingWarmRestarts``)."""
    checks.number_or_tensor("first_cycle", first_cycle, 0.0, low_open=True)
    checks.number("cycle_mult", cycle_mult, 1.0)
    return _CosineRestarts(first_cycle, float(cycle_mult), min_factor)
