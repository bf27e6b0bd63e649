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

Seeds follow the member's identity, not its position: replicate r of every arm starts from
``torch.manual_seed(seed + r); model_fn()`` and phase p's fresh initialization of replicate r
(a cold member's new weights, a shrink-perturb member's noise) is seeded with
``seed + r + 2**32 * p`` (:func:`draw_seed`), so an arm's results do not depend on the other arms.

With ``reset_optimizer=True`` (default) every member starts a phase with fresh optimizer state
(as a new training run from those weights would); otherwise only cold members' state is reset.

Recorded per member and phase: training accuracy (on the phase's data), test loss and accuracy,
steps taken (= steps to the threshold when ``reached``), mean gradient norm over those steps and
the wall time the stack ran until the member stopped.

The study trains through the library's one loop: one :class:`~popvec.trainer.PopulationTrainer`
for the whole study, one ``fit`` per phase under a :class:`ThresholdStop` policy (whose decisions
freeze the members that are done), and a :class:`PhaseRecorder` callback that keeps the records.
With ``run_dir`` the trainer checkpoints at every decision and at the end of every phase; the
policy's state holds the phase in progress and the recorder's the finished phases' records, so
``resume=True`` continues a killed study to the same weights and records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from popvec import checks, optim
from popvec.checkpoint import CheckpointError, load_checkpoint
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.population import Population
from popvec.stats import summarize
from popvec.studies.phases import PhaseRecord, PhaseRecorder, ThresholdStop, mean, reached_threshold
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer

__all__ = [
    "ARM_KINDS",
    "PROTOCOLS",
    "Arm",
    "PhaseRecord",
    "PhaseRecorder",
    "ThresholdStop",
    "WarmStartResult",
    "default_arms",
    "draw_seed",
    "phase_sizes",
    "reached_threshold",
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
                "test_accuracy": [mean([p.test_accuracy[i] for i in members]) for p in self.phases],
                "train_accuracy": [mean([p.train_accuracy[i] for i in members]) for p in self.phases],
                "steps": [mean([float(p.steps[i]) for i in members]) for p in self.phases],
            }
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per arm: final-phase test/train accuracy, steps and time (means over replicates).

        The final test accuracy comes with its sample std (NaN with one replicate, never 0) and
        95% Student-t confidence interval over the replicates; ``stats`` holds the full
        :class:`popvec.stats.Summary` (n, n_finite, mean, std, CI, min, max) of the final test
        accuracy, the mean test accuracy over phases and the total steps, per replicate.
        """
        rows = []
        last = self.phases[-1]
        for a, arm in enumerate(self.arms):
            members = self.arm_members(a)
            test = [last.test_accuracy[i] for i in members]
            final = summarize(test, bounds=(0.0, 1.0))
            per_replicate_mean = [mean([p.test_accuracy[i] for p in self.phases]) for i in members]
            steps = [float(sum(p.steps[i] for p in self.phases)) for i in members]
            rows.append(
                {
                    "arm": arm.name,
                    "members": len(members),
                    "final_test_accuracy": mean(test),
                    "final_test_accuracy_std": final.std,
                    "final_test_accuracy_ci_low": final.ci_low,
                    "final_test_accuracy_ci_high": final.ci_high,
                    "final_test_accuracy_n_finite": final.n_finite,
                    "mean_test_accuracy": mean([mean([p.test_accuracy[i] for i in members]) for p in self.phases]),
                    "final_train_accuracy": mean([last.train_accuracy[i] for i in members]),
                    "final_phase_steps": mean([float(last.steps[i]) for i in members]),
                    "total_steps": mean([float(sum(p.steps[i] for p in self.phases)) for i in members]),
                    "time_s": mean([sum(p.time_s[i] for p in self.phases) for i in members]),
                    "reached_all": all(p.reached[i] for p in self.phases for i in members),
                    "stats": {
                        "final_test_accuracy": final.to_dict(),
                        "mean_test_accuracy": summarize(per_replicate_mean, bounds=(0.0, 1.0)).to_dict(),
                        "total_steps": summarize(steps).to_dict(),
                    },
                }
            )
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


def build_optimizer(
    population: Population, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> optim.PopulationOptimizer:
    """The study's optimizer. ``max_grad_norm=inf`` clips nothing but returns each member's gradient norm."""
    checks.choice("optimizer", name, OPTIMIZER_NAMES)
    if name == "sgd":
        return optim.make(name, population, lr=lr, momentum=momentum, weight_decay=weight_decay, max_grad_norm=math.inf)
    return optim.make(name, population, lr=lr, weight_decay=weight_decay, max_grad_norm=math.inf)


SEED_STRIDE = 2**32


def draw_seed(seed: int, replicate: int, phase: int) -> int:
    """The seed of replicate ``replicate``'s fresh initialization for phase ``phase``: ``seed + replicate + 2**32 * phase``.

    Phase 0's draw is the initialization every arm's replicate ``replicate`` starts from; phase
    ``p >= 1``'s is what a cold member is re-initialized to, and a shrink-perturb member's noise, at
    the start of phase ``p`` (``torch.manual_seed(draw_seed(...)); model_fn()``). A draw depends on
    the member's replicate and the phase only, never on its arm or position in the stack: an arm's
    numbers are the same whichever arms run beside it (and in whatever order), and the arms of one
    replicate share their draws (common random numbers), so they differ only in what they do at
    the phase boundaries. Distinct for every (replicate, phase) pair while replicates < 2**32.
    """
    return seed + replicate + SEED_STRIDE * phase


def _draws(model_fn: Callable[[], nn.Module], replicates: int, seed: int, phase: int, device: torch.device) -> Population:
    """Phase ``phase``'s fresh initialization of every replicate: member r seeded with ``draw_seed(seed, r, phase)``."""
    return Population.from_factory(model_fn, replicates, draw_seed(seed, 0, phase), device)


@dataclass(frozen=True)
class _Members:
    """The stack's layout: members ``[a * replicates, (a + 1) * replicates)`` are arm ``a``'s replicates in order."""

    arms: list[Arm]
    replicates: int

    @property
    def n(self) -> int:
        return len(self.arms) * self.replicates

    @property
    def member_arm(self) -> list[int]:
        return [a for a in range(len(self.arms)) for _ in range(self.replicates)]

    @property
    def replicate(self) -> list[int]:
        """Each member's replicate."""
        return [r for _ in self.arms for r in range(self.replicates)]

    def of_arm(self, arm: int) -> list[int]:
        """Arm ``arm``'s positions, replicate 0 first."""
        return list(range(arm * self.replicates, (arm + 1) * self.replicates))

    def of_kind(self, kind: str) -> list[int]:
        return [i for a, arm in enumerate(self.arms) if arm.kind == kind for i in self.of_arm(a)]


def _initial_population(model_fn: Callable[[], nn.Module], members: _Members, seed: int, device: torch.device) -> Population:
    """Phase 0's draws, one per replicate, copied to every arm (ids ``0 .. n - 1`` by position)."""
    population = _draws(model_fn, members.replicates, seed, 0, device).take(members.replicate)
    population.ids = torch.arange(members.n)
    return population


@torch.no_grad()
def _overwrite(population: Population, positions: list[int], source: Population) -> None:
    """Copy ``source``'s members (parameters and buffers) into ``positions``, one each, in order."""
    index = torch.tensor(positions, device=population.device)
    for kind in ("params", "buffers"):
        mine, theirs = getattr(population, kind), getattr(source, kind)
        for k, v in mine.items():
            v.index_copy_(0, index, theirs[k].to(v.device, v.dtype))


def _phase_boundary(
    population: Population,
    optimizer: optim.PopulationOptimizer,
    members: _Members,
    model_fn: Callable[[], nn.Module],
    phase: int,
    seed: int,
    reset_optimizer: bool,
) -> None:
    """Before phase ``phase`` > 0: re-initialize cold members, shrink-perturb, reset optimizer state.

    Both random transforms use the phase's draws (:func:`draw_seed`): a cold replicate becomes
    its draw (BatchNorm statistics too), a shrink-perturb replicate ``lam * w + sigma * draw``.
    """
    for a, arm in enumerate(members.arms):
        positions = members.of_arm(a)
        if arm.kind == "cold":
            _overwrite(population, positions, _draws(model_fn, members.replicates, seed, phase, population.device))
        elif arm.kind == "shrink_perturb":
            # shrink_perturb draws member r's noise with seed + r: on the arm alone, that is draw_seed(seed, r, phase).
            mine = population.take(positions).shrink_perturb(arm.lam, arm.sigma, seed=draw_seed(seed, 0, phase), model_fn=model_fn)
            _overwrite(population, positions, mine)
    cold = members.of_kind("cold")
    if reset_optimizer:
        optimizer.reset_state(list(range(members.n)))
    elif cold:
        optimizer.reset_state(cold)


def _restore(trainer: PopulationTrainer, path: Path, policy: ThresholdStop) -> ThresholdStop | None:
    """Load ``path`` into ``trainer``; ``policy`` set to the phase in progress, or None without a checkpoint.

    The rest of the study's state (the recorder's, the policy's decisions) is applied by ``fit``.
    """
    if not path.is_file():
        return None
    state = load_checkpoint(path, map_location=trainer.population.device)
    saved = state.get("policy")
    if not isinstance(saved, dict) or set(saved) != set(policy.state_dict()):
        raise CheckpointError(f"checkpoint {path} is not a warm-start study's checkpoint")
    trainer.load_checkpoint(path)  # the trainer's checks: one line naming the file for another run's checkpoint
    policy.load_state_dict(saved)
    return policy


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
    run_dir: str | Path | None = None,
    resume: bool = False,
    precision: str = "fp32",
) -> WarmStartResult:
    """Run a warm-starting study; every arm has ``replicates`` members.

    Members ``[a * replicates, (a + 1) * replicates)`` belong to arm ``a``, replicate 0 first.
    Replicate r of every arm starts from ``torch.manual_seed(seed + r); model_fn()``, and every
    later random draw is a function of the replicate and the phase only (:func:`draw_seed`).
    Each phase is one ``PopulationTrainer.fit`` (one trainer for the whole study) under a
    :class:`ThresholdStop` policy; a :class:`PhaseRecorder` keeps the records. Callbacks:
    ``on_phase_start(phase, samples, population)`` after the phase-boundary transforms,
    ``on_step(phase, step, active, population)`` after each stack step (``active``: the ``[N]``
    bool mask that step used), ``on_phase_end(record)``. The trained population ends up in
    ``result.population``. Dropout masks are drawn from the global RNG seeded with ``seed`` (the
    caller's RNG state is restored afterwards), so a study is reproducible from its arguments.

    ``run_dir``: write a checkpoint there (``checkpoint.pt``) at every decision and at the end of
    every phase. ``resume=True`` continues from ``run_dir``'s checkpoint (or starts over when
    there is none) to the same weights and records (wall times aside) as an uninterrupted run; the
    checkpoint must come from a study with the same settings. ``precision``: ``"fp32"``,
    ``"bf16"`` or ``"fp16"`` for training and evaluation (see :mod:`popvec.precision`).
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
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir")
    sizes = phase_sizes(protocol, len(train), fraction, chunk_size, chunks)
    device = torch.device(device) if device is not None else train.x.device
    members = _Members(arms, replicates)
    n = members.n

    pop = _initial_population(model_fn, members, seed, device)
    train, test = train.to(device), test.to(device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).to(device)

    result = WarmStartResult(
        protocol,
        arms,
        members.member_arm,
        config={
            "protocol": protocol,
            "replicates": replicates,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "threshold": threshold,
            "max_steps": max_steps,
            "check_every": check_every,
            "phase_sizes": sizes,
            "reset_optimizer": reset_optimizer,
            "seed": seed,
            "train_samples": len(train),
            "test_samples": len(test),
        },
    )
    recorder = PhaseRecorder({**result.config, "arms": [asdict(a) for a in arms]}, on_step)
    opt = build_optimizer(pop, optimizer, lr, momentum, weight_decay)
    trainer = PopulationTrainer(pop, opt, callbacks=[recorder], precision=precision)
    checkpoint = Path(run_dir) / CHECKPOINT_NAME if run_dir is not None else None

    def new_policy(phase: int) -> ThresholdStop:
        return ThresholdStop(threshold, check_every, max_steps, start=trainer.global_step, phase=phase)

    # Dropout masks come from the global RNG: seed it from the study's seed (a resume restores the saved
    # state), and give the caller its own state back afterwards.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        resumed = _restore(trainer, checkpoint, new_policy(0)) if resume and checkpoint is not None else None
        for phase in range(resumed.phase if resumed is not None else 0, len(sizes)):
            if resumed is not None and phase == resumed.phase:
                policy = resumed  # the checkpoint was taken inside this phase, after its boundary transforms
            else:
                if phase > 0:
                    _phase_boundary(pop, opt, members, model_fn, phase, seed, reset_optimizer)
                trainer.state.active = None  # every member trains until the phase's first decision says otherwise
                policy = new_policy(phase)
            recorder.begin_phase(policy, n)  # when resuming, fit restores the checkpoint's records over these
            if on_phase_start is not None:
                on_phase_start(phase, sizes[phase], pop)
            split = _phase_split(train, order, sizes[phase])
            loader = DeviceLoader(split, min(batch_size, len(split)), seed=seed + phase)
            trainer.fit(loader, split, policy.start + max_steps, policy, checkpoint_path=checkpoint)
            record = recorder.end_phase(trainer, split, test)
            if on_phase_end is not None:
                on_phase_end(record)
    result.phases = list(recorder.phases)
    result.wall_time_s = recorder.clock()
    result.population = pop
    return result


def _phase_split(train: TensorSplit, order: Tensor, size: int) -> TensorSplit:
    """The phase's training data: the first ``size`` samples of the study's fixed permutation ``order``."""
    idx = order[:size]
    return TensorSplit(train.x.index_select(0, idx), train.y.index_select(0, idx))
