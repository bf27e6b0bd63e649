"""Hyperband (Li et al. 2018) and successive-halving / ASHA-style rungs over one stack.

Bracket arithmetic follows the paper, in resource units (a unit is ``unit_steps`` training steps):
``s_max = floor(log_eta(max_t / grace_period))`` (an integer loop, no float log), bracket ``s``
starts ``n = ceil((s_max + 1) / (s + 1) * eta**s)`` members at ``r = max_t * eta**-s`` units, and
rung ``i`` (``n_i = floor(n / eta**i)`` members at ``r_i = r * eta**i`` units) keeps the best
``floor(n_i / eta)``. The last rung of every bracket is at ``max_t``. Names as in Ray Tune and
Optuna: ``max_t`` / ``max_resource``, ``grace_period`` / ``min_resource``, ``reduction_factor``
(eta, default 3: a rung keeps 1/eta; not the elimination trainer's ``reduce_factor``, which is the
fraction kept), ``brackets`` (how many brackets, most aggressive first; 1 = plain successive
halving).

**Brackets run side by side in one stack** by default: every member of every bracket starts at
step 0 and the :class:`HyperbandPolicy` prunes each bracket at its own rungs. All brackets end at
``max_t``, so the whole search takes ``max_t`` global steps instead of the sum over brackets, and
each step is one vmapped call over all live members, which is where popvec's speed comes from (a
small bracket alone leaves the device idle). Member-steps are the same either way; only the peak
stack size (the sum of the bracket sizes) grows. ``side_by_side=False`` runs the brackets one
after another (same members, inits, batches and decisions) when that peak does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from popvec import checks
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.precision import check_precision
from popvec.search.early_stopping import EarlyStopping
from popvec.search.run import FinishedRuns, SearchReporter, SearchResult, checkpoint_file, cost_line, finish_run, make_trainer, resume_from
from popvec.search.space import SearchSpace
from popvec.selection import Decision, MetricsTable, rank

__all__ = ["Rung", "Bracket", "s_max", "hyperband_brackets", "HyperbandPolicy", "HyperbandReporter", "hyperband", "RULES"]

RULES = ("sha", "asha")


@dataclass(frozen=True)
class Rung:
    """Rung ``index`` of a bracket: ``members`` alive after ``resource`` units in total, ``keep`` promoted."""

    index: int
    resource: int
    members: int
    keep: int


@dataclass(frozen=True)
class Bracket:
    """Bracket ``s``: its rungs, first to last (the last at ``max_t`` keeps everyone it has)."""

    s: int
    rungs: tuple[Rung, ...]

    @property
    def n(self) -> int:
        return self.rungs[0].members

    @property
    def r(self) -> int:
        return self.rungs[0].resource

    @property
    def member_resource(self) -> int:
        """Resource units the bracket spends: ``sum_i n_i * (r_i - r_{i-1})``."""
        total, previous = 0, 0
        for rung in self.rungs:
            total += rung.members * (rung.resource - previous)
            previous = rung.resource
        return total


def _alias(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name} and {alias} name the same setting; got {name}={value!r} and {alias}={alias_value!r}")
    chosen = value if value is not None else alias_value
    return default if chosen is None else chosen


def s_max(max_t: int, grace_period: int = 1, reduction_factor: int = 3) -> int:
    """``floor(log_eta(max_t / grace_period))``: the largest s with ``grace_period * eta**s <= max_t``."""
    s = 0
    while grace_period * reduction_factor ** (s + 1) <= max_t:
        s += 1
    return s


def hyperband_brackets(
    max_t: int | None = None,
    grace_period: int | None = None,
    reduction_factor: int = 3,
    brackets: int | None = None,
    *,
    max_resource: int | None = None,
    min_resource: int | None = None,
) -> list[Bracket]:
    """The brackets of Hyperband, most aggressive (``s = s_max``) first; see the module doc."""
    max_t = checks.integer("max_t", _alias("max_t", max_t, "max_resource", max_resource, None))
    grace = checks.integer("grace_period", _alias("grace_period", grace_period, "min_resource", min_resource, 1))
    checks.integer("reduction_factor", reduction_factor, minimum=2)
    if grace > max_t:
        raise ValueError(f"grace_period must be <= max_t, got grace_period={grace}, max_t={max_t}")
    eta = reduction_factor
    top = s_max(max_t, grace, eta)
    count = top + 1 if brackets is None else checks.integer("brackets", brackets)
    if count > top + 1:
        raise ValueError(
            f"brackets must be at most s_max + 1 = {top + 1} for max_t={max_t}, grace_period={grace}, reduction_factor={eta}; got {count}"
        )
    out = []
    for s in range(top, top - count, -1):
        n = -(-(top + 1) * eta**s // (s + 1))  # ceil((s_max + 1) / (s + 1) * eta**s), exactly
        rungs = []
        for i in range(s + 1):
            members = n // eta**i
            resource = max(grace, math.floor(Fraction(max_t, eta ** (s - i)) + Fraction(1, 2)))
            keep = members // eta if i < s else members
            rungs.append(Rung(i, resource, members, keep))
        out.append(Bracket(s, tuple(rungs)))
    return out


@dataclass
class HyperbandPolicy:
    """Prunes each bracket at its rungs; members are assigned to brackets by id.

    ``rule="sha"``: a rung keeps exactly the planned ``floor(n_i / eta)`` best (fewer only if
    members left early). ``rule="asha"``: a rung keeps the members within the best ``1/eta``
    quantile of every value recorded at that resource so far (this and earlier decisions, all
    brackets), ASHA's promotion test made synchronous. Ranking: ``metric`` ascending (or
    descending), NaN last, ties by id. Knows nothing of tensors.
    """

    brackets: Sequence[Bracket]
    bracket_of: Mapping[int, int]
    unit_steps: int = 1
    reduction_factor: int = 3
    metric: str = "val_loss"
    descending: bool = False
    rule: str = "sha"
    _records: dict[int, list[float]] = field(default_factory=dict, init=False, repr=False)
    _alive: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        checks.choice("rule", self.rule, RULES)
        checks.integer("unit_steps", self.unit_steps)
        self._by_s = {b.s: b for b in self.brackets}
        unknown = set(self.bracket_of.values()) - set(self._by_s)
        if unknown:
            raise ValueError(f"bracket_of names brackets {sorted(unknown)} that are not in brackets")
        self._alive = set(self.bracket_of.values())

    def state_dict(self) -> dict[str, Any]:
        """What the policy remembers, as plain data: the values recorded at each rung resource (ASHA's
        pool) and the brackets still running; checkpoints save it so a resumed search decides the same."""
        return {"records": {int(r): list(v) for r, v in self._records.items()}, "alive": sorted(self._alive)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self._records = {int(r): [float(v) for v in values] for r, values in state["records"].items()}
        self._alive = {int(s) for s in state["alive"]}

    def rung_at(self, s: int, step: int) -> Rung | None:
        for rung in self._by_s[s].rungs:
            if rung.resource * self.unit_steps == step:
                return rung
        return None

    def next_decision(self, step: int, n: int) -> int | None:
        steps = [r.resource * self.unit_steps for s in self._alive for r in self._by_s[s].rungs]
        later = [t for t in steps if t > step]
        return min(later) if later else None

    def decide(self, table: MetricsTable) -> Decision:
        groups: dict[int, list[int]] = {}
        for p, member in enumerate(table.ids):
            groups.setdefault(self.bracket_of[member], []).append(p)
        self._alive = set(groups)
        values = table.columns[self.metric]
        cutoffs = self._asha_cutoffs(table, groups) if self.rule == "asha" else {}
        keep: set[int] = set()
        reasons: dict[int, str] = {}
        events = []
        for s, positions in sorted(groups.items(), reverse=True):
            rung = self.rung_at(s, table.step)
            if rung is None:
                keep.update(positions)
                continue
            sub = MetricsTable([table.ids[p] for p in positions], {self.metric: [values[p] for p in positions]}, table.step)
            order = [positions[q] for q in rank(sub, self.metric, self.descending)]
            if rung.index == len(self._by_s[s].rungs) - 1:
                kept = order
            elif self.rule == "sha":
                kept = order[: max(1, min(len(order), rung.keep))]
            else:
                cutoff = cutoffs[rung.resource]
                kept = [p for p in order if self._within(values[p], cutoff)] or order[:1]
            keep.update(kept)
            pruned = [p for p in order if p not in set(kept)]
            for place, p in enumerate(order):
                if p in pruned:
                    reasons[table.ids[p]] = (
                        f"bracket {s} rung {rung.index} ({table.step} steps): {self.metric} {values[p]:.4g} ranked "
                        f"{place + 1} of {len(order)}; {len(kept)} continue"
                    )
            events.append(
                {
                    "bracket": s,
                    "rung": rung.index,
                    "resource": rung.resource,
                    "step": table.step,
                    "alive": len(order),
                    "kept": len(kept),
                    "kept_ids": [table.ids[p] for p in kept],
                    "pruned_ids": [table.ids[p] for p in pruned],
                    "best_id": table.ids[order[0]],
                    "best": values[order[0]],
                }
            )
            if rung.index == len(self._by_s[s].rungs) - 1:
                self._alive.discard(s)
        return Decision(sorted(keep), reasons=reasons, events=events)

    def _within(self, value: float, cutoff: float | None) -> bool:
        if math.isnan(value):
            return False
        return cutoff is None or (value >= cutoff if self.descending else value <= cutoff)

    def _asha_cutoffs(self, table: MetricsTable, groups: dict[int, list[int]]) -> dict[int, float | None]:
        """Per rung resource reached now: the 1/eta-quantile of all values recorded there so far."""
        values = table.columns[self.metric]
        fresh: dict[int, list[float]] = {}
        for s, positions in groups.items():
            rung = self.rung_at(s, table.step)
            if rung is not None:
                fresh.setdefault(rung.resource, []).extend(values[p] for p in positions)
        cutoffs: dict[int, float | None] = {}
        for resource, current in fresh.items():
            pool = [v for v in [*self._records.get(resource, []), *current] if not math.isnan(v)]
            q = 100 / self.reduction_factor
            cutoffs[resource] = float(np.percentile(pool, 100 - q if self.descending else q)) if pool else None
            self._records.setdefault(resource, []).extend(current)
        return cutoffs


# ---------------------------------------------------------------------------- the runner
class HyperbandReporter(SearchReporter):
    """After each decision: ``step N | alive per bracket s2:3 s1:5 ... | best so far: id, metric, accuracy (hparams)``."""

    def __init__(
        self,
        console: Console,
        bracket_of: Mapping[int, int],
        metric: str = "val_loss",
        descending: bool = False,
        names: Sequence[str] = (),
        prior_rounds: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(console, metric, descending, names, prior_rounds)
        self.bracket_of = bracket_of

    def line(self, record: Mapping[str, Any]) -> str:
        alive: dict[int, int] = {}
        for member in record["kept_ids"]:
            alive[self.bracket_of[member]] = alive.get(self.bracket_of[member], 0) + 1
        per = " ".join(f"s{s}:{alive.get(s, 0)}" for s in sorted(set(self.bracket_of.values()), reverse=True))
        line = f"step {record['step']} | alive per bracket {per}"
        if self.best:
            best = self.best
            line += (
                f" | best so far: id {best['id']} {self.metric} {best['value']:.4f}, val acc {100 * best['acc']:.2f}% "
                f"({self.hparams_text()})"
            )
        return line


def hyperband(
    model_fn: Callable[[], nn.Module],
    space: SearchSpace,
    train: TensorSplit,
    val: Any,
    test: Any | None = None,
    *,
    max_t: int | None = None,
    grace_period: int | None = None,
    reduction_factor: int = 3,
    brackets: int | None = None,
    max_resource: int | None = None,
    min_resource: int | None = None,
    unit_steps: int = 1,
    optimizer: str = "adam",
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    rule: str = "sha",
    side_by_side: bool = True,
    metric: str = "val_loss",
    descending: bool = False,
    early_stopping: Mapping[str, Any] | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    precision: str = "fp32",
) -> SearchResult:
    """Run Hyperband over ``space`` on ``train`` (a device-resident split), ranking by ``metric`` on ``val``.

    Members are numbered bracket by bracket (most aggressive first); member j is initialized with
    ``seed + j`` and gets the j-th sampled hyperparameters (``space.sample(N, seed)``). Every
    bracket sees the same shared batch order (``DeviceLoader(train, batch_size, seed=seed)``).
    ``early_stopping``: keyword arguments of :class:`~popvec.search.early_stopping.EarlyStopping`.
    ``run_dir``: checkpoint into ``run_dir / "checkpoint.pt"`` at every decision; ``resume=True``
    continues from that checkpoint (or starts over when there is none yet) and ends as an
    uninterrupted run would (call with the same arguments); one bracket after another, it skips the
    brackets already finished. Returns the history (rounds, bracket table, cost), the survivors
    ranked (with ``test`` accuracy when given) and the winner as a plain module. ``precision``:
    ``"fp32"``, ``"bf16"`` or ``"fp16"`` for training and evaluation (see :mod:`popvec.precision`).
    """
    console = console or Console()
    check_precision(precision)
    table = hyperband_brackets(max_t, grace_period, reduction_factor, brackets, max_resource=max_resource, min_resource=min_resource)
    checks.integer("unit_steps", unit_steps)
    checks.integer("batch_size", batch_size)
    checks.choice("rule", rule, RULES)
    path = checkpoint_file(run_dir, resume)
    total = sum(b.n for b in table)
    bracket_of: dict[int, int] = {}
    blocks: list[tuple[Bracket, list[int]]] = []
    for b in table:
        ids = list(range(len(bracket_of), len(bracket_of) + b.n))
        bracket_of.update((i, b.s) for i in ids)
        blocks.append((b, ids))
    values = space.sample(total, seed)
    torch.manual_seed(seed)  # dropout and every other draw follow the seed (resume restores the saved RNG)
    max_steps = table[0].rungs[-1].resource * unit_steps
    extra = {i: {"bracket": s} for i, s in bracket_of.items()}

    def policy_for(bs: Sequence[Bracket], ids: Sequence[int]) -> Any:
        policy: Any = HyperbandPolicy(list(bs), {i: bracket_of[i] for i in ids}, unit_steps, reduction_factor, metric, descending, rule)
        return EarlyStopping(policy, metric=metric, descending=descending, **early_stopping) if early_stopping else policy

    layout = "side by side in one stack" if side_by_side else "one bracket after another"
    console.print(
        f"Hyperband: {len(table)} bracket(s) {[b.n for b in table]} = {total} members, max_t {table[0].rungs[-1].resource} units "
        f"x {unit_steps} step(s), eta {reduction_factor}, rule {rule}, {layout}"
    )
    runs = [(table, list(bracket_of))] if side_by_side else [([b], ids) for b, ids in blocks]
    # The run in progress when the checkpoint was written is the first one its ledger does not hold.
    finished = FinishedRuns.saved(path) if resume else FinishedRuns()
    first = len(finished.runs)
    if first:
        console.print(f"Brackets {[b.s for bs, _ in runs[:first] for b in bs]} already finished: skipped")
    for index in range(first, len(runs)):
        bs, ids = runs[index]
        offset = ids[0]
        reporters = [HyperbandReporter(console, bracket_of, metric, descending, space.names, finished.rounds())] if progress else []
        trainer = make_trainer(
            model_fn,
            {k: v[offset : offset + len(ids)] for k, v in values.items()},
            optimizer,
            seed,
            device,
            console,
            progress,
            ids=ids,
            seed_offset=offset,
            callbacks=[finished, *reporters],
            precision=precision,
        )
        if resume and index == first:
            resume_from(trainer, path)
        trainer.fit(
            DeviceLoader(train, batch_size, seed=seed), val, max_steps, policy_for(bs, ids), checkpoint_path=path, on_round=on_round
        )
        rows, winner = finish_run(trainer, val, test, metric, descending, extra)
        finished.add(trainer.history, rows, winner)
    rows = [row for run in finished.runs for row in run["rows"]]
    ranked = MetricsTable([r["id"] for r in rows], {metric: [r[metric] for r in rows]})
    rows = [{**rows[p], "rank": place + 1} for place, p in enumerate(rank(ranked, metric, descending))]
    costs = [run["cost"] for run in finished.runs]
    cost = {
        "member_steps": sum(c["member_steps"] for c in costs),
        "naive_member_steps": total * max_steps,
        "samples_seen": sum(c["samples_seen"] for c in costs),
        "wall_time_s": sum(c["wall_time_s"] for c in costs),
        "global_steps": sum(c["global_steps"] for c in costs),
    }
    cost["fraction_of_naive"] = cost["member_steps"] / cost["naive_member_steps"]
    history = {
        "kind": "hyperband",
        "config": {
            "max_t": table[0].rungs[-1].resource,
            "grace_period": grace_period or min_resource or 1,
            "reduction_factor": reduction_factor,
            "brackets": len(table),
            "unit_steps": unit_steps,
            "rule": rule,
            "side_by_side": side_by_side,
            "metric": metric,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "seed": seed,
            "space": space.to_dict(),
        },
        "brackets": [
            {"s": b.s, "n": b.n, "r": b.r, "rungs": [vars(r) for r in b.rungs], "member_steps": b.member_resource * unit_steps}
            for b in table
        ],
        "members": {str(i): {"bracket": bracket_of[i], "hparams": {k: v[i] for k, v in values.items()}} for i in range(total)},
        "rounds": finished.rounds(),
        "leaderboard": rows,
        "cost": cost,
    }
    console.print(cost_line(cost))
    best = rows[0]
    return SearchResult(history, rows, finished.winner(best["id"], trainer.population), best, cost)
