"""Training in phases until a threshold, on the one loop: the stopping policy, the recorder, the records.

A phase trains every member until its accuracy on the phase's data reaches a threshold (or a step
cap): :class:`ThresholdStop` is that rule as a selection policy (its decisions freeze the members
that are done through the step mask), :class:`PhaseRecorder` a callback that keeps each member's
steps, gradient norms and stopping time, and :class:`PhaseRecord` what one phase measured.
Used by the warm-starting study (:mod:`popvec.studies.warmstart`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from popvec.callbacks import Callback
from popvec.data import TensorSplit
from popvec.population import Population
from popvec.selection import Decision, MetricsTable
from popvec.trainer import PopulationTrainer

__all__ = ["PhaseRecord", "PhaseRecorder", "ThresholdStop", "mean", "reached_threshold", "std"]


@dataclass
class PhaseRecord:
    """One phase: per-member lists (population positions) plus the phase's facts."""

    phase: int
    samples: int
    train_accuracy: list[float]
    test_accuracy: list[float]
    test_loss: list[float]
    steps: list[int]
    reached: list[bool]
    grad_norm: list[float]
    time_s: list[float]
    wall_time_s: float


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); NaN with fewer than two values (the spread is unknown, not 0)."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def reached_threshold(accuracy: Tensor | Sequence[float], threshold: float) -> list[bool]:
    """Which members' ``accuracy`` is >= ``threshold``, compared in float32 (the dtype evaluate returns).

    One comparison for the stopping rule and the phase records, so the two never disagree (a
    float32 accuracy such as 0.9 compares differently with a Python float than with its float32).
    """
    return (torch.as_tensor(accuracy, dtype=torch.float32).cpu() >= threshold).tolist()


