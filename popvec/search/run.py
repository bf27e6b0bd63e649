"""Shared pieces of the search runners (Hyperband, PBT, staged fidelity): building a population
whose members carry sampled hyperparameters, the final leaderboard, and the search result.

A *resource unit* is a number of training steps (``unit_steps``, default 1): ``max_t=81`` with
``unit_steps=10`` trains the longest-lived members 810 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from popvec.callbacks import ConsoleReporter
from popvec.engine import evaluate
from popvec.losses import cross_entropy
from popvec.population import Population
from popvec.search.space import build_optimizer
from popvec.selection import rank, MetricsTable
from popvec.trainer import PopulationTrainer

__all__ = ["SearchResult", "make_trainer", "leaderboard", "cost_line"]


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
) -> PopulationTrainer:
    """A trainer over ``len(values[...])`` members, member j initialized with ``seed + seed_offset + j``
    and trained with the hyperparameters ``values[name][j]``; ids ``ids`` (default ``0..n-1``)."""
    n = len(next(iter(values.values())))
    population = Population.from_factory(model_fn, n, seed + seed_offset, device)
    if ids is not None:
        population.ids = torch.as_tensor(list(ids), dtype=torch.long)
    opt, loss_hparams = build_optimizer(optimizer, population, values)
    reporter = ConsoleReporter(console, progress, round_tables=False)  # the runners print one line per decision instead
    return PopulationTrainer(population, opt, loss_fn=cross_entropy, console=console, loss_hparams=loss_hparams, callbacks=[reporter])


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
    table: MetricsTable = trainer.metrics_table(val_data)
    test = evaluate(trainer.population, test_data, trainer.loss_fn) if test_data is not None else None
    rows = []
    for place, p in enumerate(rank(table, metric, descending)):
        member = table.ids[p]
        row: dict[str, Any] = {"rank": place + 1, "id": member, "position": p}
        row.update((extra or {}).get(member, {}))
        row["val_loss"] = table.columns["val_loss"][p]
        row["val_accuracy"] = table.columns["val_accuracy"][p]
        if test is not None:
            row["test_accuracy"] = float(test["accuracy"][p])
        row["hparams"] = {k: v[p] for k, v in table.hparams.items()}
        rows.append(row)
    return rows


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
