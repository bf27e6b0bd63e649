"""Population-based training (Jaderberg et al. 2017) as a selection policy over one stack.

Every ``perturbation_interval`` steps the members are ranked by ``metric``; each member of the
bottom ``quantile_fraction`` (``ceil(n * q)`` members, at most ``floor(n / 2)``, as in Ray Tune)
*exploits* a member drawn from the top quantile: its position becomes a copy of the donor
(weights, buffers, optimizer state, step count, hyperparameters, data order: one index in the
trainer's ``select``), and keeps its own id. Then it *explores*: each hyperparameter of the search
space is resampled with probability ``resample_probability``, otherwise multiplied by 0.8 or 1.2
(continuous, clipped to the declared bounds) or moved to a neighbouring value (choice). Every
exploit is recorded (step, recipient, donor, their metrics, the donor's and the new
hyperparameters) in the round's ``events`` and in :attr:`PBT.lineage`.

The policy's randomness depends only on ``(seed, step)``, so a resumed run decides the same.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from popvec import checks
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.precision import check_precision
from popvec.search.early_stopping import EarlyStopping
from popvec.search.run import SearchReporter, SearchResult, checkpoint_file, cost_line, finish_run, make_trainer, resume_from
from popvec.search.space import SearchSpace
from popvec.selection import Decision, MetricsTable, rank

__all__ = ["PBT", "PBTReporter", "quantile_size", "pbt"]


def quantile_size(n: int, quantile_fraction: float) -> int:
    """How many members sit in the bottom (and top) quantile: ``ceil(n * q)``, at most ``n // 2``."""
    k = math.ceil(n * quantile_fraction - 1e-12)
    return min(k, n // 2)


@dataclass
class PBT:
    """Exploit/explore every ``perturbation_interval`` steps; see the module doc."""

    perturbation_interval: int
    space: SearchSpace
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple[float, float] = (0.8, 1.2)
    metric: str = "val_loss"
    descending: bool = False
    seed: int = 0
    hyperparameters: Sequence[str] | None = None
    final_step: int | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks.integer("perturbation_interval", self.perturbation_interval)
        checks.number("quantile_fraction", self.quantile_fraction, 0.0, 0.5, low_open=True)
        checks.unit_interval("resample_probability", self.resample_probability)
        names = list(self.space.names if self.hyperparameters is None else self.hyperparameters)
        unknown = [k for k in names if k not in self.space.params]
        if unknown:
            raise ValueError(f"hyperparameters {unknown} are not in the search space ({self.space.names})")
        self.names = names

    def state_dict(self) -> dict[str, Any]:
        """The lineage so far (plain data); the policy's randomness depends only on ``(seed, step)``, so this
        is all a resumed run needs to record the same history."""
        return {"lineage": copy.deepcopy(self.lineage)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.lineage = copy.deepcopy(list(state["lineage"]))

    def next_decision(self, step: int, n: int) -> int | None:
        """The next multiple of ``perturbation_interval``; none at or after ``final_step`` (no last copy)."""
        nxt = (step // self.perturbation_interval + 1) * self.perturbation_interval
        return None if self.final_step is not None and nxt >= self.final_step else nxt

    def explore(self, hparams: Mapping[str, float], rng: random.Random) -> tuple[dict[str, float], dict[str, str]]:
        """New values for ``self.names`` from the donor's ``hparams``, and how each was made."""
        new, how = dict(hparams), {}
        for name in self.names:
            if rng.random() < self.resample_probability:
                new[name] = self.space.resample(name, rng)
                how[name] = "resample"
            else:
                factor = rng.choice(self.perturbation_factors)
                new[name] = self.space.perturb(name, hparams[name], factor)
                how[name] = f"x{factor:g}"
        return new, how

    def decide(self, table: MetricsTable) -> Decision:
        n = len(table)
        order = rank(table, self.metric, self.descending)
        k = quantile_size(n, self.quantile_fraction)
        keep = list(range(n))
        if k == 0:
            return Decision(keep, ids=list(table.ids))
        missing = [name for name in self.names if name not in table.hparams]
        if missing:
            raise ValueError(f"the trainer has no hyperparameters {missing} to explore (it has {sorted(table.hparams)})")
        rng = random.Random(self.seed * 1_000_003 + table.step)
        top, bottom = order[:k], order[-k:]
        updates: dict[str, dict[int, float]] = {name: {} for name in self.names}
        events = []
        values = table.columns[self.metric]
        for recipient in sorted(bottom):
            donor = rng.choice(top)
            keep[recipient] = donor
            donor_hparams = {name: v[donor] for name, v in table.hparams.items()}
            new, how = self.explore(donor_hparams, rng)
            for name in self.names:
                updates[name][recipient] = new[name]
            event = {
                "step": table.step,
                "recipient": table.ids[recipient],
                "donor": table.ids[donor],
                "recipient_metric": values[recipient],
                "donor_metric": values[donor],
                "old_hparams": {name: v[recipient] for name, v in table.hparams.items()},
                "donor_hparams": donor_hparams,
                "new_hparams": {name: new[name] for name in table.hparams},
                "explore": how,
            }
            events.append(event)
            self.lineage.append(event)
        return Decision(keep, hparams=updates, ids=list(table.ids), events=events)


class PBTReporter(SearchReporter):
    """After each perturbation: ``step N | n members | exploits: 3<-1, ... | best so far: id, metric at step (hparams)``."""

    def line(self, record: Mapping[str, Any]) -> str:
        exploits = ", ".join(f"{e['recipient']}<-{e['donor']}" for e in record.get("events", []))
        best = self.best
        return (
            f"step {record['step']} | {len(record['kept_ids'])} members | exploits: {exploits or 'none'} | "
            f"best so far: id {best.get('id')} {self.metric} {best.get('value', math.nan):.4f} at step {best.get('step')} "
            f"({self.hparams_text()})"
        )


def pbt(
    model_fn: Callable[[], nn.Module],
    space: SearchSpace,
    train: TensorSplit,
    val: Any,
    test: Any | None = None,
    *,
    num_models: int = 16,
    population: int | None = None,
    perturbation_interval: int = 50,
    steps: int = 1000,
    quantile_fraction: float = 0.25,
    resample_probability: float = 0.25,
    optimizer: str = "adam",
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
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
    """Run PBT with ``num_models`` members sampled from ``space`` for ``steps`` steps.

    ``population`` is the earlier name of ``num_models`` (still accepted).

    Member j is initialized with ``seed + j`` and the j-th sampled hyperparameters; batches are
    shared (``DeviceLoader(train, batch_size, seed=seed)``). ``early_stopping``: keyword arguments
    of :class:`~popvec.search.early_stopping.EarlyStopping` (members it eliminates are not replaced).
    ``run_dir``: checkpoint into ``run_dir / "checkpoint.pt"`` at every perturbation; ``resume=True``
    continues from that checkpoint (or starts over when there is none yet) and ends as an
    uninterrupted run would (call with the same arguments). ``precision``: ``"fp32"``, ``"bf16"``
    or ``"fp16"`` for training and evaluation (see :mod:`popvec.precision`).
    """
    console = console or Console()
    check_precision(precision)
    if population is not None:
        if num_models != 16 and num_models != population:
            raise ValueError(f"num_models and population name the same setting; got {num_models} and {population}")
        num_models = population
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        checks.integer(name, value)
    checks.integer("num_models", num_models, 2)  # exploit copies one member onto another
    if checks.integer("perturbation_interval", perturbation_interval) >= steps:
        raise checks.InvalidArgument(
            f"perturbation_interval must be < steps ({steps}), or no member is ever perturbed; got {perturbation_interval}"
        )
    path = checkpoint_file(run_dir, resume)
    policy = PBT(
        perturbation_interval,
        space,
        quantile_fraction,
        resample_probability,
        metric=metric,
        descending=descending,
        seed=seed,
        final_step=steps,
    )
    wrapped: Any = EarlyStopping(policy, metric=metric, descending=descending, **early_stopping) if early_stopping else policy
    values = space.sample(num_models, seed)
    torch.manual_seed(seed)  # dropout and every other draw follow the seed (resume restores the saved RNG)
    reporters = [PBTReporter(console, metric, descending, space.names)] if progress else []
    trainer = make_trainer(model_fn, values, optimizer, seed, device, console, progress, callbacks=reporters, precision=precision)
    console.print(
        f"PBT: {num_models} members, {steps} steps, perturbation every {perturbation_interval} steps, quantile "
        f"{quantile_fraction}, resample probability {resample_probability}"
    )
    initial = {"step": 0, "ids": trainer.population.ids.tolist(), "hparams": {k: list(v) for k, v in values.items()}}
    if resume:
        resume_from(trainer, path)
    trainer.fit(DeviceLoader(train, batch_size, seed=seed), val, steps, wrapped, checkpoint_path=path, on_round=on_round)
    rows, winner = finish_run(trainer, val, test, metric, descending)
    trajectory = [initial] + [
        {"step": r["step"], "ids": r["kept_ids"], "hparams": r["hparams_after"]} for r in trainer.history["rounds"] if "hparams_after" in r
    ]
    final = {
        "step": trainer.global_step,
        "ids": trainer.population.ids.tolist(),
        "hparams": {k: v.tolist() for k, v in trainer.hparams().items()},
    }
    if trajectory[-1]["step"] != final["step"]:
        trajectory.append(final)
    history = {
        "kind": "pbt",
        "config": {
            "num_models": num_models,
            "perturbation_interval": perturbation_interval,
            "steps": steps,
            "quantile_fraction": quantile_fraction,
            "resample_probability": resample_probability,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "seed": seed,
            "metric": metric,
            "space": space.to_dict(),
        },
        "rounds": trainer.history["rounds"],
        "lineage": policy.lineage,
        "trajectory": trajectory,
        "leaderboard": rows,
        "cost": trainer.history["cost"],
    }
    console.print(cost_line(history["cost"]))
    return SearchResult(history, rows, winner, rows[0], history["cost"])
