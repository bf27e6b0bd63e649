"""Warm-starting studies (Ash & Adams 2020): cold, warm and shrink-perturb arms in one stack.

Every arm trains side by side in one population on the same batches. The training set arrives
in *phases*: a prefix of a fixed seeded permutation of the training split that grows from phase
to phase. Protocols:

- ``"two-phase"``: a ``fraction`` of the training set, then all of it;
- ``"online"``: chunks of ``chunk_size`` samples (default: the set in ``chunks`` equal parts); after
  each chunk every member trains on all the data seen so far.

In every phase each member trains until its accuracy on the phase's training data reaches
``threshold`` (checked every ``check_every`` steps) or ``max_steps``; a member that is done is
frozen by the step mask while the others continue. At a phase boundary:

- **warm** members continue from their weights;
- **shrink-perturb** members get ``w <- lam * w + sigma * noise`` (:meth:`Population.shrink_perturb`,
  noise from a fresh initialization of ``model_fn``);
- **cold** members are re-initialized (``model_fn`` with fresh seeds, BatchNorm statistics too).

With ``reset_optimizer=True`` (default) every member starts a phase with fresh optimizer state
(as a new training run from those weights would); otherwise only cold members' state is reset.

Recorded per member and phase: training accuracy (on the phase's data), test loss and accuracy,
steps taken (= steps to the threshold when ``reached``), mean gradient norm over those steps and
the wall time the stack ran until the member stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from popvec import checks, optim
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.engine import TrainStep, evaluate
from popvec.population import Population

__all__ = [
    "ARM_KINDS",
    "PROTOCOLS",
    "Arm",
    "PhaseRecord",
    "WarmStartResult",
    "default_arms",
    "phase_sizes",
    "run_study",
]

PROTOCOLS: tuple[str, ...] = ("online", "two-phase")
ARM_KINDS: tuple[str, ...] = ("cold", "warm", "shrink_perturb")
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class Arm:
    """One arm of a study: ``kind`` in ``ARM_KINDS``; ``lam``/``sigma`` for shrink-perturb."""

    name: str
    kind: str
    lam: float = 1.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        checks.choice("kind", self.kind, ARM_KINDS)
        for name in ("lam", "sigma"):
            checks.number(name, getattr(self, name), 0.0)

    @classmethod
    def shrink_perturb(cls, lam: float, sigma: float) -> Arm:
        return cls(f"sp(lam={lam:g}, sigma={sigma:g})", "shrink_perturb", float(lam), float(sigma))


def default_arms() -> list[Arm]:
    """Cold, warm and three shrink-perturb settings."""
    return [
        Arm("cold", "cold"),
        Arm("warm", "warm"),
        Arm.shrink_perturb(0.6, 0.01),
        Arm.shrink_perturb(0.3, 0.01),
        Arm.shrink_perturb(0.3, 0.1),
    ]


def phase_sizes(
    protocol: str,
    num_samples: int,
    fraction: float = 0.5,
    chunk_size: int | None = None,
    chunks: int = 10,
) -> list[int]:
    """Training-set size of each phase: two-phase ``[fraction * M, M]``, online ``[c, 2c, ..., M]``."""
    checks.choice("protocol", protocol, PROTOCOLS)
    checks.integer("num_samples", num_samples, minimum=2)
    if protocol == "two-phase":
        checks.unit_interval("fraction", fraction, low_open=True, high_open=True)
        first = min(num_samples - 1, max(1, round(fraction * num_samples)))
        return [first, num_samples]
    if chunk_size is None:
        checks.integer("chunks", chunks, 2, num_samples)
        chunk_size = math.ceil(num_samples / chunks)
    checks.integer("chunk_size", chunk_size, 1, num_samples - 1)
    sizes = list(range(chunk_size, num_samples, chunk_size))
    return [*sizes, num_samples]


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


@dataclass
class WarmStartResult:
    """Everything a study measured; ``member_arm[i]`` is member i's index into ``arms``."""

    protocol: str
    arms: list[Arm]
    member_arm: list[int]
    phases: list[PhaseRecord] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    population: Population | None = field(default=None, repr=False)

    def arm_members(self, arm: int) -> list[int]:
        return [i for i, a in enumerate(self.member_arm) if a == arm]

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """Per arm name: ``samples``, mean ``test_accuracy``, mean ``steps`` and mean ``train_accuracy`` per phase."""
        out: dict[str, dict[str, list[float]]] = {}
        for a, arm in enumerate(self.arms):
            members = self.arm_members(a)
            out[arm.name] = {
                "samples": [float(p.samples) for p in self.phases],
                "test_accuracy": [_mean([p.test_accuracy[i] for i in members]) for p in self.phases],
                "train_accuracy": [_mean([p.train_accuracy[i] for i in members]) for p in self.phases],
                "steps": [_mean([float(p.steps[i]) for i in members]) for p in self.phases],
            }
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per arm: final-phase test/train accuracy (mean, std over replicates), steps and time."""
        rows = []
        last = self.phases[-1]
        for a, arm in enumerate(self.arms):
            members = self.arm_members(a)
            test = [last.test_accuracy[i] for i in members]
            rows.append({
                "arm": arm.name,
                "members": len(members),
                "final_test_accuracy": _mean(test),
                "final_test_accuracy_std": _std(test),
                "mean_test_accuracy": _mean([_mean([p.test_accuracy[i] for i in members]) for p in self.phases]),
                "final_train_accuracy": _mean([last.train_accuracy[i] for i in members]),
                "final_phase_steps": _mean([float(last.steps[i]) for i in members]),
                "total_steps": _mean([float(sum(p.steps[i] for p in self.phases)) for i in members]),
                "time_s": _mean([sum(p.time_s[i] for p in self.phases) for i in members]),
                "reached_all": all(p.reached[i] for p in self.phases for i in members),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "arms": [asdict(a) for a in self.arms],
            "member_arm": self.member_arm,
            "phases": [asdict(p) for p in self.phases],
            "summary": self.summary(),
            "config": self.config,
            "wall_time_s": self.wall_time_s,
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def build_optimizer(
    population: Population, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> optim.PopulationOptimizer:
    """The study's optimizer. ``max_grad_norm=inf`` clips nothing but returns each member's gradient norm."""
    checks.choice("optimizer", name, OPTIMIZER_NAMES)
    extra = {"momentum": momentum} if name == "sgd" else {}
    return optim.make(name, population, lr=lr, weight_decay=weight_decay, max_grad_norm=math.inf, **extra)


@torch.no_grad()
def _reinitialize(population: Population, members: list[int], model_fn: Callable[[], nn.Module], seed: int) -> None:
    """Overwrite ``members`` (positions) with fresh initializations: member i gets ``seed + i``."""
    if not members:
        return
    fresh = Population.from_factory(model_fn, population.n, seed, population.device)
    index = torch.tensor(members, device=population.device)
    for kind in ("params", "buffers"):
        mine, theirs = getattr(population, kind), getattr(fresh, kind)
        for k, v in mine.items():
            v.index_copy_(0, index, theirs[k].index_select(0, index).to(v.dtype))


def run_study(
    model_fn: Callable[[], nn.Module],
    train: TensorSplit,
    test: TensorSplit,
    protocol: str = "online",
    arms: Sequence[Arm] | None = None,
    replicates: int = 1,
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    threshold: float = 0.99,
    max_steps: int = 1000,
    check_every: int = 10,
    fraction: float = 0.5,
    chunk_size: int | None = None,
    chunks: int = 10,
    reset_optimizer: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    on_phase_start: Callable[[int, int, Population], None] | None = None,
    on_step: Callable[[int, int, Tensor, Population], None] | None = None,
    on_phase_end: Callable[[PhaseRecord], None] | None = None,
) -> WarmStartResult:
    """Run a warm-starting study; every arm has ``replicates`` members (seeds ``seed + i``).

    Members ``[a * replicates, (a + 1) * replicates)`` belong to arm ``a``. Callbacks:
    ``on_phase_start(phase, samples, population)`` after the phase-boundary transforms,
    ``on_step(phase, step, active, population)`` after each stack step (``active``: the ``[N]``
    bool mask that step used), ``on_phase_end(record)``. The trained population ends up in
    ``result.population``.
    """
    arms = list(default_arms() if arms is None else arms)
    if not arms:
        raise ValueError("arms must hold at least one Arm")
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"arms must have distinct names; got {[a.name for a in arms]}")
    for name, value in (("replicates", replicates), ("batch_size", batch_size), ("max_steps", max_steps), ("check_every", check_every)):
        checks.integer(name, value)
    checks.unit_interval("threshold", threshold, low_open=True)
    if not isinstance(train, TensorSplit) or not isinstance(test, TensorSplit):
        raise TypeError("train and test must be TensorSplit instances (popvec.data.load_dataset(...).train)")
    sizes = phase_sizes(protocol, len(train), fraction, chunk_size, chunks)
    device = torch.device(device) if device is not None else train.x.device

    member_arm = [a for a in range(len(arms)) for _ in range(replicates)]
    n = len(member_arm)
    kinds = [arms[a].kind for a in member_arm]
    cold = [i for i, k in enumerate(kinds) if k == "cold"]
    sp = [i for i, k in enumerate(kinds) if k == "shrink_perturb"]
    lam = [arms[a].lam if arms[a].kind == "shrink_perturb" else 1.0 for a in member_arm]
    sigma = [arms[a].sigma if arms[a].kind == "shrink_perturb" else 0.0 for a in member_arm]

    pop = Population.from_factory(model_fn, n, seed, device)
    opt = build_optimizer(pop, optimizer, lr, momentum, weight_decay)
    step_fn = TrainStep(pop, opt)
    train, test = train.to(device), test.to(device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).to(device)

    result = WarmStartResult(
        protocol,
        arms,
        member_arm,
        config={
            "protocol": protocol, "replicates": replicates, "optimizer": optimizer, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "batch_size": batch_size, "threshold": threshold, "max_steps": max_steps,
            "check_every": check_every, "phase_sizes": sizes, "reset_optimizer": reset_optimizer, "seed": seed,
            "train_samples": len(train), "test_samples": len(test),
        },
    )
    started = time.perf_counter()
    for phase, size in enumerate(sizes):
        if phase > 0:
            # Fresh seeds for every phase's cold members and noise: seed + phase * n + i never repeats.
            _reinitialize(pop, cold, model_fn, seed + phase * n)
            if sp:
                pop.shrink_perturb(lam, sigma, seed=seed + (len(sizes) + phase) * n, model_fn=model_fn)
            if reset_optimizer:
                opt.reset_state(list(range(n)))
            elif cold:
                opt.reset_state(cold)
        if on_phase_start is not None:
            on_phase_start(phase, size, pop)
        idx = order[:size]
        split = TensorSplit(train.x.index_select(0, idx), train.y.index_select(0, idx))
        record = _train_phase(pop, step_fn, split, test, phase, batch_size, threshold, max_steps, check_every, seed, on_step)
        result.phases.append(record)
        if on_phase_end is not None:
            on_phase_end(record)
    result.wall_time_s = time.perf_counter() - started
    result.population = pop
    return result


def _train_phase(
    pop: Population,
    step_fn: TrainStep,
    split: TensorSplit,
    test: TensorSplit,
    phase: int,
    batch_size: int,
    threshold: float,
    max_steps: int,
    check_every: int,
    seed: int,
    on_step: Callable[[int, int, Tensor, Population], None] | None,
) -> PhaseRecord:
    """Train every member on ``split`` until it reaches ``threshold`` or ``max_steps``, each on its own."""
    n = pop.n
    loader = DeviceLoader(split, min(batch_size, len(split)), seed=seed + phase)
    active = torch.ones(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    grad_sum = torch.zeros(n, dtype=torch.float64)
    stopped_at = torch.full((n,), math.nan, dtype=torch.float64)
    started = time.perf_counter()
    t = 0
    while True:
        if t % check_every == 0 or t == max_steps:
            reached = evaluate(pop, split)["accuracy"].cpu() >= threshold
            done = active & (reached | (t >= max_steps))
            stopped_at[done] = time.perf_counter() - started
            active &= ~done
        if not bool(active.any()):
            break
        x, y = loader.next_batch()
        step_fn(x, y, mask=active.to(pop.device))
        norms = step_fn.last_grad_norm
        if norms is not None:
            grad_sum += torch.where(active, norms.detach().cpu().double(), torch.zeros((), dtype=torch.float64))
        steps += active.long()
        t += 1
        if on_step is not None:
            on_step(phase, t, active.clone(), pop)
    train_metrics = evaluate(pop, split)
    test_metrics = evaluate(pop, test)
    mean_norm = torch.where(steps > 0, grad_sum / steps.clamp(min=1), torch.full_like(grad_sum, math.nan))
    return PhaseRecord(
        phase=phase,
        samples=len(split),
        train_accuracy=train_metrics["accuracy"].tolist(),
        test_accuracy=test_metrics["accuracy"].tolist(),
        test_loss=test_metrics["loss"].tolist(),
        steps=steps.tolist(),
        reached=(train_metrics["accuracy"].cpu() >= threshold).tolist(),
        grad_norm=mean_norm.tolist(),
        time_s=stopped_at.tolist(),
        wall_time_s=time.perf_counter() - started,
    )
