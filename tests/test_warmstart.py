"""Shrink-and-perturb, the warm-starting study runner and the ``popvec warmstart`` command."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import Reference, assert_member_equals, reference_model, tiny_cnn, tiny_mlp, tiny_mlp_dropout
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from popvec import Population, cli
from popvec.cli.warmstart import build_arms
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader
from popvec.studies.warmstart import Arm, phase_sizes, run_study
from popvec.trainer import PopulationTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
N = 4
SEED = 3


def stacks(pop: Population) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}


# --------------------------------------------------------------------------- shrink_perturb
@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("use_model_fn", [True, False])
def test_identity_is_bit_exact(model_fn: Any, use_model_fn: bool) -> None:
    pop = Population.from_factory(model_fn, N, seed=SEED)
    before = stacks(pop)
    pop.shrink_perturb(1.0, 0.0, seed=99, model_fn=model_fn if use_model_fn else None)
    for k, v in stacks(pop).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("model_fn", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("use_model_fn", [True, False])
def test_lam0_sigma1_is_exactly_the_noise_initialization(model_fn: Any, use_model_fn: bool) -> None:
    """Noise member i == torch.manual_seed(seed + i); model_fn() (also via reset_parameters on the skeleton)."""
    pop = Population.from_factory(model_fn, N, seed=SEED)
    buffers = {k: v.clone() for k, v in pop.buffers.items()}
    pop.shrink_perturb(0.0, 1.0, seed=99, model_fn=model_fn if use_model_fn else None)
    fresh = Population.from_factory(model_fn, N, seed=99)
    for k in pop.params:
        assert torch.equal(pop.params[k], fresh.params[k]), k
    for k, v in pop.buffers.items():  # buffers are not perturbed
        assert torch.equal(v, buffers[k]), k


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.floats(0, 2, allow_nan=False), min_size=N, max_size=N),
    st.lists(st.floats(0, 2, allow_nan=False), min_size=N, max_size=N),
    st.integers(0, 1000),
)
def test_per_member_lam_sigma_apply_to_the_right_members(lam: list[float], sigma: list[float], seed: int) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=SEED)
    before = stacks(pop)
    pop.shrink_perturb(lam, sigma, seed=seed)
    noise = Population.from_factory(tiny_mlp, N, seed=seed)
    for k, v in pop.params.items():
        for i in range(N):
            expected = lam[i] * before[k][i] + sigma[i] * noise.params[k][i]
            torch.testing.assert_close(v[i], expected, rtol=1e-6, atol=1e-6)


def test_seed_none_draws_from_global_rng_and_frozen_params_kept() -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=SEED)
    pop.trainable = ("fc2.weight", "fc2.bias")
    before = stacks(pop)
    torch.manual_seed(0)
    pop.shrink_perturb(0.5, 0.1)
    assert torch.equal(pop.params["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(pop.params["fc2.weight"], before["fc2.weight"])
    again = Population.from_factory(tiny_mlp, N, seed=SEED)
    again.trainable = ("fc2.weight", "fc2.bias")
    torch.manual_seed(0)
    again.shrink_perturb(0.5, 0.1)
    assert torch.equal(again.params["fc2.weight"], pop.params["fc2.weight"])


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lam": -0.1, "sigma": 0.0}, ValueError, "lam must be finite and >= 0"),
        ({"lam": 1.0, "sigma": -1e-3}, ValueError, "sigma must be finite and >= 0"),
        ({"lam": [1.0] * (N + 1), "sigma": 0.0}, ValueError, r"lam must be a float or have one value per member \(length 4\)"),
        ({"lam": 1.0, "sigma": [0.1, -0.1, 0.0, 0.0]}, ValueError, "sigma must be finite and >= 0"),
        ({"lam": float("nan"), "sigma": 0.0}, ValueError, "lam must be finite"),
        ({"lam": True, "sigma": 0.0}, TypeError, "lam must be a number"),
        ({"lam": 1.0, "sigma": 0.1, "model_fn": lambda: nn.Linear(3, 3)}, ValueError, "model_fn must build the population's architecture"),
    ],
)
def test_shrink_perturb_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=SEED)
    with pytest.raises(error, match=match):
        pop.shrink_perturb(**kwargs)


def test_no_reset_parameters_needs_model_fn() -> None:
    pop = Population.from_factory(NoReset, 2)
    with pytest.raises(ValueError, match="pass model_fn"):
        pop.shrink_perturb(0.5, 0.5, seed=0)
    pop.shrink_perturb(0.5, 0.5, seed=0, model_fn=NoReset)
    assert torch.equal(pop.params["scale"], torch.ones(2, 3))


# --------------------------------------------------------------------------- the study
def toy_data(n_train: int = 96, n_test: int = 48) -> tuple[TensorSplit, TensorSplit]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 1, 8, 8, generator=g)
    y = x.flatten(1)[:, :3].argmax(-1)
    return TensorSplit(x[:n_train], y[:n_train]), TensorSplit(x[n_train:], y[n_train:])


def test_phase_sizes() -> None:
    assert phase_sizes("two-phase", 100, fraction=0.3) == [30, 100]
    assert phase_sizes("online", 1257, chunks=10) == [126 * k for k in range(1, 10)] + [1257]
    assert phase_sizes("online", 10, chunk_size=4) == [4, 8, 10]
    for kwargs, match in [
        ({"protocol": "streaming"}, "protocol must be one of online, two-phase"),
        ({"protocol": "two-phase", "fraction": 1.0}, r"fraction must lie in \(0, 1\)"),
        ({"protocol": "online", "chunk_size": 100}, r"chunk_size must be an integer in \[1, 99\]"),
        ({"protocol": "online", "chunks": 1}, r"chunks must be an integer in \[2, 100\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            phase_sizes(num_samples=100, **kwargs)


def test_online_members_stop_on_their_own_and_steps_are_exact() -> None:
    """A member that reaches the threshold stops changing while others continue; steps recorded == taken."""
    train, test = toy_data()
    arms = [Arm("cold", "cold"), Arm("warm", "warm"), Arm.shrink_perturb(0.5, 0.1)]
    taken: dict[int, torch.Tensor] = {}
    prev: dict[str, dict[str, torch.Tensor]] = {}
    mixed = []

    def on_phase_start(phase: int, samples: int, pop: Population) -> None:
        taken[phase] = torch.zeros(pop.n, dtype=torch.long)
        prev["s"] = stacks(pop)

    def on_step(phase: int, step: int, active: torch.Tensor, pop: Population) -> None:
        now = stacks(pop)
        changed = torch.tensor([any(not torch.equal(now[k][i], prev["s"][k][i]) for k in now) for i in range(pop.n)])
        assert torch.equal(changed, active), (phase, step, changed, active)  # frozen exactly when masked
        taken[phase] += changed.long()
        mixed.append(bool(active.any() and not active.all()))
        prev["s"] = now

    result = run_study(
        tiny_mlp,
        train,
        test,
        protocol="online",
        arms=arms,
        replicates=2,
        optimizer="adam",
        lr=0.02,
        batch_size=16,
        threshold=0.9,
        max_steps=150,
        check_every=1,
        chunk_size=32,
        seed=1,
        on_phase_start=on_phase_start,
        on_step=on_step,
    )
    assert [p.samples for p in result.phases] == [32, 64, 96]
    assert any(mixed), "some step should train part of the stack only"
    for p in result.phases:
        assert p.steps == taken[p.phase].tolist()
        for i in range(6):
            if p.reached[i]:
                assert p.train_accuracy[i] >= 0.9
            else:
                assert p.steps[i] == 150
            if p.steps[i] > 0:
                assert p.grad_norm[i] > 0
    # warm members start later phases closer to the threshold than cold ones
    warm, cold = result.arm_members(1), result.arm_members(0)
    assert sum(result.phases[-1].steps[i] for i in warm) <= sum(result.phases[-1].steps[i] for i in cold)
    rows = result.summary()
    assert [r["arm"] for r in rows] == ["cold", "warm", "sp(lam=0.5, sigma=0.1)"]
    json.dumps(result.to_dict())


def test_phase_boundary_transforms() -> None:
    """Cold members are re-initialized with fresh seeds; warm continue; shrink-perturb = lam * w + sigma * noise.

    Every arm starts from the same init (seed + replicate); phase 1's draw is seeded seed + replicate + 2**32.
    """
    train, test = toy_data()
    arms = [Arm("cold", "cold"), Arm("warm", "warm"), Arm.shrink_perturb(0.0, 1.0)]
    starts: list[dict[str, torch.Tensor]] = []
    result = run_study(
        tiny_mlp,
        train,
        test,
        protocol="two-phase",
        arms=arms,
        replicates=1,
        lr=0.05,
        batch_size=16,
        threshold=1.0,
        max_steps=3,
        check_every=1,
        seed=5,
        on_phase_start=lambda phase, samples, pop: starts.append(stacks(pop)),
    )
    first, second = starts
    init = Population.from_factory(tiny_mlp, 1, seed=5)
    fresh = Population.from_factory(tiny_mlp, 1, seed=5 + 2**32)  # phase 1's draw for replicate 0
    for k in fresh.params:
        assert all(torch.equal(first[k][i], init.params[k][0]) for i in range(3))  # one init for every arm
        assert torch.equal(second[k][0], fresh.params[k][0])  # cold: the fresh draw
        assert torch.equal(second[k][2], fresh.params[k][0])  # sp with lam 0, sigma 1: the same draw as noise
        assert not torch.equal(second[k][1], first[k][1])  # warm: trained in phase 0, kept
    assert [p.steps for p in result.phases] == [[3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"replicates": 0}, "replicates must be an integer >= 1"),
        ({"threshold": 1.5}, r"threshold must lie in \(0, 1\]"),
        ({"arms": []}, "arms must hold at least one Arm"),
        ({"arms": [Arm("a", "warm"), Arm("a", "cold")]}, "arms must have distinct names"),
        ({"protocol": "nope"}, "protocol must be one of"),
        ({"optimizer": "lamb"}, "optimizer must be one of sgd, adam"),
    ],
)
def test_run_study_bad_input(kwargs: dict[str, Any], match: str) -> None:
    train, test = toy_data()
    with pytest.raises(ValueError, match=match):
        run_study(tiny_mlp, train, test, max_steps=2, **kwargs)


def test_arm_validation() -> None:
    with pytest.raises(ValueError, match="kind must be one of cold, warm, shrink_perturb"):
        Arm("x", "hot")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        Arm.shrink_perturb(-1, 0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        Arm.shrink_perturb(0.5, -0.1)


# --------------------------------------------------------------------------- CLI
def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "popvec.cli", "warmstart", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


TINY = ["--replicates", "1", "--max-steps", "4", "--check-every", "2", "--batch-size", "32", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol, model", [("online", "mlp"), ("two-phase", "logreg")])
def test_cli_smoke(tmp_path: Path, protocol: str, model: str) -> None:
    out = tmp_path / "ws"
    extra = ["--chunks", "3"] if protocol == "online" else ["--fraction", "0.3"]
    proc = run_cli(["--protocol", protocol, "--model", model, *TINY, *extra, "--sp", "0.5,0.1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test acc" in proc.stdout and "sp(lam=0.5, sigma=0.1)" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["phases"]) == (3 if protocol == "online" else 2)
    assert [r["arm"] for r in json.loads((out / "summary.json").read_text())] == ["cold", "warm", "sp(lam=0.5, sigma=0.1)"]
    pytest.importorskip("matplotlib")
    assert (out / "warmstart.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--protocol", "streaming"], "argument --protocol: invalid choice"),
        (["--sp", "0.5"], "argument --sp: must be LAM,SIGMA"),
        (["--sp", "0.5,-1"], "argument --sp: LAM and SIGMA must be finite and >= 0"),
        (["--threshold", "1.5"], r"argument --threshold: must lie in \(0, 1\]"),
        (["--replicates", "0"], "argument --replicates: must be an integer >= 1"),
        (["--chunk-size", "5000"], r"--chunk-size must be an integer in \[1, 1256\]"),
        (["--no-cold", "--no-warm", "--sp", "0.5,0.1", "--sp", "0.5,0.1"], None),
    ],
)
def test_cli_bad_flags(args: list[str], message: str | None, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if message is None:  # duplicate --sp arms collapse into one: valid
        assert [a.name for a in build_arms(cli.build_parser().parse_args(["warmstart", *args]))] == ["sp(lam=0.5, sigma=0.1)"]
        return
    with pytest.raises(SystemExit) as exc:
        cli.main(["warmstart", *args, "--device", "cpu", "--no-progress", "--max-steps", "1", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_cli_arms_from_flags() -> None:
    parse = cli.build_parser().parse_args
    default = [a.kind for a in build_arms(parse(["warmstart"]))]
    assert default[:2] == ["cold", "warm"] and set(default[2:]) == {"shrink_perturb"}
    assert [a.name for a in build_arms(parse(["warmstart", "--no-cold", "--sp", "0.6,0.01"]))] == ["warm", "sp(lam=0.6, sigma=0.01)"]


# --------------------------------------------------------------------------- the study vs one member at a time
def draw_seed(seed: int, replicate: int, phase: int) -> int:
    """The documented seed of a replicate's draw: its init (phase 0), cold re-initialization or noise (phase >= 1)."""
    return seed + replicate + 2**32 * phase


