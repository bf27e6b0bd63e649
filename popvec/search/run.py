"""Shared pieces of the search runners (Hyperband, PBT, staged fidelity): building a population
whose members carry sampled hyperparameters, the one-line-per-decision report, checkpoints and
resuming, the final leaderboard, and the search result.

A *resource unit* is a number of training steps (``unit_steps``, default 1): ``max_t=81`` with
``unit_steps=10`` trains the longest-lived members 810 steps.

**Resuming.** A runner given a ``run_dir`` checkpoints into ``run_dir / "checkpoint.pt"`` at every
decision (the trainer's atomic checkpoints); with ``resume=True`` it loads that checkpoint, when
there is one, into a trainer built exactly as before and calls ``fit`` with the same arguments,
which continues the run exactly. A search that trains several populations one after another keeps
the finished ones' results in a :class:`FinishedRuns` callback, so they are part of every later
checkpoint (one file, written atomically) and a resume skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from popvec import checks, optim
from popvec.callbacks import Callback, ConsoleReporter
from popvec.checkpoint import load_checkpoint
from popvec.engine import evaluate
from popvec.losses import LOSS_HPARAMS, cross_entropy
from popvec.population import Population
from popvec.selection import MetricsTable, rank
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer

__all__ = [
    "build_optimizer",
    "SearchResult",
    "make_trainer",
    "leaderboard",
    "finish_run",
    "cost_line",
    "SearchReporter",
    "FinishedRuns",
    "checkpoint_file",
    "resume_from",
]


@dataclass
class SearchResult:
    """What a search returns: the full history, the survivors ranked, and the winner."""

    history: dict[str, Any]
    leaderboard: list[dict[str, Any]]
    winner: nn.Module
    best: dict[str, Any]
    cost: dict[str, Any] = field(default_factory=dict)


def make_trainer(
    model_fn: Callable[[], nn.Module],
    values: Mapping[str, Sequence[float] | Tensor],
    optimizer: str = "adam",
    seed: int = 0,
    device: torch.device | str | None = None,
    console: Console | None = None,
    progress: bool = True,
    ids: Sequence[int] | None = None,
    seed_offset: int = 0,
    callbacks: Sequence[Callback] = (),
    precision: str = "fp32",
) -> PopulationTrainer:
    """A trainer over ``len(values[...])`` members, member j initialized with ``seed + seed_offset + j``
    and trained with the hyperparameters ``values[name][j]``; ids ``ids`` (default ``0..n-1``).

    Its callbacks: a :class:`~popvec.callbacks.ConsoleReporter` (the progress bar, no round tables),
    then ``callbacks`` (a runner's :class:`SearchReporter`, its :class:`FinishedRuns`, ...).
    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`popvec.precision`)."""
    n = len(next(iter(values.values())))
    population = Population.from_factory(model_fn, n, seed + seed_offset, device)
    if ids is not None:
        population.ids = torch.as_tensor(list(ids), dtype=torch.long)
    opt, loss_hparams = build_optimizer(optimizer, population, values)
    reporter = ConsoleReporter(console, progress, round_tables=False)  # the runners print one line per decision instead
    return PopulationTrainer(
        population,
        opt,
        loss_fn=cross_entropy,
        console=console,
        loss_hparams=loss_hparams,
        callbacks=[reporter, *callbacks],
        precision=precision,
    )


def leaderboard(
    trainer: PopulationTrainer,
    val_data: Any,
    test_data: Any | None = None,
    metric: str = "val_loss",
    descending: bool = False,
    extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The trainer's current members evaluated on ``val_data`` (and ``test_data``), best first,
    each with its hyperparameters (and ``extra[id]`` columns, e.g. its bracket)."""
    table: MetricsTable = trainer.checked_table(val_data)  # diverged members: NaN metrics, ranked last
    test = evaluate(trainer.population, test_data, trainer.loss_fn, precision=trainer.precision) if test_data is not None else None
    rows = []
    for place, p in enumerate(rank(table, metric, descending)):
        member = table.ids[p]
        row: dict[str, Any] = {"rank": place + 1, "id": member, "position": p}
        row.update((extra or {}).get(member, {}))
        row["val_loss"] = table.columns["val_loss"][p]
        row["val_accuracy"] = table.columns["val_accuracy"][p]
        row["diverged"] = bool(table.columns["diverged"][p])
        if test is not None:
            row["test_accuracy"] = float(test["accuracy"][p])
        row["hparams"] = {k: v[p] for k, v in table.hparams.items()}
        rows.append(row)
    return rows