@dataclass
class ThresholdStop:
    """One phase's stopping rule as a selection policy: train until the threshold or ``max_steps``.

    Decides at the phase's first global step ``start`` and every ``check_every`` steps after it,
    and at ``start + max_steps``. It keeps every member (never eliminates) and answers which stay
    active: a member stops, and is frozen by the step mask for the rest of the phase, once its
    ``val_accuracy`` (the study evaluates on the phase's training data) reaches ``threshold`` or
    the phase reaches ``max_steps``. ``phase`` (the phase index) travels with the state, so a
    resumed study knows which phase it was in.
    """

    threshold: float
    check_every: int
    max_steps: int
    start: int = 0
    phase: int = 0
    #: the global step of the last decision (a policy may decide at the current step only once)
    decided: int | None = None
    #: each member's answer at the last decision (None before the first one)
    active: list[bool] | None = None

    def _is_check(self, t: int) -> bool:
        return 0 <= t <= self.max_steps and (t % self.check_every == 0 or t == self.max_steps)

    def next_decision(self, step: int, n: int) -> int | None:
        t = step - self.start
        if self.decided != step and self._is_check(t):
            return step
        if t >= self.max_steps:
            return None
        return self.start + min((t // self.check_every + 1) * self.check_every, self.max_steps)

    def decide(self, table: MetricsTable) -> Decision:
        at_cap = table.step - self.start >= self.max_steps
        was = self.active if self.active is not None else [True] * len(table)
        reached = reached_threshold(table.columns["val_accuracy"], self.threshold)
        self.active = [a and not (r or at_cap) for a, r in zip(was, reached)]
        self.decided = table.step
        return Decision(keep=list(range(len(table))), active=list(self.active))

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "phase": self.phase, "decided": self.decided, "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.phase = int(state["start"]), int(state["phase"])
        self.decided = None if state["decided"] is None else int(state["decided"])
        self.active = None if state["active"] is None else [bool(a) for a in state["active"]]


class PhaseRecorder(Callback):
    """Keeps the per-member records of the phase in progress and the finished phases' :class:`PhaseRecord`.

    Per member: steps taken (the steps its mask was True), the sum of its gradient norms over those
    steps (``trainer.last_grad_norm``) and the study clock when it stopped. ``on_step(phase, step,
    active, population)`` (``step`` counted from the phase's start) is called after every step.
    ``state_dict`` holds everything, with the study's ``config``: a resumed study continues the
    records exactly (the clock continues from where it was saved) and refuses another study's state.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        on_step: Callable[[int, int, Tensor, Population], None] | None = None,
    ) -> None:
        self.config = dict(config or {})
        self.on_step_fn = on_step
        self.phases: list[PhaseRecord] = []
        self.policy: ThresholdStop | None = None
        self._origin = time.perf_counter()
        self._reset(0)

    def clock(self) -> float:
        """Seconds the study has run (across resumes)."""
        return time.perf_counter() - self._origin

    def begin_phase(self, policy: ThresholdStop, n: int) -> None:
        """Start the records of the phase ``policy`` stops (``n`` members, all active)."""
        self.policy = policy
        self._reset(n)

    def _reset(self, n: int) -> None:
        self.steps = torch.zeros(n, dtype=torch.long)
        self.grad_sum = torch.zeros(n, dtype=torch.float64)
        self.stopped_at = torch.full((n,), math.nan, dtype=torch.float64)
        self.active = torch.ones(n, dtype=torch.bool)
        self.phase_started = self.clock()

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: PopulationTrainer, steps: int) -> None:
        self._note_stops(trainer)  # a resumed checkpoint was taken right after a decision

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        active = _active_mask(trainer)
        norms = trainer.last_grad_norm
        if norms is not None:
            self.grad_sum += torch.where(active, norms.detach().cpu().double(), torch.zeros((), dtype=torch.float64))
        self.steps += active.long()
        if self.on_step_fn is not None:
            assert self.policy is not None
            self.on_step_fn(self.policy.phase, trainer.global_step - self.policy.start, active, trainer.population)

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self._note_stops(trainer)

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        self._note_stops(trainer)

    def _note_stops(self, trainer: PopulationTrainer) -> None:
        """Members that stopped since the last look get the phase's clock as their stop time."""
        active = _active_mask(trainer)
        self.stopped_at[self.active & ~active] = self.clock() - self.phase_started
        self.active = active

    # ------------------------------------------------------------------ the phase's record
    def end_phase(self, trainer: PopulationTrainer, split: TensorSplit, test: TensorSplit) -> PhaseRecord:
        """Evaluate on the phase's data and the test set; the phase's record, appended to ``phases``."""
        assert self.policy is not None
        train_metrics = trainer.evaluate(split)
        test_metrics = trainer.evaluate(test)
        mean_norm = torch.where(self.steps > 0, self.grad_sum / self.steps.clamp(min=1), torch.full_like(self.grad_sum, math.nan))
        record = PhaseRecord(
            phase=self.policy.phase,
            samples=len(split),
            train_accuracy=train_metrics["accuracy"].tolist(),
            test_accuracy=test_metrics["accuracy"].tolist(),
            test_loss=test_metrics["loss"].tolist(),
            steps=self.steps.tolist(),
            reached=reached_threshold(train_metrics["accuracy"], self.policy.threshold),
            grad_norm=mean_norm.tolist(),
            time_s=self.stopped_at.tolist(),
            wall_time_s=self.clock() - self.phase_started,
        )
        self.phases.append(record)
        return record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "phases": [asdict(p) for p in self.phases],
            "steps": self.steps.clone(),
            "grad_sum": self.grad_sum.clone(),
            "stopped_at": self.stopped_at.clone(),
            "active": self.active.clone(),
            "phase_started": self.phase_started,
            "clock": self.clock(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config:
            differ = sorted(k for k in {*state["config"], *self.config} if state["config"].get(k) != self.config.get(k))
            raise ValueError(f"the checkpoint belongs to another study (settings differ: {', '.join(differ)})")
        self.phases = [PhaseRecord(**p) for p in state["phases"]]
        self.steps, self.grad_sum = state["steps"].clone(), state["grad_sum"].clone()
        self.stopped_at, self.active = state["stopped_at"].clone(), state["active"].clone()
        self.phase_started = float(state["phase_started"])
        self._origin = time.perf_counter() - float(state["clock"])


def _active_mask(trainer: PopulationTrainer) -> Tensor:
    """A CPU copy of the trainer's step mask (all True while it has none)."""
    active = trainer.state.active
    return torch.ones(trainer.population.n, dtype=torch.bool) if active is None else active.to("cpu", copy=True)


#: Seeds of different phases lie this far apart (replicate r of phase p: ``seed + r + SEED_STRIDE * p``).