def accuracy_and_loss(model: nn.Module, split: TensorSplit) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(split.x)
    model.train()
    return float((out.argmax(-1) == split.y).double().mean()), float(F.cross_entropy(out, split.y))


def reference_member(
    model_fn: Any, train: TensorSplit, test: TensorSplit, arm: Arm, replicate: int, cfg: dict[str, Any]
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """One member of a study trained alone with torch.optim: its final model and one row per phase."""
    sizes = phase_sizes(cfg["protocol"], len(train), **cfg["sizes"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg["seed"]))

    def draw(phase: int) -> nn.Module:
        return reference_model(model_fn, draw_seed(cfg["seed"], replicate, phase))

    ref = Reference(draw(0), cfg["opt_fn"], max_grad_norm=math.inf)
    rows = []
    for phase, size in enumerate(sizes):
        if phase > 0 and arm.kind == "cold":
            ref = Reference(draw(phase), cfg["opt_fn"], max_grad_norm=math.inf)
        elif phase > 0 and arm.kind == "shrink_perturb":
            noise = dict(draw(phase).named_parameters())
            with torch.no_grad():
                for name, p in ref.model.named_parameters():
                    p.mul_(arm.lam).add_(arm.sigma * noise[name])
        if phase > 0 and cfg["reset_optimizer"]:
            ref = Reference(ref.model, cfg["opt_fn"], max_grad_norm=math.inf)
        split = TensorSplit(train.x[order[:size]], train.y[order[:size]])
        loader = DeviceLoader(split, min(cfg["batch_size"], size), seed=cfg["seed"] + phase)
        t, norms = 0, []
        while not (
            (t % cfg["check_every"] == 0 or t == cfg["max_steps"])
            and (accuracy_and_loss(ref.model, split)[0] >= cfg["threshold"] or t >= cfg["max_steps"])
        ):
            ref.step(*loader.next_batch())
            norms.append(ref.last_grad_norm)
            t += 1
        train_acc = accuracy_and_loss(ref.model, split)[0]
        test_acc, test_loss = accuracy_and_loss(ref.model, test)
        mean_norm = sum(norms) / len(norms) if norms else math.nan
        rows.append(
            {
                "steps": t,
                "reached": train_acc >= cfg["threshold"],
                "train_accuracy": train_acc,
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                "grad_norm": mean_norm,
            }
        )
    return ref.model, rows


REFERENCE_CASES = {
    "mlp-online-sgd": {
        "model_fn": tiny_mlp,
        "protocol": "online",
        "sizes": {"chunk_size": 32},
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "opt_fn": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "reset_optimizer": True,
        "batch_size": 16,
        "threshold": 0.85,
        "max_steps": 15,
        "check_every": 2,
        "seed": 4,
    },
    "cnn-bn-two-phase-adam": {
        "model_fn": tiny_cnn,
        "protocol": "two-phase",
        "sizes": {"fraction": 0.4},
        "optimizer": "adam",
        "lr": 0.02,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "opt_fn": lambda p: torch.optim.Adam(p, lr=0.02),
        "reset_optimizer": False,
        "batch_size": 16,
        "threshold": 0.6,
        "max_steps": 12,
        "check_every": 3,
        "seed": 2,
    },
}
REFERENCE_ARMS = [Arm("cold", "cold"), Arm("warm", "warm"), Arm.shrink_perturb(0.5, 0.1)]


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_study_matches_members_trained_one_at_a_time(case: str) -> None:
    """Every member's weights, steps, stops and metrics equal a torch.optim loop over that member alone."""
    cfg = REFERENCE_CASES[case]
    train, test = toy_data()
    result = run_study(
        cfg["model_fn"],
        train,
        test,
        protocol=cfg["protocol"],
        arms=REFERENCE_ARMS,
        replicates=2,
        optimizer=cfg["optimizer"],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
        batch_size=cfg["batch_size"],
        threshold=cfg["threshold"],
        max_steps=cfg["max_steps"],
        check_every=cfg["check_every"],
        reset_optimizer=cfg["reset_optimizer"],
        seed=cfg["seed"],
        **cfg["sizes"],
    )
    assert result.population is not None
    stopped_early = 0
    for i, a in enumerate(result.member_arm):
        model, rows = reference_member(cfg["model_fn"], train, test, REFERENCE_ARMS[a], i % 2, cfg)
        assert_member_equals(result.population, i, model, rtol=1e-4, atol=1e-5)
        for record, row in zip(result.phases, rows, strict=True):
            assert record.steps[i] == row["steps"] and record.reached[i] == row["reached"], (i, record.phase)
            stopped_early += 0 < row["steps"] < cfg["max_steps"]
            for name in ("train_accuracy", "test_accuracy", "test_loss", "grad_norm"):
                assert getattr(record, name)[i] == pytest.approx(row[name], rel=1e-4, nan_ok=True), (i, record.phase, name)
    assert stopped_early > 0, "some member should stop at the threshold before max_steps"


def arm_outcome(result: Any, arm: str) -> tuple[str, dict[str, torch.Tensor]]:
    """One arm's records (wall times aside, as exact text) and weights."""
    a = [x.name for x in result.arms].index(arm)
    members = result.arm_members(a)
    records = [{k: [v[i] for i in members] for k, v in asdict(p).items() if isinstance(v, list) and k != "time_s"} for p in result.phases]
    return json.dumps(records), {k: v[members] for k, v in stacks(result.population).items()}


@pytest.mark.parametrize("model_fn, threshold", [(tiny_mlp, 0.85), (tiny_cnn, 0.6)], ids=["mlp", "cnn_bn"])
def test_an_arm_does_not_depend_on_the_arms_beside_it(model_fn: Any, threshold: float) -> None:
    """Seeds follow (replicate, phase), not positions: each arm alone, or in another order, gives the same numbers."""
    train, test = toy_data()
    arms = [Arm("cold", "cold"), Arm("warm", "warm"), Arm.shrink_perturb(0.5, 0.1), Arm.shrink_perturb(0.3, 0.1)]

    def study(arms: list[Arm]) -> Any:
        return run_study(
            model_fn,
            train,
            test,
            protocol="online",
            arms=arms,
            replicates=2,
            optimizer="adam",
            lr=0.02,
            batch_size=16,
            threshold=threshold,
            max_steps=12,
            check_every=3,
            chunk_size=32,
            seed=3,
        )

    together, reversed_order = study(arms), study(arms[::-1])
    for arm in arms:
        expected = arm_outcome(together, arm.name)
        for other in (study([arm]), reversed_order):
            records, weights = arm_outcome(other, arm.name)
            assert records == expected[0], arm.name
            assert all(torch.equal(weights[k], expected[1][k]) for k in weights), arm.name


# --------------------------------------------------------------------------- checkpoints and resume
RESUME_CASES = {
    "mlp-online": {
        "model_fn": tiny_mlp_dropout,
        "protocol": "online",
        "chunk_size": 32,
        "optimizer": "adam",
        "lr": 0.02,
        "threshold": 0.85,
        "max_steps": 12,
        "check_every": 3,
        "seed": 1,
    },
    "cnn-bn-two-phase": {
        "model_fn": tiny_cnn,
        "protocol": "two-phase",
        "fraction": 0.4,
        "optimizer": "adam",
        "lr": 0.02,
        "threshold": 0.6,
        "max_steps": 12,
        "check_every": 3,
        "seed": 2,
        "reset_optimizer": False,
    },
}


def run_case(case: str, **kwargs: Any) -> Any:
    cfg = {**RESUME_CASES[case], **kwargs}
    train, test = toy_data()
    return run_study(cfg.pop("model_fn"), train, test, arms=REFERENCE_ARMS, replicates=2, batch_size=16, **cfg)


def outcome(result: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The records but wall times, as exact text (floats round-trip; NaN == NaN), and the weights."""
    records = [{k: v for k, v in asdict(p).items() if k not in ("time_s", "wall_time_s")} for p in result.phases]
    return json.dumps(records), stacks(result.population)


def assert_same_outcome(a: Any, b: Any) -> None:
    (records_a, weights_a), (records_b, weights_b) = outcome(a), outcome(b)
    assert records_a == records_b
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k


Point = dict[str, Any]


def where(state: dict[str, Any], earlier: list[Point]) -> Point:
    """Where a study checkpoint was taken: phase, step in the phase, the active mask, and whether it is
    the phase's closing checkpoint (a second one at the same step, written when the phase's fit ends)."""
    step = state["counters"]["global_step"]
    active = state["state"]["active"].tolist()
    return {
        "phase": state["policy"]["phase"],
        "t": step - state["policy"]["start"],
        "step": step,
        "active": active,
        "closing": any(p["step"] == step for p in earlier),
    }


def interrupt_at(monkeypatch: pytest.MonkeyPatch, stop: Callable[[Point], bool]) -> list[Point]:
    """Simulate Ctrl-C right after the first checkpoint for which ``stop`` holds is written."""
    original = PopulationTrainer.save_checkpoint
    seen: list[Point] = []

    def save_then_interrupt(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        seen.append(where(torch.load(path, weights_only=True), seen))
        if stop(seen[-1]):
            raise KeyboardInterrupt

    monkeypatch.setattr(PopulationTrainer, "save_checkpoint", save_then_interrupt)
    return seen


KILL_POINTS: dict[str, Callable[[Point], bool]] = {
    "mid-phase, some members frozen": lambda p: 0 < sum(p["active"]) < len(p["active"]),
    "phase 0's closing checkpoint": lambda p: p["phase"] == 0 and p["closing"],
    "phase 1's first decision, after the boundary transforms": lambda p: p["phase"] == 1 and p["t"] == 0,
    "last phase, mid-phase": lambda p: p["phase"] == p["last"] and 0 < p["t"] < 12,
    "the finished study": lambda p: p["phase"] == p["last"] and p["closing"],
}


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    return {case: run_case(case) for case in RESUME_CASES}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_and_resumed_study_equals_uninterrupted(
    case: str, point: str, uninterrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = len(uninterrupted[case].phases) - 1
    with monkeypatch.context() as m:
        seen = interrupt_at(m, lambda p: KILL_POINTS[point]({**p, "last": last}))
        with pytest.raises(KeyboardInterrupt):
            run_case(case, run_dir=tmp_path)
    assert KILL_POINTS[point]({**seen[-1], "last": last})
    assert_same_outcome(run_case(case, run_dir=tmp_path, resume=True), uninterrupted[case])


def test_resume_twice_and_from_nothing(uninterrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-phase, resumed and killed again at the next phase's start, resumed to the end; an empty
    run_dir starts over."""
    run_dir = tmp_path / "twice"
    with monkeypatch.context() as m:
        interrupt_at(m, lambda p: p["phase"] == 1 and p["t"] == 3)
        with pytest.raises(KeyboardInterrupt):
            run_case("mlp-online", run_dir=run_dir)
    with monkeypatch.context() as m:
        seen = interrupt_at(m, lambda p: p["phase"] == 2 and p["t"] == 0)
        with pytest.raises(KeyboardInterrupt):
            run_case("mlp-online", run_dir=run_dir, resume=True)
    assert seen[0]["phase"] == 1 and seen[0]["t"] > 3  # the second run continued phase 1, it did not restart it
    assert_same_outcome(run_case("mlp-online", run_dir=run_dir, resume=True), uninterrupted["mlp-online"])
    caller = torch.get_rng_state()
    assert_same_outcome(run_case("mlp-online", run_dir=tmp_path / "empty", resume=True), uninterrupted["mlp-online"])
    assert torch.equal(torch.get_rng_state(), caller)  # dropout drew from the study's own seeded stream


def test_resume_refuses_another_study(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        run_case("mlp-online", resume=True)
    run_case("mlp-online", run_dir=tmp_path)
    with pytest.raises(ValueError, match="another study .*settings differ: lr"):
        run_case("mlp-online", run_dir=tmp_path, resume=True, lr=0.03)
    torch.save({"policy": None}, tmp_path / "checkpoint.pt")  # a foreign file over popvec's: its checksum no longer fits
    with pytest.raises(ValueError, match="checkpoint.pt is corrupted: sha256 mismatch"):
        run_case("mlp-online", run_dir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt.sha256").unlink()  # a foreign file without one is read, and refused for its keys
    with pytest.raises(ValueError, match="is not a warm-start study's checkpoint"):
        run_case("mlp-online", run_dir=tmp_path, resume=True)


@pytest.mark.parametrize("replicates", [1, 3])
def test_summary_reports_std_and_confidence_interval_over_replicates(replicates: int) -> None:
    """Per arm: mean, sample std and 95% Student-t CI of the final test accuracy over the replicates;
    with one replicate the spread is unknown (NaN, written as null), never 0."""
    from popvec.stats import summarize

    train, test = toy_data()
    arms = [Arm("cold", "cold"), Arm("warm", "warm")]
    kwargs: dict[str, Any] = dict(protocol="two-phase", arms=arms, optimizer="adam", lr=0.02, batch_size=16, threshold=0.9)
    result = run_study(tiny_mlp, train, test, replicates=replicates, max_steps=6, check_every=2, fraction=0.5, seed=1, **kwargs)
    last = result.phases[-1]
    for a, row in enumerate(result.summary()):
        values = [last.test_accuracy[i] for i in result.arm_members(a)]
        expected = summarize(values)
        assert row["final_test_accuracy"] == pytest.approx(expected.mean)
        assert row["stats"]["final_test_accuracy"]["n"] == replicates == row["final_test_accuracy_n_finite"]
        if replicates == 1:
            assert math.isnan(row["final_test_accuracy_std"]) and math.isnan(row["final_test_accuracy_ci_low"])
        else:
            assert row["final_test_accuracy_std"] == pytest.approx(expected.std)
            assert row["final_test_accuracy_ci_low"] <= row["final_test_accuracy"] <= row["final_test_accuracy_ci_high"]
            assert row["final_test_accuracy_ci_high"] - row["final_test_accuracy"] == pytest.approx(
                4.302653 * expected.std / math.sqrt(3), rel=1e-5
            )
    from rich.console import Console

    from popvec.cli.warmstart import summary_table

    console = Console(record=True, width=200)
    console.print(summary_table(result, "mlp", "toy"))
    assert "95% CI" in console.export_text()
