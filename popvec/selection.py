"""Selection policies: look at a table of metrics per member, answer with the members to keep.

Policies know nothing of tensors or models. The trainer asks ``next_decision(step, n)`` when to
stop and consult the policy next, evaluates the members, builds a :class:`MetricsTable`, and
applies ``decide(table)`` (positions to keep, reorder or copy) to every stacked tensor at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from popvec import checks

__all__ = ["MetricsTable", "SelectionPolicy", "SuccessiveHalving", "Decision", "as_decision", "rank", "elimination_schedule"]


@dataclass
class MetricsTable:
    """One row per member position: ``ids[i]`` and ``columns[name][i]`` (plain floats), taken at ``step``."""

    ids: list[int]
    columns: dict[str, list[float]] = field(default_factory=dict)
    step: int = 0
    #: each member's current hyperparameters by name (optimizer and loss), for policies that edit them (PBT)
    hparams: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.columns.items():
            if len(values) != len(self.ids):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(self.ids)} members")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[dict[str, float | int]]:
        return [{"id": i, **{k: v[p] for k, v in self.columns.items()}} for p, i in enumerate(self.ids)]


def rank(table: MetricsTable, metric: str, descending: bool = False) -> list[int]:
    """Positions sorted best first by ``metric`` (NaN last), ties broken by member id then position."""
    checks.choice("metric", metric, sorted(table.columns))
    values = table.columns[metric]

    def key(p: int) -> tuple[bool, float, int, int]:
        v = values[p]
        bad = math.isnan(v)
        return (bad, 0.0 if bad else (-v if descending else v), table.ids[p], p)

    return sorted(range(len(table)), key=key)


@runtime_checkable
class SelectionPolicy(Protocol):
    """When to decide next, and what to keep."""

    def next_decision(self, step: int, n: int) -> int | None:
        """The global step at which to evaluate and decide next, or None for no more decisions."""
        ...

    def decide(self, table: MetricsTable) -> list[int] | Decision:
        """Positions of the members to keep (repeats copy a member), or a :class:`Decision`."""
        ...


@dataclass
class Decision:
    """A policy's full answer; ``decide`` may return this or just the list of positions to keep.

    ``keep``: positions to keep (repeats copy a member: weights, optimizer state, hyperparameters).
    ``hparams``: ``{name: {new_position: value}}`` set after the selection (PBT's explore).
    ``ids``: the member id of each new position (default: the id of the member it came from; PBT
    gives a recipient its own id back). ``reasons``: ``{member_id: why}`` for members eliminated
    for a reason worth recording (early stopping, rung pruning). ``events``: free-form records kept
    in the round (PBT lineage). ``active``: which new positions train from now on (one bool each);
    the others are frozen by the step mask (weights, buffers, optimizer state kept exactly) until a
    later decision activates them, and training ends when none is active (warm-start phases).
    """

    keep: list[int]
    hparams: dict[str, dict[int, float]] = field(default_factory=dict)
    ids: list[int] | None = None
    reasons: dict[int, str] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    active: list[bool] | None = None

    def __post_init__(self) -> None:
        self.keep = [int(p) for p in self.keep]
        if self.ids is not None and len(self.ids) != len(self.keep):
            raise ValueError(f"ids must have one entry per kept position ({len(self.keep)}), got {len(self.ids)}")
        if self.active is not None and len(self.active) != len(self.keep):
            raise ValueError(f"active must have one entry per kept position ({len(self.keep)}), got {len(self.active)}")


def as_decision(answer: Decision | list[int]) -> Decision:
    """A policy's answer (a :class:`Decision` or a list of positions) as a :class:`Decision`."""
    return answer if isinstance(answer, Decision) else Decision(list(answer))


def elimination_schedule(num_models: int, reduce_factor: float) -> list[int]:
    """Population sizes round by round: ``[n, max(1, int(n * rf)), ...]`` down to 1."""
    sizes = [num_models]
    while sizes[-1] > 1:
        sizes.append(max(1, int(sizes[-1] * reduce_factor)))
    return sizes


def check_reduce_factor(reduce_factor: float) -> None:
    """The fraction of members kept each round: a number in (0, 1)."""
    checks.unit_interval("reduce_factor", reduce_factor, low_open=True, high_open=True)


@dataclass
class SuccessiveHalving:
    """Every ``interval`` steps keep the best ``max(1, int(n * reduce_factor))`` members.

    Ranking is by ``metric`` (validation loss by default) ascending, ties by member id; members
    whose metric is NaN rank last. Decisions stop once one member remains. With ``final_step``
    (the end of the budget), a last decision there keeps only the best member if more remain.
    This is the progressive elimination of the Multiple Initializations framework;
    ``reduce_factor`` is the fraction kept, in (0, 1) (Hyperband's ``reduction_factor`` is the
    integer eta a rung divides by: keeping 1/3 is ``reduce_factor=1/3`` here, ``reduction_factor=3`` there).
    """

    interval: int
    reduce_factor: float = 0.5
    metric: str = "val_loss"
    descending: bool = False
    final_step: int | None = None

    def __post_init__(self) -> None:
        checks.integer("interval (num_elim_steps)", self.interval)
        check_reduce_factor(self.reduce_factor)

    def next_decision(self, step: int, n: int) -> int | None:
        if n <= 1:
            return None
        regular = (step // self.interval + 1) * self.interval
        return regular if self.final_step is None else min(regular, self.final_step)

    def decide(self, table: MetricsTable) -> list[int]:
        final = self.final_step is not None and table.step >= self.final_step
        keep = 1 if final else max(1, int(len(table) * self.reduce_factor))
        return rank(table, self.metric, self.descending)[:keep]
