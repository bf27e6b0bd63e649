"""Instability analysis (Frankle et al. 2020): do copies spawned from one trunk end in one linear basin?

One trunk (or K replicate trunks side by side in one stack, one per seed) trains to every spawn
step k1 (weights and optimizer state kept); copies of every snapshot, all in one stack, then train
k2 more steps on their own batch orders and dropout masks, and the barriers between the copies of
each trunk and k1 are measured with :func:`popvec.studies.paths.pair_barriers`. With several
trunks every number is also summarized over trunks (mean, std, 95% CI: :mod:`popvec.stats`). Both
phases train with the one loop (:meth:`PopulationTrainer.fit`) and resume from their checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popvec import checks, optim
from popvec.callbacks import Callback
from popvec.checkpoint import save_checkpoint
from popvec.data import TensorSplit
from popvec.engine import LossFn, evaluate
from popvec.loaders import DeviceLoader
from popvec.plots import new_figure, save_figure
from popvec.population import Population
from popvec.selection import MetricsTable
from popvec.stats import Summary, summarize
from popvec.studies.paths import BNMode, PathEvaluation, as_alphas, pair_barriers, path_evaluation
from popvec.trainer import PopulationTrainer

__all__ = ["InstabilityResult", "StepCallback", "instability"]

StepCallback = Callable[[str, int, int, Tensor], None]


COLUMNS = ("loss_barrier", "error_barrier", "l2", "error")


@dataclass(frozen=True)
class InstabilityResult:
    """Per k1 (``[G]`` CPU tensors): barriers and L2 distance between copies spawned at step k1 and
    trained k2 more steps (means over the pairs of copies of one trunk, then over the trunks; NaN
    when any trunk's is), and ``error``, the copies' mean error.

    ``seeds`` are the trunks' seeds (K of them) and ``per_seed[column]`` the ``[K, G]`` values of
    each trunk; :meth:`summaries` gives mean, std and 95% CI over trunks per k1. ``branches`` is the
    trained population of ``G * K * copies`` members (copy c of trunk t at ``k1[g]`` is member
    ``(g * K + t) * copies + c``), for further analysis; it is not part of :meth:`to_dict`.
    """

    k1: list[int]
    k2: int
    copies: int
    loss_barrier: Tensor
    error_barrier: Tensor
    l2: Tensor
    error: Tensor
    branches: Population = field(repr=False, compare=False)
    seeds: list[int] = field(default_factory=list)
    per_seed: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def rows(self) -> list[dict[str, float | int]]:
        """One flat dict per k1: k1, loss_barrier, error_barrier, l2, error (means over trunks)."""
        return [{"k1": k, **{c: float(getattr(self, c)[g]) for c in COLUMNS}} for g, k in enumerate(self.k1)]

    def seed_rows(self) -> list[dict[str, float | int]]:
        """One flat dict per trunk and k1: seed, k1, loss_barrier, error_barrier, l2, error."""
        return [
            {"seed": seed, "k1": k, **{c: float(self.per_seed[c][t, g]) for c in COLUMNS}}
            for t, seed in enumerate(self.seeds)
            for g, k in enumerate(self.k1)
        ]

    def summaries(self) -> list[dict[str, Summary]]:
        """Per k1, every column summarized over the trunks (n = K; std and CI NaN with one trunk)."""
        return [{c: summarize(self.per_seed[c][:, g].tolist()) for c in COLUMNS} for g in range(len(self.k1))]

    def to_dict(self) -> dict[str, Any]:
        summary = [{"k1": k, **{c: s.to_dict() for c, s in row.items()}} for k, row in zip(self.k1, self.summaries())]
        return {
            "k1": self.k1,
            "k2": self.k2,
            "copies": self.copies,
            "rows": self.rows(),
            "seeds": self.seeds,
            "per_seed": self.seed_rows(),
            "summary": summary,
        }

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the loss and error barriers vs k1 (needs matplotlib: ``pip install popvec[plot]``)."""
        figure = new_figure(9.0, 3.5)
        for ax, values, label in zip(
            figure.subplots(1, 2), (self.loss_barrier, 100 * self.error_barrier), ("loss barrier", "error barrier (%)")
        ):
            ax.plot(self.k1, values.tolist(), marker="o")
            if len(self.seeds) > 1:  # the 95% CI over trunks
                scale = 1.0 if label.startswith("loss") else 100.0
                column = "loss_barrier" if label.startswith("loss") else "error_barrier"
                cis = [row[column].scaled(scale) for row in self.summaries()]
                ax.fill_between(self.k1, [c.ci_low for c in cis], [c.ci_high for c in cis], alpha=0.2, label="95% CI over trunks")
                ax.legend()
            ax.set_xscale("symlog", linthresh=max(1, min([k for k in self.k1 if k > 0], default=1)))
            ax.axhline(0.0, color="gray", linewidth=0.8)
            ax.set(xlabel="k1 (spawn step)", ylabel=label, title=f"{label.split(' (')[0]} after k2 = {self.k2} steps")
            ax.grid(alpha=0.3)
        return save_figure(figure, path)


def _check_k1(k1_values: Sequence[int]) -> list[int]:
    values = checks.integers("k1_values", k1_values).tolist()
    if not values or min(values) < 0:
        raise ValueError(f"k1_values must be a non-empty sequence of integers >= 0, got {k1_values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"k1_values must not repeat, got {values}")
    return sorted(values)


def _stack_states(states: list[Any]) -> Any:
    """Concatenate same-shaped state trees along dim 0 (tensors); other leaves are taken from the first."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states)
    if isinstance(first, dict):
        return {k: _stack_states([s[k] for s in states]) for k in first}
    return first


@dataclass
class SnapshotSteps:
    """A selection policy that keeps every member and asks for a decision at each spawn step ``k1``.

    The decisions change nothing; they are the points where :class:`TrunkSnapshots` records the
    trunk (and where the trainer checkpoints it).
    """

    k1: list[int]
    taken: int = 0

    def next_decision(self, step: int, n: int) -> int | None:
        return self.k1[self.taken] if self.taken < len(self.k1) else None

    def decide(self, table: MetricsTable) -> list[int]:
        self.taken += 1
        return list(range(len(table)))

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = int(state["taken"])


class TrunkSnapshots(Callback):
    """Keeps the trunk's population and optimizer state at every decision (a spawn step) and writes
    each as ``run_dir/trunk_k1_<k1>.pt``; its state (the snapshots) lives in the trunk's checkpoints."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.snapshots: list[dict[str, Any]] = []

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self.take(trainer)

    def take(self, trainer: PopulationTrainer) -> None:
        snapshot = copy.deepcopy({"population": trainer.population.state_dict(), "optimizer": trainer.optimizer.state_dict()})
        self.snapshots.append(snapshot)
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / f"trunk_k1_{trainer.global_step}.pt", {"k1": trainer.global_step, **snapshot})

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = state["snapshots"]


class PhaseSteps(Callback):
    """Calls ``on_step(phase, done, total, losses)`` after every step of a phase that started at ``start``."""

    def __init__(self, on_step: StepCallback, phase: str, start: int, total: int) -> None:
        self.on_step_fn, self.phase, self.start, self.total = on_step, phase, start, total

    def on_step(self, trainer: PopulationTrainer, losses: Tensor) -> None:
        self.on_step_fn(self.phase, trainer.global_step - self.start, self.total, losses)


TRUNK_CHECKPOINT = "trunk.pt"
BRANCHES_CHECKPOINT = "branches.pt"


def instability(
    model_fn: Callable[[], nn.Module],
    optimizer_fn: Callable[[Population], optim.PopulationOptimizer],
    data: TensorSplit | tuple[Tensor, Tensor],
    k1_values: Sequence[int],
    k2: int,
    copies: int = 2,
    seed: int = 0,
    num_seeds: int = 1,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    run_dir: str | Path | None = None,
    eval_data: Any = None,
    alphas: int | Sequence[float] | Tensor = 25,
    loss_fn: LossFn = F.cross_entropy,
    bn: BNMode = "auto",
    copy_seeds: Sequence[int] | None = None,
    pair_chunk_size: int = 8,
    on_step: StepCallback | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    precision: str = "fp32",
) -> InstabilityResult:
    """Instability analysis (Frankle et al. 2020): how the barrier between spawned copies depends on k1.

    One trunk (``torch.manual_seed(seed); model_fn()``, optimizer ``optimizer_fn(population)``, a
    popvec optimizer) trains on ``data`` (the training split) to ``max(k1_values)`` steps, its
    weights and optimizer state kept at every k1 (and saved as ``run_dir/trunk_k1_<k1>.pt``). Then
    ``copies`` copies of every snapshot, ``len(k1_values) * copies`` members in one stack, train
    ``k2`` steps together; copy c draws its batches in the order of seed ``copy_seeds[c]`` (default
    ``seed + 1 + c``) and its own dropout masks. Barriers between the copies of each k1 are
    measured on ``eval_data`` (default: ``data``); see :func:`popvec.studies.lmc.interpolate` for ``alphas``/``bn``
    (BatchNorm statistics are recomputed over ``data``). ``on_step(phase, done, total, losses)``
    is called after each step of phase ``"trunk"`` and ``"branches"``.

    Replicates: ``num_seeds=K`` (or an explicit list ``seeds``) trains K trunks side by side in one
    stack, trunk t exactly as the single trunk of a run with ``seed=seeds[t]`` (default
    ``seed + t``): its initialization, its batch order, and its copies' orders (``seeds[t] + 1 + c``,
    or ``copy_seeds`` for every trunk). Barriers pair copies of the same trunk only; the result's
    means are over trunks, ``per_seed`` keeps every trunk's values and :meth:`InstabilityResult.summaries`
    gives mean, std and 95% CI over trunks. Trunk t equals the standalone run up to float rounding
    (a stack of K members batches its matmuls differently), and exactly so with K = 1. Dropout
    masks in the trunk phase are drawn per member of the stack, so with dropout trunk t's masks are
    not the standalone run's (same distribution).

    Both phases train with :meth:`PopulationTrainer.fit`. With ``run_dir`` the trunk is
    checkpointed at every k1 (``trunk.pt``) and the branches every ``checkpoint_every`` steps
    (``branches.pt``); ``resume=True`` continues from those files (or starts over when there are
    none yet) and ends with the same branches, bit for bit on the CPU, as an uninterrupted run.
    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for training and the barriers (see
    :mod:`popvec.precision`; with fp16 the copies start from fresh loss scales).
    """
    k1 = _check_k1(k1_values)
    checks.integer("k2", k2, 0)
    checks.integer("copies", copies, 2)
    checks.integer("checkpoint_every", checkpoint_every, 1)
    checks.integer("num_seeds", num_seeds, 1)
    trunk_seeds = [seed + t for t in range(num_seeds)] if seeds is None else checks.integers("seeds", seeds).tolist()
    if not trunk_seeds or len(set(trunk_seeds)) != len(trunk_seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if seeds is not None and num_seeds not in (1, len(trunk_seeds)):
        raise ValueError(f"num_seeds ({num_seeds}) and seeds ({len(trunk_seeds)} of them) disagree; give one of them")
    if copy_seeds is not None and len(copy_seeds) != copies:
        raise ValueError(f"copy_seeds must have one seed per copy ({copies}), got {len(copy_seeds)}")
    branch_seeds = [
        [s + 1 + c for c in range(copies)] if copy_seeds is None else [int(v) for v in copy_seeds] for s in trunk_seeds
    ]  # [K][copies]
    seed = trunk_seeds[0]
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir (the folder of the run to continue)")
    train = data if isinstance(data, TensorSplit) else TensorSplit(*data)
    device = torch.device(device) if device is not None else train.x.device
    train = train.to(device)
    folder = Path(run_dir) if run_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        population = _trunks(model_fn, trunk_seeds, device)
        optimizer = optimizer_fn(population)
        if not isinstance(optimizer, optim.PopulationOptimizer) or optimizer.population is not population:
            raise TypeError("optimizer_fn must return a popvec optimizer (e.g. popvec.optim.SGD) built on the population it is given")
        spec = path_evaluation(population.skeleton, train if eval_data is None else eval_data, loss_fn, bn, train, 1024, None, precision)
        branches_path = folder / BRANCHES_CHECKPOINT if folder is not None else None
        trainer = PopulationTrainer(population, optimizer, loss_fn, callbacks=[], precision=precision)
        if resume and branches_path is not None and branches_path.is_file():
            trainer.load_checkpoint(branches_path)  # the branches' whole state (N = len(k1) * copies)
        else:
            snapshots = _train_trunk(trainer, train, batch_size, trunk_seeds, k1, folder, resume, on_step)
            trainer = PopulationTrainer(population, optimizer, loss_fn, callbacks=[], precision=precision)
            trainer.state.load_state_dict(
                {
                    "population": _stack_states([s["population"] for s in snapshots]),
                    "optimizer": _stack_states([s["optimizer"] for s in snapshots]),
                }
            )
            trainer.select(torch.arange(len(k1) * len(trunk_seeds)).repeat_interleave(copies))
        loader = DeviceLoader(train, batch_size, num_members=population.n, seed=branch_seeds[0][0])
        loader.reseed(list(range(population.n)), [s for _ in k1 for trunk in branch_seeds for s in trunk])
        if on_step is not None:
            trainer.callbacks.append(PhaseSteps(on_step, "branches", 0, k2))
        trainer.fit(loader, None, k2, checkpoint_path=branches_path, checkpoint_every=checkpoint_every)
    return _instability_result(population, k1, k2, copies, trunk_seeds, as_alphas(alphas), spec, pair_chunk_size)


def _trunks(model_fn: Callable[[], nn.Module], seeds: list[int], device: torch.device) -> Population:
    """The K trunks: member t is exactly ``torch.manual_seed(seeds[t]); model_fn()``."""
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return Population.from_factory(model_fn, len(seeds), seeds[0], device)
    modules = []
    with torch.random.fork_rng(devices=[]):
        for s in seeds:
            torch.manual_seed(s)
            modules.append(model_fn())
    return Population.from_modules(modules).to(device)


def _train_trunk(
    trainer: PopulationTrainer,
    train: TensorSplit,
    batch_size: int,
    seeds: list[int],
    k1: list[int],
    run_dir: Path | None,
    resume: bool,
    on_step: StepCallback | None,
) -> list[dict[str, Any]]:
    """Train the trunks to ``max(k1)`` with the one loop; their population and optimizer state at every k1.

    One trunk draws its batches from a shared loader with its seed; K trunks from a per-member
    loader, trunk t with ``seeds[t]`` (the same order as a shared loader with that seed).
    """
    snapshots = TrunkSnapshots(run_dir)
    trainer.callbacks = [snapshots, *([PhaseSteps(on_step, "trunk", 0, k1[-1])] if on_step is not None else [])]
    checkpoint = run_dir / TRUNK_CHECKPOINT if run_dir is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint(checkpoint)
    if k1[-1] == 0:  # nothing to train: the only spawn point is the initialization
        snapshots.take(trainer)
        return snapshots.snapshots
    if len(seeds) == 1:
        loader = DeviceLoader(train, batch_size, seed=seeds[0])
    else:
        loader = DeviceLoader(train, batch_size, num_members=len(seeds), seed=seeds[0])
        loader.reseed(list(range(len(seeds))), seeds)
    trainer.fit(loader, None, k1[-1], SnapshotSteps(k1), checkpoint_path=checkpoint)
    return snapshots.snapshots


def _instability_result(
    population: Population,
    k1: list[int],
    k2: int,
    copies: int,
    seeds: list[int],
    alphas: Tensor,
    spec: PathEvaluation,
    pair_chunk_size: int,
) -> InstabilityResult:
    """Barriers between the copies of each (k1, trunk) group (members ``(g * K + t) * copies + c``),
    averaged per group; then per k1 over trunks (``[G]``), each trunk's kept in ``per_seed`` (``[K, G]``)."""
    trunks = len(seeds)
    groups = len(k1) * trunks
    c_first, c_second = torch.triu_indices(copies, copies, offset=1)
    base = (torch.arange(groups) * copies).repeat_interleave(c_first.numel())
    first, second = base + c_first.repeat(groups), base + c_second.repeat(groups)
    loss_barrier, error_barrier, l2 = (
        v.view(groups, -1).mean(1) for v in pair_barriers(population, first, second, alphas, spec, pair_chunk_size)
    )
    error = (
        (1.0 - evaluate(population, spec.data, spec.loss_fn, spec.batch_size, precision=spec.precision)["accuracy"].cpu())
        .view(groups, copies)
        .mean(1)
    )
    per_seed = {c: v.view(len(k1), trunks).T.contiguous() for c, v in zip(COLUMNS, (loss_barrier, error_barrier, l2, error))}
    loss_mean, error_barrier_mean, l2_mean, error_mean = (per_seed[c].mean(0) for c in COLUMNS)
    return InstabilityResult(k1, k2, copies, loss_mean, error_barrier_mean, l2_mean, error_mean, population, seeds, per_seed)
