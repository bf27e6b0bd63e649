"""The one population state and the one loop: select/take over every per-member field, callbacks,
the active mask, mid-segment checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import BATCH, IN_SHAPE, NUM_CLASSES, tiny_cnn, tiny_mlp
from rich.console import Console

from popvec import Population, PopulationTrainer, optim
from popvec.callbacks import Callback, ConsoleReporter, HistoryLogger, TensorBoardLogger
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader, DeviceSource
from popvec.losses import cross_entropy
from popvec.schedules import cosine
from popvec.selection import Decision, MetricsTable, SuccessiveHalving
from popvec.state import PopulationState

N = 4


def split(samples: int = 96, seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randn(samples, *IN_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (samples,), generator=g))


def full_state(model_fn: Any = tiny_cnn) -> PopulationState:
    """A state whose every per-member field differs between members, after a few steps."""
    pop = Population.from_factory(model_fn, N, seed=0)
    opt = optim.Adam(
        pop,
        lr=[1e-3, 2e-3, 3e-3, 4e-3],
        betas=([0.9, 0.8, 0.7, 0.6], 0.999),
        max_grad_norm=[1.0, 2.0, 3.0, 4.0],
        schedule=cosine(torch.tensor([10.0, 20.0, 30.0, 40.0])),
    )
    state = PopulationState(pop, opt, {"label_smoothing": [0.0, 0.1, 0.2, 0.3]}, active=[True, False, True, True])
    state.attach_source(DeviceSource(DeviceLoader(split(), BATCH, num_members=N, seed=5)))
    trainer = PopulationTrainer(pop, opt, loss_fn=cross_entropy, callbacks=[])
    trainer.state = state
    for _ in range(3):
        x, y = state.source.next_batch()
        trainer.step(x, y, per_member=True, mask=state.active)
    return state


def member_view(state: PopulationState, i: int) -> dict[str, Any]:
    """Everything member ``i`` owns, as plain tensors."""
    opt = state.optimizer
    assert isinstance(opt, optim.PopulationOptimizer)
    return {
        **{f"param.{k}": v[i] for k, v in state.population.params.items()},
        **{f"buffer.{k}": v[i] for k, v in state.population.buffers.items()},
        **{f"hparam.{k}": v[i] for k, v in state.hparams().items()},
        **{f"opt.{s}.{k}": v[i] for s, d in opt.state.items() for k, v in d.items()},
        "steps": opt.steps[i],
        "schedule": opt.schedule.total_steps[i],  # type: ignore[union-attr]
        "id": state.ids[i],
        "active": state.active[i],  # type: ignore[index]
        "order": state.source.loader.order[i],  # type: ignore[union-attr]
        "seed": state.source.loader.member_seeds[i],  # type: ignore[union-attr]
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


@pytest.mark.parametrize("indices", [[2, 0, 0], [3], [1, 1, 2, 3, 0]])
def test_select_moves_every_per_member_field(indices: list[int]) -> None:
    state = full_state()
    before = [member_view(state, i) for i in range(N)]
    state.select(indices)
    assert state.n == len(indices)
    for j, i in enumerate(indices):
        assert_same(member_view(state, j), before[i])


def test_take_leaves_the_source_state_untouched() -> None:
    state = full_state()
    before = [member_view(state, i) for i in range(N)]
    saved = state.state_dict()
    taken = state.take([3, 1, 1])
    for j, i in enumerate([3, 1, 1]):
        assert_same(member_view(taken, j), before[i])
    for i in range(N):
        assert_same(member_view(state, i), before[i])
    # the two states own their tensors: training the taken one leaves the original as saved
    x, y = taken.source.next_batch()  # type: ignore[union-attr]
    PopulationTrainer(taken.population, taken.optimizer, loss_fn=cross_entropy, loss_hparams=taken.loss_hparams, callbacks=[]).step(
        x, y, True
    )
    for k, v in saved["population"]["params"].items():
        assert torch.equal(state.population.params[k], v)
    assert state.source.loader.position == 3  # type: ignore[union-attr]


def test_take_of_a_torch_optimizer_copies_its_state() -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    opt = optim.from_torch(pop, lambda p: torch.optim.RMSprop(p, lr=1e-2))
    state = PopulationState(pop, opt)
    x, y = split().x[:BATCH], split().y[:BATCH]
    PopulationTrainer(pop, opt, callbacks=[]).step(x, y)
    square_avg = {k: v["square_avg"].clone() for k, v in zip(pop.trainable, opt.optimizer.state.values())}
    taken = state.take([2, 0])
    PopulationTrainer(taken.population, taken.optimizer, callbacks=[]).step(x, y)
    for name, p in zip(pop.trainable, opt._params()):
        assert torch.equal(opt.optimizer.state[p]["square_avg"], square_avg[name])
    for name, p in zip(taken.population.trainable, taken.optimizer._params()):  # type: ignore[attr-defined]
        assert p.shape[0] == 2 and not torch.equal(taken.optimizer.optimizer.state[p]["square_avg"], square_avg[name][[2, 0]])  # type: ignore[attr-defined]


def test_state_dict_round_trip_restores_every_field() -> None:
    state = full_state()
    before = [member_view(state, i) for i in range(N)]
    saved = state.state_dict()
    pop = Population.from_factory(tiny_cnn, N, seed=9)
    fresh = PopulationState(pop, optim.Adam(pop, lr=1.0, max_grad_norm=1.0, schedule=cosine(torch.ones(N))))
    fresh.load_state_dict(saved)
    fresh.attach_source(DeviceSource(DeviceLoader(split(), BATCH, num_members=N, seed=0)))  # the saved order wins
    fresh.optimizer.schedule = state.optimizer.schedule  # type: ignore[attr-defined]  (schedules are code, not state)
    for i in range(N):
        assert_same(member_view(fresh, i), before[i])


def test_set_hparam_reaches_optimizer_and_loss_and_names_the_allowed() -> None:
    state = full_state()
    state.set_hparam("lr", 0.5)
    state.set_hparam("label_smoothing", [0.0, 0.0, 0.0, 0.05])
    assert state.hparams()["lr"].tolist() == [0.5] * N
    assert state.loss_hparams["label_smoothing"].tolist()[3] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="name must be one of"):
        state.set_hparam("dropout", 0.1)


# ---------------------------------------------------------------------------- the loop
class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, trainer: PopulationTrainer, steps: int) -> None:
        self.events.append(("start", steps))

    def on_segment(self, trainer: PopulationTrainer, steps: int) -> None:
        self.events.append(("segment", steps))

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        self.events.append(("step", trainer.global_step))

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self.events.append(("round", record["step"]))

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        self.events.append(("end", trainer.global_step))


def test_the_loop_prints_nothing_and_calls_the_hooks_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    recorder = Recorder()
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[recorder])
    trainer.fit(DeviceLoader(split(), BATCH, seed=0), split(32, seed=1), 5, SuccessiveHalving(2, 0.5))
    assert capsys.readouterr().out == ""
    assert recorder.events == [
        ("start", 5),
        ("segment", 2),
        ("step", 1),
        ("step", 2),
        ("round", 2),
        ("segment", 2),
        ("step", 3),
        ("step", 4),
        ("round", 4),
        ("segment", 1),
        ("step", 5),
        ("end", 5),
    ]


def test_console_reporter_prints_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    console = Console(width=120, force_terminal=False)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[ConsoleReporter(console, progress=False)])
    trainer.fit(DeviceLoader(split(), BATCH, seed=0), split(32, seed=1), 4, SuccessiveHalving(2, 0.5))
    out = capsys.readouterr().out
    assert "Round 1 (step 2)" in out and "Eliminated poor performers. Remaining models: 2" in out


def test_history_logger_writes_json_and_csv(tmp_path: Path) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[HistoryLogger(tmp_path)])
    trainer.fit(DeviceLoader(split(), BATCH, seed=0), split(32, seed=1), 4, SuccessiveHalving(2, 0.5))
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["rounds"]) == 2 and history["cost"]["global_steps"] == 4
    lines = (tmp_path / "rounds.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["round", "step", "id"] and len(lines) == 1 + N + N // 2


def test_tensorboard_logger_writes_one_series_per_member(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[TensorBoardLogger(tmp_path, every=1)])
    trainer.fit(DeviceLoader(split(), BATCH, seed=0), split(32, seed=1), 2, SuccessiveHalving(2, 0.5))
    assert any(tmp_path.iterdir())


class FreezeAfterFirstCheck:
    """Decide at step 0 and 3: first freeze members 1 and 3, then freeze everyone (training ends)."""

    def __init__(self) -> None:
        self.done: list[int] = []

    def next_decision(self, step: int, n: int) -> int | None:
        later = [t for t in (0, 3) if t >= step and t not in self.done]
        return min(later) if later else None

    def decide(self, table: MetricsTable) -> Decision:
        self.done.append(table.step)
        active = [True, False, True, False] if table.step == 0 else [False] * 4
        return Decision(list(range(len(table))), active=active)


def test_decision_active_freezes_members_and_ends_training_when_none_is_left() -> None:
    pop = Population.from_factory(tiny_cnn, N, seed=0)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), callbacks=[])
    before = {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}
    history = trainer.fit(DeviceLoader(split(), BATCH, seed=0), split(32, seed=1), 100, FreezeAfterFirstCheck())
    assert trainer.global_step == 3 and history["cost"]["member_steps"] == 6
    assert trainer.optimizer.steps.tolist() == [3.0, 0.0, 3.0, 0.0]  # type: ignore[attr-defined]
    for k, v in [*pop.params.items(), *pop.buffers.items()]:
        for i in (1, 3):
            assert torch.equal(v[i], before[k][i]), k
        if v.is_floating_point() and k in pop.params:
            assert not torch.equal(v[0], before[k][0]), k
    assert history["rounds"][0]["active_ids"] == [0, 2]


class StopAt(Exception):
    pass


class Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        if trainer.global_step == self.at:
            raise StopAt


@pytest.mark.parametrize("crash_at", [3, 5, 8])
def test_checkpoint_every_resumes_mid_round_exactly(tmp_path: Path, crash_at: int) -> None:
    def run(callbacks: list[Callback], resume: bool) -> PopulationTrainer:
        pop = Population.from_factory(tiny_cnn, 6, seed=0)
        trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), callbacks=callbacks)
        if resume:
            trainer.load_checkpoint(tmp_path / "ck.pt")
        loader = DeviceLoader(split(), BATCH, num_members=6, seed=0)
        trainer.fit(loader, split(32, seed=1), 10, SuccessiveHalving(4, 0.5), checkpoint_path=tmp_path / "ck.pt", checkpoint_every=2)
        return trainer

    full = run([], False)
    with pytest.raises(StopAt):
        run([Crash(crash_at)], False)
    resumed = run([], True)
    for k, v in full.population.params.items():
        assert torch.equal(resumed.population.params[k], v), k
    strip = lambda h: {**h, "cost": {k: v for k, v in h["cost"].items() if k != "wall_time_s"}}  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_an_empty_batch_is_refused_and_counts_no_step() -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[])
    with pytest.raises(ValueError, match="at least one sample"):
        trainer.step(torch.zeros(0, *IN_SHAPE), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sample"):
        trainer.step(torch.zeros(N, 0, *IN_SHAPE), torch.zeros(N, 0, dtype=torch.long), per_member=True)
    assert trainer.global_step == 0 and trainer.member_steps == 0


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_evaluate_refuses_a_bad_batch_size(batch_size: Any) -> None:
    pop = Population.from_factory(tiny_mlp, N, seed=0)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), callbacks=[])
    with pytest.raises(ValueError, match="batch_size"):
        trainer.evaluate(split(32), batch_size=batch_size)
