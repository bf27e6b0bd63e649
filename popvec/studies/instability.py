"""Instability analysis (Frankle et al. 2020): do copies spawned from one trunk end in one linear basin?

One trunk trains to every spawn step k1 (weights and optimizer state kept); copies of every
snapshot, all in one stack, then train k2 more steps on their own batch orders and dropout
masks, and the barriers between the copies of each k1 are measured with
:func:`popvec.studies.paths.pair_barriers`.
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

from popvec import optim
from popvec.checkpoint import save_checkpoint
from popvec.data import TensorSplit
from popvec.engine import LossFn, TrainStep, evaluate
from popvec.loaders import DeviceLoader
from popvec.plots import new_figure, save_figure
from popvec.population import Population
from popvec.studies.paths import BNMode, PathEvaluation, as_alphas, pair_barriers, path_evaluation

__all__ = ["InstabilityResult", "StepCallback", "instability"]

StepCallback = Callable[[str, int, int, Tensor], None]


@dataclass(frozen=True)
class InstabilityResult:
    """Per k1 (``[G]`` CPU tensors): barriers and L2 distance between copies spawned at step k1 and
    trained k2 more steps (means over the pairs of copies), and ``error``, the copies' mean error.

    ``branches`` is the trained population of ``G * copies`` members (copy c of ``k1[g]`` is member
    ``g * copies + c``), for further analysis; it is not part of :meth:`to_dict`.
    """

    k1: list[int]
    k2: int
    copies: int
    loss_barrier: Tensor
    error_barrier: Tensor
    l2: Tensor
    error: Tensor
    branches: Population = field(repr=False, compare=False)

    def rows(self) -> list[dict[str, float | int]]:
        """One flat dict per k1: k1, loss_barrier, error_barrier, l2, error."""
        columns = ("loss_barrier", "error_barrier", "l2", "error")
        return [{"k1": k, **{c: float(getattr(self, c)[g]) for c in columns}} for g, k in enumerate(self.k1)]

    def to_dict(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "copies": self.copies, "rows": self.rows()}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the loss and error barriers vs k1 (needs matplotlib: ``pip install popvec[plot]``)."""
        figure = new_figure(9.0, 3.5)
        for ax, values, label in zip(figure.subplots(1, 2), (self.loss_barrier, 100 * self.error_barrier), ("loss barrier", "error barrier (%)")):
            ax.plot(self.k1, values.tolist(), marker="o")
            ax.set_xscale("symlog", linthresh=max(1, min([k for k in self.k1 if k > 0], default=1)))
            ax.axhline(0.0, color="gray", linewidth=0.8)
            ax.set(xlabel="k1 (spawn step)", ylabel=label, title=f"{label.split(' (')[0]} after k2 = {self.k2} steps")
            ax.grid(alpha=0.3)
        return save_figure(figure, path)