def finish_run(
    trainer: PopulationTrainer,
    val_data: Any,
    test_data: Any | None = None,
    metric: str = "val_loss",
    descending: bool = False,
    extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], nn.Module]:
    """The :func:`leaderboard` of a trained population (rows without their positions) and its best
    member as a plain module."""
    rows = leaderboard(trainer, val_data, test_data, metric, descending, extra)
    winner = trainer.population.member(rows[0]["position"])
    for row in rows:
        row.pop("position", None)
    return rows, winner


def flat_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Leaderboard rows with the hyperparameters as columns (for a table)."""
    out = []
    for row in rows:
        flat = {k: v for k, v in row.items() if k not in ("hparams", "position")}
        for k, v in row.get("hparams", {}).items():
            flat[k] = float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v
        out.append(flat)
    return out


def cost_line(cost: Mapping[str, Any]) -> str:
    return (
        f"Cost: {cost['member_steps']} member-steps vs {cost['naive_member_steps']} to train every member for the "
        f"full budget ({100 * cost['fraction_of_naive']:.1f}%), {cost['samples_seen']} samples seen, "
        f"{cost['wall_time_s']:.1f} s"
    )


# ---------------------------------------------------------------------------- the report
class SearchReporter(Callback):
    """Prints one line per decision round of a search; subclasses write the line (:meth:`line`).

    Tracks the best member seen so far by ``metric`` (``self.best``: value, id, step, validation
    accuracy, hyperparameters). It saves no state: when ``fit`` starts, the best is recomputed from
    ``prior_rounds`` (rounds of the search's earlier runs, e.g. Hyperband's finished brackets) and
    the trainer's history (restored with a checkpoint), so a resumed run prints what an
    uninterrupted one would. ``names``: the hyperparameters to show (default: all).
    """

    def __init__(
        self,
        console: Console,
        metric: str = "val_loss",
        descending: bool = False,
        names: Sequence[str] = (),
        prior_rounds: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.console = console
        self.metric = metric
        self.descending = descending
        self.names = list(names)
        self.prior_rounds = list(prior_rounds)
        self.best: dict[str, Any] = {}

    def on_fit_start(self, trainer: PopulationTrainer, steps: int) -> None:
        self.best = {}
        for record in [*self.prior_rounds, *trainer.history["rounds"]]:
            self.observe(record)

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self.observe(record)
        self.console.print(self.line(record))

    def observe(self, record: Mapping[str, Any]) -> None:
        """Fold one round's members into the best so far (strictly better values only: ties keep the first)."""
        for row in record["members"]:
            value = row.get(self.metric, math.nan)
            if math.isnan(value) or (self.best and not self._better(value, self.best["value"])):
                continue
            self.best = {
                "value": value,
                "id": row["id"],
                "step": record["step"],
                "acc": row.get("val_accuracy", math.nan),
                "hparams": row.get("hparams", {}),
            }

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.descending else value < than

    def hparams_text(self) -> str:
        """The best member's hyperparameters, ``name=value`` for each of ``names``."""
        return ", ".join(f"{k}={v:.3g}" for k, v in self.best.get("hparams", {}).items() if not self.names or k in self.names)

    def line(self, record: Mapping[str, Any]) -> str:
        """The line printed after ``record``'s round (``self.best`` already includes it)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- checkpoints and resuming
def checkpoint_file(run_dir: str | Path | None, resume: bool) -> Path | None:
    """Where a runner checkpoints: ``run_dir / "checkpoint.pt"`` (the folder is created), None without
    ``run_dir``; ``resume=True`` needs a ``run_dir``."""
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs run_dir (the folder of the run to continue)")
        return None
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / CHECKPOINT_NAME


def resume_from(trainer: PopulationTrainer, path: Path | None) -> bool:
    """Load the checkpoint at ``path`` into ``trainer`` if there is one (True); else the run starts over
    (False), which is right after a crash before the first checkpoint."""
    if path is None or not path.is_file():
        trainer.console.print(f"No checkpoint at {path}: starting over")
        return False
    trainer.load_checkpoint(path)
    trainer.console.print(f"Resuming from {path} at step {trainer.global_step}")
    return True


class FinishedRuns(Callback):
    """The results of the finished runs of a search that trains one population after another.

    ``runs[k]``: run k's ``rounds``, ``cost``, leaderboard ``rows`` and its ``winner``'s state dict
    (plain data and tensors). Given to every later run's trainer as a callback, it is saved in each of
    that trainer's checkpoints, together with the run in progress, in one atomic file; so the run in
    progress is run ``len(runs)`` of the checkpoint's :meth:`saved` ledger, and a resume skips the others.
    """

    KEY = "finished_runs"

    def __init__(self, runs: Sequence[dict[str, Any]] = ()) -> None:
        self.runs = list(runs)

    def state_dict(self) -> dict[str, Any]:
        return {self.KEY: list(self.runs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.runs = list(state[self.KEY])

    @classmethod
    def saved(cls, path: Path | None) -> FinishedRuns:
        """The ledger saved in the checkpoint at ``path`` (empty when there is none)."""
        if path is None or not path.is_file():
            return cls()
        for state in (load_checkpoint(path, map_location="cpu").get("callbacks") or {}).values():
            if isinstance(state, Mapping) and cls.KEY in state:
                return cls(state[cls.KEY])
        return cls()

    def add(self, history: Mapping[str, Any], rows: list[dict[str, Any]], winner: nn.Module) -> None:
        """Record a run that just finished: its trainer's history, its leaderboard and its winner."""
        self.runs.append({"rounds": history["rounds"], "cost": history["cost"], "rows": rows, "winner": winner.state_dict()})

    def rounds(self) -> list[dict[str, Any]]:
        """Every finished run's decision rounds, in order."""
        return [record for run in self.runs for record in run["rounds"]]

    def winner(self, member: int, population: Population) -> nn.Module:
        """The finished runs' winner with id ``member``, rebuilt as a module shaped like ``population``'s members."""
        state = next(run["winner"] for run in self.runs if run["rows"][0]["id"] == member)
        module = population.member(0)
        module.load_state_dict(state)
        return module


def build_optimizer(
    kind: str, population: Population, values: Mapping[str, Sequence[float] | Tensor]
) -> tuple[optim.PopulationOptimizer, dict[str, Tensor]]:
    """A vectorized optimizer with per-member ``values`` (by name) and the loss hyperparameters.

    Names the optimizer does not take and that are not loss hyperparameters are refused, naming
    the hyperparameter and what ``kind`` accepts.
    """
    checks.choice("optimizer", kind, optim.OPTIMIZERS)
    known = optim.OPTIMIZER_HPARAMS[kind]
    loss = {}
    kwargs: dict[str, Any] = {}
    for name, v in values.items():
        if name in LOSS_HPARAMS:
            loss[name] = checks.member_values(name, v, population.n, population.device)
        elif name in known:
            kwargs[name] = v
        else:
            raise ValueError(f"hyperparameter {name!r} does not apply to {kind} (it takes {', '.join(known + LOSS_HPARAMS)})")
    return optim.make(kind, population, **kwargs), loss
