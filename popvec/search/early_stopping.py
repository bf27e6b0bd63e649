"""Early-stopping proxies usable with every selection policy: a wrapper that eliminates members
for a recorded reason before the wrapped policy decides.

Rules (each optional, all checked at every decision):

- **non-finite**: a NaN/inf training loss (the mean over the interval, so one bad step anywhere in
  it counts), validation loss or gradient norm: eliminated at once, whatever its rank.
- **gradient-norm explosion**: the member's largest gradient norm since the last decision exceeds
  ``grad_norm_threshold`` (the trainer tracks it when this rule is on; steps then run eagerly).
- **loss slope**: the least-squares slope of the training loss over the last ``slope_window``
  steps (at least 3 evaluations) is not negative.
- **patience**: ``metric`` has not improved by more than ``min_delta`` for ``patience`` steps.

``check_every`` adds decisions every that many steps, so a diverged member goes as soon as the next
check, not at the wrapped policy's next rung. The reasons land in the history (each eliminated
member's row has ``reason``). The last member standing is never eliminated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from popvec import checks
from popvec.selection import Decision, MetricsTable, SelectionPolicy, as_decision, rank

__all__ = ["EarlyStopping", "slope"]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (0.0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


@dataclass
class EarlyStopping:
    """Wrap ``policy`` (or nothing: only the rules) with early-stopping rules; see the module doc."""

    policy: SelectionPolicy | None = None
    nonfinite: bool = True
    grad_norm_threshold: float | None = None
    slope_window: int | None = None
    patience: int | None = None
    min_delta: float = 0.0
    check_every: int | None = None
    metric: str = "val_loss"
    descending: bool = False
    _inner_due: int | None = field(default=None, init=False, repr=False)
    _train: dict[int, list[tuple[float, float]]] = field(default_factory=dict, init=False, repr=False)
    _best: dict[int, tuple[float, int, float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        checks.optional_number("grad_norm_threshold", self.grad_norm_threshold, 0.0, low_open=True)
        checks.optional_integer("slope_window", self.slope_window)
        checks.optional_integer("patience", self.patience)
        checks.optional_integer("check_every", self.check_every)
        checks.number("min_delta", self.min_delta, 0.0)

    @property
    def needs_grad_norm(self) -> bool:
        """Asks the trainer to track each member's largest gradient norm between decisions."""
        return self.grad_norm_threshold is not None or bool(getattr(self.policy, "needs_grad_norm", False))

    def next_decision(self, step: int, n: int) -> int | None:
        self._inner_due = self.policy.next_decision(step, n) if self.policy is not None else None
        check = (step // self.check_every + 1) * self.check_every if self.check_every else None
        candidates = [c for c in (self._inner_due, check) if c is not None]
        return min(candidates) if candidates else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the rules remember per member (training losses, best metric), when the wrapped policy is
        due, and the wrapped policy's own state: plain data, saved in checkpoints so a resumed run stops
        the same members."""
        inner = self.policy.state_dict() if self.policy is not None and hasattr(self.policy, "state_dict") else None
        return {
            "inner_due": self._inner_due,
            "train": {member: [list(point) for point in points] for member, points in self._train.items()},
            "best": {member: list(best) for member, best in self._best.items()},
            "policy": inner,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the wrapped policy's part too)."""
        due = state["inner_due"]
        self._inner_due = None if due is None else int(due)
        self._train = {int(m): [(float(s), float(v)) for s, v in points] for m, points in state["train"].items()}
        self._best = {int(m): (float(score), int(at), float(value)) for m, (score, at, value) in state["best"].items()}
        if state.get("policy") is not None and self.policy is not None and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy"])

    # ------------------------------------------------------------------ rules
    def reason(self, table: MetricsTable, p: int) -> str | None:
        """Why member ``p`` (a position of ``table``) should stop now, or None."""
        cols, member = table.columns, table.ids[p]
        if self.nonfinite:
            for name in ("train_loss", "val_loss", "grad_norm_max"):
                if name in cols and not math.isfinite(cols[name][p]):
                    return f"non-finite {name} ({cols[name][p]}) at step {table.step}"
        if self.grad_norm_threshold is not None and "grad_norm_max" in cols:
            norm = cols["grad_norm_max"][p]
            if not norm <= self.grad_norm_threshold:  # NaN counts as an explosion too
                return f"gradient norm {norm:.4g} above the threshold {self.grad_norm_threshold:g} by step {table.step}"
        if self.slope_window is not None and "train_loss" in cols:
            points = [(s, v) for s, v in self._train.get(member, []) if s >= table.step - self.slope_window]
            if len(points) >= 3:
                k = slope(points)
                if k >= 0:
                    return f"training loss slope {k:+.3g}/step over the last {self.slope_window} steps is not negative"
        if self.patience is not None and member in self._best:
            _, at, best = self._best[member]
            if table.step - at >= self.patience:
                return f"no {self.metric} improvement for {table.step - at} steps (best {best:.4g} at step {at})"
        return None

    def _observe(self, table: MetricsTable) -> None:
        for p, member in enumerate(table.ids):
            if "train_loss" in table.columns:
                self._train.setdefault(member, []).append((float(table.step), table.columns["train_loss"][p]))
            if self.metric in table.columns:
                value = table.columns[self.metric][p]
                score = -value if self.descending else value
                best = self._best.get(member)
                better = best is None or (math.isfinite(score) and (not math.isfinite(best[0]) or score < best[0] - self.min_delta))
                if better:
                    self._best[member] = (score, table.step, value)

    def _forget(self, member: int) -> None:
        self._train.pop(member, None)
        self._best.pop(member, None)

    # ------------------------------------------------------------------ the decision
    def decide(self, table: MetricsTable) -> Decision:
        self._observe(table)
        reasons = {p: r for p in range(len(table)) if (r := self.reason(table, p)) is not None}
        survivors = [p for p in range(len(table)) if p not in reasons]
        if not survivors:  # never empty the population: keep the best of the flagged
            best = rank(table, self.metric if self.metric in table.columns else "val_loss", self.descending)[0]
            survivors = [best]
            reasons.pop(best)
        decision = Decision(survivors, reasons={table.ids[p]: r for p, r in reasons.items()})
        if self.policy is not None and self._inner_due == table.step:
            sub = MetricsTable(
                [table.ids[p] for p in survivors],
                {k: [v[p] for p in survivors] for k, v in table.columns.items()},
                step=table.step,
                hparams={k: [v[p] for p in survivors] for k, v in table.hparams.items()},
            )
            inner = as_decision(self.policy.decide(sub))
            keep = [survivors[q] for q in inner.keep]
            decision = Decision(
                keep,
                hparams=inner.hparams,
                ids=inner.ids,
                reasons={**inner.reasons, **decision.reasons},
                events=inner.events,
            )
        for p in reasons:
            self._forget(table.ids[p])
        # A position whose weights came from another member (an exploit copy) starts a new history.
        new_ids = decision.ids if decision.ids is not None else [table.ids[p] for p in decision.keep]
        for new_id, source in zip(new_ids, decision.keep):
            if new_id != table.ids[source]:
                self._forget(new_id)
        return decision