def _check_k1(k1_values: Sequence[int]) -> list[int]:
    values = list(k1_values)
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in values):
        raise ValueError(f"k1_values must be a non-empty sequence of integers >= 0, got {k1_values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"k1_values must not repeat, got {values}")
    return sorted(values)


def _check_count(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _stack_states(states: list[Any]) -> Any:
    """Concatenate same-shaped state trees along dim 0 (tensors); other leaves are taken from the first."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states)
    if isinstance(first, dict):
        return {k: _stack_states([s[k] for s in states]) for k in first}
    return first


def _run_steps(step: TrainStep, loader: DeviceLoader, count: int, report: Callable[[Tensor], None]) -> None:
    per_member = loader.num_members is not None
    for _ in range(count):
        x, y = loader.next_batch()
        report(step(x, y, per_member=per_member))


def _reporter(on_step: StepCallback | None, phase: str, total: int) -> Callable[[Tensor], None]:
    done = 0

    def report(losses: Tensor) -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(phase, done, total, losses)

    return report


def _train_trunk(
    step: TrainStep, loader: DeviceLoader, k1: list[int], run_dir: Path | None, on_step: StepCallback | None
) -> list[dict[str, Any]]:
    """Train the trunk to ``max(k1)``; the population and optimizer state at every k1 (saved to ``run_dir``)."""
    report = _reporter(on_step, "trunk", k1[-1])
    snapshots, done = [], 0
    for k in k1:
        _run_steps(step, loader, k - done, report)
        done = k
        snapshot = copy.deepcopy({"population": step.population.state_dict(), "optimizer": step.optimizer.state_dict()})
        snapshots.append(snapshot)
        if run_dir is not None:
            save_checkpoint(run_dir / f"trunk_k1_{k}.pt", {"k1": k, **snapshot})
    return snapshots


def instability(
    model_fn: Callable[[], nn.Module],
    optimizer_fn: Callable[[Population], optim.PopulationOptimizer],
    data: TensorSplit | tuple[Tensor, Tensor],
    k1_values: Sequence[int],
    k2: int,
    copies: int = 2,
    seed: int = 0,
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
    """
    k1 = _check_k1(k1_values)
    _check_count("k2", k2, 0)
    _check_count("copies", copies, 2)
    seeds = [seed + 1 + c for c in range(copies)] if copy_seeds is None else list(copy_seeds)
    if len(seeds) != copies:
        raise ValueError(f"copy_seeds must have one seed per copy ({copies}), got {len(seeds)}")
    train = data if isinstance(data, TensorSplit) else TensorSplit(*data)
    device = torch.device(device) if device is not None else train.x.device
    train = train.to(device)
    folder = Path(run_dir) if run_dir is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        population = Population.from_factory(model_fn, 1, seed, device)
        optimizer = optimizer_fn(population)
        if not isinstance(optimizer, optim.PopulationOptimizer) or optimizer.population is not population:
            raise TypeError("optimizer_fn must return a popvec optimizer (e.g. popvec.optim.SGD) built on the population it is given")
        spec = path_evaluation(population.skeleton, train if eval_data is None else eval_data, loss_fn, bn, train, 1024, None)
        step = TrainStep(population, optimizer, loss_fn)
        snapshots = _train_trunk(step, DeviceLoader(train, batch_size, seed=seed), k1, folder, on_step)
        spawn = torch.arange(len(k1)).repeat_interleave(copies)
        population.load_state_dict(_stack_states([s["population"] for s in snapshots])).select(spawn)
        optimizer.load_state_dict(_stack_states([s["optimizer"] for s in snapshots])).select(spawn)
        loader = DeviceLoader(train, batch_size, num_members=population.n, seed=seeds[0])
        loader.reseed(list(range(population.n)), seeds * len(k1))
        _run_steps(step, loader, k2, _reporter(on_step, "branches", k2))
    return _instability_result(population, k1, k2, copies, as_alphas(alphas), spec, pair_chunk_size)


def _instability_result(
    population: Population, k1: list[int], k2: int, copies: int, alphas: Tensor, spec: PathEvaluation, pair_chunk_size: int
) -> InstabilityResult:
    """Barriers between the copies of each k1 group (members ``g * copies + c``), averaged per group."""
    groups = len(k1)
    c_first, c_second = torch.triu_indices(copies, copies, offset=1)
    base = (torch.arange(groups) * copies).repeat_interleave(c_first.numel())
    first, second = base + c_first.repeat(groups), base + c_second.repeat(groups)
    loss_barrier, error_barrier, l2 = (
        v.view(groups, -1).mean(1) for v in pair_barriers(population, first, second, alphas, spec, pair_chunk_size)
    )
    error = 1.0 - evaluate(population, spec.data, spec.loss_fn, spec.batch_size)["accuracy"].cpu()
    return InstabilityResult(k1, k2, copies, loss_barrier, error_barrier, l2, error.view(groups, copies).mean(1), population)
