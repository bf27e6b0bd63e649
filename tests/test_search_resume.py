"""Searches resumable after a crash: every stateful policy saves and restores what it remembers (plain
data, read back with ``weights_only=True``) and decides on exactly as before; Hyperband (side by side,
one bracket after another, ASHA with early stopping), PBT and staged fidelity killed right after their
k-th checkpoint and resumed end with the same winner, weights, leaderboard and history as an
uninterrupted run; killed before any checkpoint, they start over; the one-line reports continue."""

from __future__ import annotations

import copy
import io
import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

from popvec.data import load_dataset
from popvec.models import model_factory
from popvec.search.early_stopping import EarlyStopping
from popvec.search.hyperband import HyperbandPolicy, hyperband, hyperband_brackets
from popvec.search.pbt import PBT, pbt
from popvec.search.run import SearchReporter, SearchResult, make_trainer
from popvec.search.space import Choice, LogUniform, SearchSpace
from popvec.search.staged import Stage, run_staged
from popvec.selection import MetricsTable, SelectionPolicy, as_decision
from popvec.trainer import CHECKPOINT_NAME, PopulationTrainer


# --------------------------------------------------------------------------- policy state
def through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` saved and read back as checkpoints are: plain data only, or the load fails."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@dataclass
class Simulation:
    """A population as the trainer would hold it, without tensors: ids, hyperparameters, the step.

    Metrics are drawn from ``(step, id)`` only, so two copies see the same tables; one member's
    training loss goes NaN at step 6 (the non-finite rule)."""

    ids: list[int]
    hparams: dict[str, list[float]]
    step: int = 0
    limit: int = 30  # the budget: early stopping's checks never end by themselves

    def table(self) -> MetricsTable:
        def draw(member: int, salt: int) -> float:
            return random.Random(self.step * 1009 + member * 13 + salt).random()

        train = [math.nan if (m == 3 and self.step == 6) else 2.0 / (1 + self.step) + draw(m, 0) for m in self.ids]
        val = [1.0 / (1 + self.step) + draw(m, 1) for m in self.ids]
        acc = [draw(m, 2) for m in self.ids]
        columns = {"train_loss": train, "val_loss": val, "val_accuracy": acc}
        return MetricsTable(list(self.ids), columns, step=self.step, hparams=copy.deepcopy(self.hparams))

    def advance(self, policy: SelectionPolicy) -> dict[str, Any] | None:
        """Ask ``policy`` when to decide, decide there, apply the answer; the answer and the step (None when done)."""
        due = policy.next_decision(self.step, len(self.ids))
        if due is None or due > self.limit:
            return None
        self.step = due
        decision = as_decision(policy.decide(self.table()))
        self.ids = decision.ids if decision.ids is not None else [self.ids[p] for p in decision.keep]
        self.hparams = {k: [v[p] for p in decision.keep] for k, v in self.hparams.items()}
        for name, updates in decision.hparams.items():
            for position, value in updates.items():
                self.hparams[name][position] = value
        return {
            "step": due,
            "keep": decision.keep,
            "ids": self.ids,
            "hparams": decision.hparams,
            "reasons": decision.reasons,
            "events": decision.events,
        }

    def run(self, policy: SelectionPolicy, decisions: int | None = None) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        while decisions is None or len(answers) < decisions:
            answer = self.advance(policy)
            if answer is None:
                break
            answers.append(answer)
        return answers


BRACKETS = hyperband_brackets(max_t=27)  # 27, 12, 6, 4 members; rungs at 1, 3, 9, 27
BRACKET_OF = {i: b.s for i, b in enumerate(b for b in BRACKETS for _ in range(b.n))}
PBT_SPACE = SearchSpace({"lr": LogUniform(1e-4, 1e-1), "beta1": Choice([0.8, 0.85, 0.9])})


def hyperband_policy(rule: str) -> Callable[[], Any]:
    return lambda: HyperbandPolicy(BRACKETS, BRACKET_OF, rule=rule)


POLICIES: dict[str, tuple[Callable[[], Any], int]] = {  # a fresh policy, and how many members it starts with
    "hyperband_sha": (hyperband_policy("sha"), len(BRACKET_OF)),
    "hyperband_asha": (hyperband_policy("asha"), len(BRACKET_OF)),
    "early_stopping_asha": (
        lambda: EarlyStopping(
            HyperbandPolicy(BRACKETS, BRACKET_OF, rule="asha"), slope_window=4, patience=3, min_delta=0.05, check_every=2
        ),
        len(BRACKET_OF),
    ),
    "pbt": (lambda: PBT(3, PBT_SPACE, seed=5, final_step=30), 8),
    "early_stopping_pbt": (lambda: EarlyStopping(PBT(3, PBT_SPACE, seed=5, final_step=30), patience=6, check_every=2), 8),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("after", [1, 2])
def test_policy_state_restores_its_decisions(name: str, after: int) -> None:
    fresh, n = POLICIES[name]
    sim = Simulation(list(range(n)), {k: list(v) for k, v in PBT_SPACE.sample(n, 0).items()})
    original = fresh()
    sim.run(original, after)
    restored = fresh()
    restored.load_state_dict(through_checkpoint(original.state_dict()))
    assert json.dumps(restored.state_dict()) == json.dumps(original.state_dict())
    twin = copy.deepcopy(sim)
    expected = sim.run(original)
    assert len(expected) >= 2  # decisions left to compare
    assert json.dumps(twin.run(restored)) == json.dumps(expected)
    assert json.dumps(restored.state_dict()) == json.dumps(original.state_dict())  # PBT: the lineage


def test_policy_state_matters() -> None:
    """Without its state early stopping decides otherwise (so the test above checks something)."""
    for name in ("early_stopping_asha", "early_stopping_pbt"):
        fresh, n = POLICIES[name]
        sim = Simulation(list(range(n)), {k: list(v) for k, v in PBT_SPACE.sample(n, 0).items()})
        original = fresh()
        sim.run(original, 3)
        twin = copy.deepcopy(sim)
        assert json.dumps(twin.run(fresh())) != json.dumps(sim.run(original)), name


# --------------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def model_fn(data: Any) -> Callable[[], torch.nn.Module]:
    return model_factory("mlp", data.input_shape, data.num_classes, hidden=(16,))


SPACE = SearchSpace({"lr": LogUniform(1e-4, 3e-1)})
ASHA_EARLY = {"rule": "asha", "early_stopping": {"patience": 4, "slope_window": 6, "check_every": 2}}
# name: (keyword arguments, checkpoints an uninterrupted run writes)
HYPERBAND: dict[str, tuple[dict[str, Any], int]] = {
    "side_by_side": ({}, 4),  # rounds at steps 2, 6, 18, then the end
    "one_after_another": ({"side_by_side": False}, 9),  # brackets of 4, 3 and 2 checkpoints
    "asha_early_stopping": (ASHA_EARLY, 10),  # a check every 2 steps, then the end
}


def run_hyperband(data: Any, extra: dict[str, Any], **kwargs: Any) -> tuple[SearchResult, list[str]]:
    console = Console(file=io.StringIO(), width=300)
    result = hyperband(
        model_fn(data),
        SPACE,
        data.train,
        data.val,
        data.test,
        max_t=9,
        unit_steps=2,
        batch_size=32,
        seed=3,
        console=console,
        **extra,
        **kwargs,
    )
    return result, report_lines(console)


def run_pbt(data: Any, extra: dict[str, Any], **kwargs: Any) -> tuple[SearchResult, list[str]]:
    console = Console(file=io.StringIO(), width=300)
    result = pbt(
        model_fn(data),
        SearchSpace({"lr": LogUniform(1e-3, 1e-1)}),
        data.train,
        data.val,
        data.test,
        num_models=6,
        perturbation_interval=5,
        steps=20,
        batch_size=32,
        seed=4,
        console=console,
        **extra,
        **kwargs,
    )
    return result, report_lines(console)


def report_lines(console: Console) -> list[str]:
    """The one-line-per-decision report (``step N | ...``) a run printed."""
    return [line for line in console.file.getvalue().splitlines() if line.startswith("step ")]  # type: ignore[attr-defined]


def kill_after(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """From now on, raise KeyboardInterrupt right after the k-th checkpoint is written (a Ctrl-C there)."""
    original = PopulationTrainer.save_checkpoint
    written = [0]

    def save_then_interrupt(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        written[0] += 1
        if written[0] == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(PopulationTrainer, "save_checkpoint", save_then_interrupt)


def without_wall_time(history: dict[str, Any]) -> dict[str, Any]:
    return {**history, "cost": {k: v for k, v in history["cost"].items() if k != "wall_time_s"}}


def comparable(result: SearchResult) -> str:
    """Everything a search returns but the winner's weights and the wall times, as text (NaN == NaN)."""
    return json.dumps({"best": result.best, "leaderboard": result.leaderboard, "history": without_wall_time(result.history)})


def assert_same_result(a: SearchResult, b: SearchResult) -> None:
    assert a.best["id"] == b.best["id"]
    wa, wb = a.winner.state_dict(), b.winner.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert comparable(a) == comparable(b)


def assert_report_tracks_best(result: SearchResult, lines: list[str]) -> None:
    """Each report line names the member with the lowest val_loss in all rounds so far (the first on ties)."""
    rounds = result.history["rounds"]
    assert len(lines) == len(rounds)
    best: tuple[float, int] | None = None
    for record, line in zip(rounds, lines):
        for row in record["members"]:
            if not math.isnan(row["val_loss"]) and (best is None or row["val_loss"] < best[0]):
                best = (row["val_loss"], row["id"])
        assert best is not None and f"best so far: id {best[1]} val_loss {best[0]:.4f}" in line, line


_REFERENCE: dict[str, tuple[SearchResult, list[str]]] = {}


def reference(key: str, run: Callable[[], tuple[SearchResult, list[str]]]) -> tuple[SearchResult, list[str]]:
    """An uninterrupted run without checkpoints, computed once per configuration; its report checked."""
    if key not in _REFERENCE:
        result, lines = run()
        assert_report_tracks_best(result, lines)
        _REFERENCE[key] = result, lines
    return _REFERENCE[key]


def progress_in(run_dir: Path) -> tuple[int, int]:
    """The decision rounds and the global steps the checkpoint in ``run_dir`` holds, over all runs of the search."""
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    finished = [run for s in state["callbacks"].values() if "finished_runs" in s for run in s["finished_runs"]]
    rounds = len(state["history"]["rounds"]) + sum(len(run["rounds"]) for run in finished)
    return rounds, state["counters"]["global_step"] + sum(run["cost"]["global_steps"] for run in finished)


def kill_then_resume(
    run: Callable[..., tuple[SearchResult, list[str]]], run_dir: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[SearchResult, list[str], int]:
    """Run killed after checkpoint ``k``, then resumed: the result, the resumed run's report, the rounds checkpointed.

    The resumed run trains only the steps the checkpoint does not hold (finished brackets are skipped)."""
    with monkeypatch.context() as m:
        kill_after(m, k)
        with pytest.raises(KeyboardInterrupt):
            run(run_dir=run_dir)
    done, steps_done = progress_in(run_dir)
    trained = [0]
    original = PopulationTrainer.step

    def counting_step(self: PopulationTrainer, *args: Any, **kwargs: Any) -> Any:
        trained[0] += 1
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(PopulationTrainer, "step", counting_step)
        result, lines = run(run_dir=run_dir, resume=True)
    assert steps_done + trained[0] == result.cost["global_steps"]
    return result, lines, done


@pytest.mark.parametrize(
    ("config", "k"),
    [
        ("side_by_side", 1),
        ("side_by_side", 3),
        ("one_after_another", 2),
        ("one_after_another", 4),
        ("one_after_another", 6),
        ("asha_early_stopping", 2),
        ("asha_early_stopping", 7),
        ("asha_early_stopping", 10),
    ],
)
def test_hyperband_killed_after_checkpoint_k_resumes_exactly(
    config: str, k: int, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    extra, total = HYPERBAND[config]
    assert k <= total
    full, full_lines = reference(f"hyperband-{config}", lambda: run_hyperband(digits, extra))
    resumed, lines, done = kill_then_resume(lambda **kw: run_hyperband(digits, extra, **kw), tmp_path / "run", k, monkeypatch)
    assert_same_result(full, resumed)
    # The report goes on where it stopped: same lines, best-so-far included, for every round after the checkpoint.
    assert lines == full_lines[done:]


def test_hyperband_checkpoints_count(digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None) -> None:
    """The k above are checkpoints of these runs: one per decision round and one at the end of each ``fit``."""
    written: list[int] = []
    original = PopulationTrainer.save_checkpoint

    def count(self: PopulationTrainer, path: Any) -> None:
        original(self, path)
        written.append(self.global_step)

    monkeypatch.setattr(PopulationTrainer, "save_checkpoint", count)
    for name, (extra, total) in HYPERBAND.items():
        written.clear()
        result, _ = run_hyperband(digits, extra, run_dir=tmp_path / name)
        assert len(written) == total == len(result.history["rounds"]) + (1 if result.history["config"]["side_by_side"] else 3), name


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pbt_killed_after_checkpoint_k_resumes_exactly(
    k: int, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    full, full_lines = reference("pbt", lambda: run_pbt(digits, {}))
    assert len(full.history["lineage"]) == 6  # 3 perturbations, then the end: 4 checkpoints
    resumed, lines, done = kill_then_resume(lambda **kw: run_pbt(digits, {}, **kw), tmp_path / "run", k, monkeypatch)
    assert done == min(k, 3)
    assert_same_result(full, resumed)
    assert resumed.history["lineage"] == full.history["lineage"]
    assert lines == full_lines[done:]


@pytest.mark.parametrize("run", ["hyperband", "pbt"])
def test_killed_before_any_checkpoint_starts_over(
    run: str, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    key, search = {
        "hyperband": ("hyperband-one_after_another", lambda **kw: run_hyperband(digits, HYPERBAND["one_after_another"][0], **kw)),
        "pbt": ("pbt", lambda **kw: run_pbt(digits, {}, **kw)),
    }[run]
    full, _ = reference(key, search)
    original = PopulationTrainer.step

    def crash_at_step_2(self: PopulationTrainer, *args: Any, **kwargs: Any) -> Any:
        if self.global_step == 1:  # before the first decision (step 2 for Hyperband, 5 for PBT)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(PopulationTrainer, "step", crash_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            search(run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()
    resumed, _ = search(run_dir=tmp_path / "run", resume=True)
    assert_same_result(full, resumed)


def test_resume_needs_a_run_dir(digits: Any) -> None:
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        run_hyperband(digits, {}, resume=True)
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        run_pbt(digits, {}, resume=True)


class BestId(SearchReporter):
    def line(self, record: Mapping[str, Any]) -> str:
        return f"{record['step']}: {self.best.get('id')}"


def test_reporter_recomputes_the_best_when_fit_starts() -> None:
    """A reporter started on a resumed trainer (or on a later bracket) prints what one that saw every round
    prints: the best so far comes back from the history and the earlier rounds, even when it is in the
    last round restored."""
    records = [
        {"step": s, "members": [{"id": i, "val_loss": v} for i, v in enumerate(losses)]}
        for s, losses in [(1, [3.0, 2.0]), (2, [1.0, math.nan]), (3, [1.5, 1.2]), (4, [1.0, 1.1])]
    ]
    whole = BestId(Console(file=io.StringIO()))
    whole.on_fit_start(SimpleNamespace(history={"rounds": []}), 4)  # type: ignore[arg-type]
    expected = []
    for record in records:
        whole.on_round(None, record)  # type: ignore[arg-type]
        expected.append(whole.line(record))
    assert expected == ["1: 1", "2: 0", "3: 0", "4: 0"]
    for prior, restored in [([], 2), ([], 3), (records[:1], 1), (records[:2], 0)]:
        resumed = BestId(Console(file=io.StringIO()), prior_rounds=prior)
        resumed.on_fit_start(SimpleNamespace(history={"rounds": records[len(prior) : len(prior) + restored]}), 4)  # type: ignore[arg-type]
        lines = []
        for record in records[len(prior) + restored :]:
            resumed.on_round(None, record)  # type: ignore[arg-type]
            lines.append(resumed.line(record))
        assert lines == expected[len(prior) + restored :]


def test_on_round_hook_still_called(digits: Any, tmp_path: Path, single_thread: None) -> None:
    seen: list[int] = []
    result, lines = run_hyperband(digits, {}, on_round=lambda record: seen.append(record["step"]), run_dir=tmp_path, progress=False)
    assert seen == [r["step"] for r in result.history["rounds"]] == [2, 6, 18]
    assert lines == []  # progress=False: no report


# --------------------------------------------------------------------------- staged fidelity
STAGES = [Stage("S0", 4, 0.1, 0.5), Stage("S1", 6, 0.5, 0.5), Stage("S3", 6, 1.0, 1.0)]
STAGED_EARLY = {"patience": 4, "check_every": 2}


def staged_trainer(data: Any) -> PopulationTrainer:
    values = SearchSpace({"lr": LogUniform(1e-3, 1e-1)}).sample(8, 0)
    return make_trainer(model_fn(data), values, progress=False, console=Console(file=io.StringIO()))


def run_stages(data: Any, **kwargs: Any) -> PopulationTrainer:
    trainer = staged_trainer(data)
    run_staged(trainer, STAGES, data.train, data.val, batch_size=32, early_stopping=STAGED_EARLY, **kwargs)
    return trainer


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_staged_killed_after_checkpoint_k_resumes_exactly(
    k: int, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_thread: None
) -> None:
    """Checkpoints: S0's round at 2, its cut at 4, the end of its fit at 4, S1's rounds at 6, 8, its cut at 10, ...
    k=2 and 3 stop at S0's last step, where the resumed run must finish S0's fit, not start S1's with S0's state."""
    full = run_stages(digits)
    path = tmp_path / CHECKPOINT_NAME
    with monkeypatch.context() as m:
        kill_after(m, k)
        with pytest.raises(KeyboardInterrupt):
            run_stages(digits, checkpoint_path=path)
    resumed = run_stages(digits, checkpoint_path=path, resume=True)
    assert resumed.global_step == full.global_step == 16
    assert resumed.population.ids.tolist() == full.population.ids.tolist()
    for name, stack in full.population.params.items():
        assert torch.equal(resumed.population.params[name], stack), name
    assert json.dumps(without_wall_time(resumed.history)) == json.dumps(without_wall_time(full.history))


def test_staged_resume_needs_a_checkpoint_path(digits: Any) -> None:
    with pytest.raises(ValueError, match="resume=True needs checkpoint_path"):
        run_staged(staged_trainer(digits), STAGES, digits.train, digits.val, resume=True)
