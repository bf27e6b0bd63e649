"""Staged fidelity: S0 sanity / S1 shakeout / S2 serious / S3 finisher.

A run is a list of :class:`Stage` s, each with a step budget, a data fraction (a fixed seeded subset
of the training set: the first ``round(fraction * M)`` samples of one seeded permutation, so a
larger fraction contains every smaller one) and a survival rate (the best
``max(1, floor(n * rate))`` members by the metric go on). Survivors simply continue (warm start):
their weights and optimizer state carry over into the next stage. Stages load from TOML or YAML::

    [[stages]]
    name = "S0 sanity"
    steps = 20
    data_fraction = 0.1
    survival_rate = 0.5
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from popvec import checks
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.search.early_stopping import EarlyStopping
from popvec.search.files import load_config
from popvec.search.run import resume_from
from popvec.selection import Decision, MetricsTable, rank
from popvec.trainer import PopulationTrainer

__all__ = ["Stage", "DEFAULT_STAGES", "parse_stages", "load_stages", "data_subset", "StageCut", "run_staged"]


@dataclass(frozen=True)
class Stage:
    """``steps`` training steps on ``data_fraction`` of the training set, then keep ``survival_rate``."""

    name: str
    steps: int
    data_fraction: float = 1.0
    survival_rate: float = 1.0

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        checks.integer(f"{where}: steps", self.steps)
        for key in ("data_fraction", "survival_rate"):
            checks.unit_interval(f"{where}: {key}", getattr(self, key), low_open=True)

    def survivors(self, n: int) -> int:
        return max(1, math.floor(n * self.survival_rate + 1e-9))


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("S0 sanity", 20, 0.1, 0.5),
    Stage("S1 shakeout", 60, 0.3, 0.5),
    Stage("S2 serious", 150, 1.0, 0.25),
    Stage("S3 finisher", 300, 1.0, 1.0),
)


def parse_stages(spec: Any, where: str = "stages") -> list[Stage]:
    """Stages from a list of mappings (name, steps, data_fraction, survival_rate)."""
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)) or not spec:
        raise ValueError(f"{where} must be a non-empty list of stages, got {spec!r}")
    stages = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}[{i}] must be a table with steps, data_fraction, survival_rate; got {entry!r}")
        unknown = set(entry) - {"name", "steps", "data_fraction", "survival_rate"}
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown keys {sorted(unknown)}")
        if "steps" not in entry:
            raise ValueError(f"{where}[{i}]: steps is missing")
        try:
            stages.append(
                Stage(str(entry.get("name", f"S{i}")), entry["steps"], entry.get("data_fraction", 1.0), entry.get("survival_rate", 1.0))
            )
        except ValueError as err:
            raise ValueError(f"{where}[{i}] {err}") from None
    return stages


def load_stages(path: str | Path) -> list[Stage]:
    """The ``stages`` list of a TOML/YAML file."""
    data = load_config(path)
    if "stages" not in data:
        raise ValueError(f"{path}: no 'stages' list (write [[stages]] tables in TOML or a 'stages:' list in YAML)")
    try:
        return parse_stages(data["stages"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def data_subset(split: TensorSplit, fraction: float, seed: int = 0) -> TensorSplit:
    """The fixed seeded ``fraction`` of ``split`` (at least one sample); nested across fractions."""
    checks.unit_interval("data_fraction", fraction, low_open=True)
    if fraction == 1:
        return split
    m = len(split)
    take = max(1, round(fraction * m))
    index = torch.from_numpy(np.random.default_rng([seed, 7]).permutation(m)[:take]).to(split.x.device)
    return TensorSplit(split.x.index_select(0, index), split.y.index_select(0, index))


@dataclass
class StageCut:
    """One decision at global step ``at``: keep the best ``stage.survivors(n)`` by ``metric``."""

    at: int
    stage: Stage
    metric: str = "val_loss"
    descending: bool = False

    def next_decision(self, step: int, n: int) -> int | None:
        return self.at if step < self.at else None

    def decide(self, table: MetricsTable) -> Decision:
        order = rank(table, self.metric, self.descending)
        k = self.stage.survivors(len(table))
        reasons = {
            table.ids[
                p
            ]: f"{self.stage.name}: {self.metric} {table.columns[self.metric][p]:.4g} ranked {place + 1} of {len(table)}; {k} go on"
            for place, p in enumerate(order)
            if place >= k
        }
        return Decision(order[:k], reasons=reasons, events=[{"stage": self.stage.name, "step": table.step, "alive": len(table), "kept": k}])


def run_staged(
    trainer: PopulationTrainer,
    stages: Sequence[Stage],
    train: TensorSplit,
    val: Any,
    batch_size: int = 64,
    seed: int = 0,
    metric: str = "val_loss",
    descending: bool = False,
    early_stopping: Mapping[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``trainer``'s population through ``stages``; returns its history (with ``stages``).

    Stage k trains on ``data_subset(train, fraction, seed)`` with shared batches
    (``DeviceLoader(subset, min(batch_size, len(subset)), seed=seed + k)``) until the cumulative
    step budget, then cuts. The cost's naive figure is every initial member for all steps.
    ``checkpoint_path``: checkpoint there at every decision. ``resume=True``: load that checkpoint
    (or start over when there is none yet) into ``trainer``, built and passed exactly as in the
    first call, and continue; the stage in progress follows from the restored ``global_step``.
    """
    if not stages:
        raise ValueError("stages must hold at least one stage")
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and path is None:
        raise ValueError("resume=True needs checkpoint_path")
    ends = list(itertools.accumulate((stage.steps for stage in stages), initial=trainer.global_step))[1:]
    if resume:
        resume_from(trainer, path)
    for k, (stage, end) in enumerate(zip(stages, ends)):
        # Stages that ended before the checkpoint are done. The stage whose fit wrote it runs again, even
        # when the checkpoint is at its last step (then it trains nothing): only its policy and loader may
        # take the state saved there, not the next stage's fresh ones.
        if end < trainer.global_step:
            continue
        subset = data_subset(train, stage.data_fraction, seed)
        loader = DeviceLoader(subset, min(batch_size, len(subset)), seed=seed + k)
        cut: Any = StageCut(end, stage, metric, descending)
        policy = EarlyStopping(cut, metric=metric, descending=descending, **early_stopping) if early_stopping else cut
        trainer.console.print(f"{stage.name}: {trainer.population.n} member(s), {stage.steps} steps on {len(subset)} samples")
        trainer.fit(loader, val, end, policy, checkpoint_path=path)
    trainer.history["stages"] = [vars(s) for s in stages]
    return trainer.history
