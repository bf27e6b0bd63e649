"""Trainers: argument checks, selection correctness against plain PyTorch, data sources, resume, history."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from popvec import MultipleInitializationsTrainer, Population, PopulationTrainer, optim
from popvec.data import DatasetSplits, TensorSplit, load_dataset
from popvec.loaders import DeviceLoader
from popvec.models import MLP
from popvec.selection import MetricsTable, SuccessiveHalving
from popvec.trainer import CHECKPOINT_NAME

RTOL, ATOL = 1e-5, 1e-6
BATCH = 64
SEED = 3


def mlp() -> nn.Module:
    return MLP(64, (32,), 10)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def quiet() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small(digits: DatasetSplits) -> DatasetSplits:
    """A 320-sample train split (5 batches of 64) for the longer multi-epoch runs."""
    train = TensorSplit(digits.train.x[:320], digits.train.y[:320])
    return DatasetSplits("digits-small", train, digits.val, digits.test, 10, digits.input_shape)


def make_trainer(num_models: int = 6, num_elim_steps: int = 5, reduce_factor: float = 0.5, **kw: Any) -> MultipleInitializationsTrainer:
    return MultipleInitializationsTrainer(
        mlp,
        adam,
        num_models=num_models,
        num_elim_steps=num_elim_steps,
        reduce_factor=reduce_factor,
        device="cpu",
        seed=SEED,
        console=quiet(),
        progress=False,
        **kw,
    )


def assert_modules_close(a: nn.Module, b: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_modules_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def strip_wall_time(history: dict[str, Any]) -> dict[str, Any]:
    history = copy.deepcopy(history)
    history["cost"].pop("wall_time_s", None)
    return history


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_models": 0}, "num_models"),
        ({"num_models": -1}, "num_models"),
        ({"num_models": 2.5}, "num_models"),
        ({"num_models": True}, "num_models"),
        ({"reduce_factor": 0}, "reduce_factor"),
        ({"reduce_factor": 1}, "reduce_factor"),
        ({"reduce_factor": 1.2}, "reduce_factor"),
        ({"reduce_factor": -0.5}, "reduce_factor"),
        ({"num_elim_steps": 0}, "num_elim_steps"),
        ({"num_elim_steps": -3}, "num_elim_steps"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    calls: list[int] = []

    def counting_model() -> nn.Module:
        calls.append(1)
        return mlp()

    args = {"num_models": 4, "num_elim_steps": 5, "reduce_factor": 0.5, **kwargs}
    with pytest.raises(ValueError, match=name):
        MultipleInitializationsTrainer(counting_model, adam, device="cpu", console=quiet(), progress=False, **args)
    assert calls == []  # rejected before any model was built


@pytest.mark.parametrize("num_epochs", [0, -1, 1.5])
def test_train_rejects_bad_num_epochs_before_work(num_epochs: Any, digits: DatasetSplits) -> None:
    calls: list[int] = []

    def counting_model() -> nn.Module:
        calls.append(1)
        return mlp()

    trainer = MultipleInitializationsTrainer(counting_model, adam, num_models=3, device="cpu", console=quiet(), progress=False)
    with pytest.raises(ValueError, match="num_epochs"):
        trainer.train(DeviceLoader(digits.train, BATCH), digits.val, num_epochs=num_epochs)
    assert calls == [] and trainer.trainer is None


def test_constructor_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="model_fn"):
        MultipleInitializationsTrainer(5, adam)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer_fn"):
        MultipleInitializationsTrainer(mlp, "adam")  # type: ignore[arg-type]


def test_resume_needs_checkpoint_dir(digits: DatasetSplits) -> None:
    with pytest.raises(ValueError, match="checkpoint_dir"):
        make_trainer(3).train(DeviceLoader(digits.train, BATCH), digits.val, resume=True)


def test_one_model_trains_and_is_returned(digits: DatasetSplits) -> None:
    trainer = make_trainer(1)
    loader = DeviceLoader(digits.train, BATCH, seed=0)
    torch.manual_seed(SEED)
    initial = mlp()
    winner = trainer.train(loader, digits.val, num_epochs=1)
    assert isinstance(winner, MLP)
    assert trainer.history["rounds"] == []
    assert trainer.population.n == 1 and trainer.population.ids.tolist() == [0]
    assert trainer.history["cost"]["member_steps"] == loader.steps_per_epoch
    assert trainer.history["cost"]["naive_member_steps"] == loader.steps_per_epoch
    # it trained: weights moved and the returned module is the population's member
    assert not torch.equal(winner.net[0].weight, initial.net[0].weight)
    assert_modules_equal(winner, trainer.population.member(0))
    winner.eval()
    with torch.no_grad():
        loss = F.cross_entropy(winner(digits.val.x), digits.val.y)
    assert trainer.best_val_loss == pytest.approx(float(loss), rel=1e-5)


# --------------------------------------------------------------------------- selection is right
def test_kept_ids_are_lowest_val_losses(digits: DatasetSplits) -> None:
    trainer = make_trainer(6, 5, 0.5)
    trainer.train(DeviceLoader(digits.train, BATCH, seed=1), digits.val, num_epochs=1)
    rounds = trainer.history["rounds"]
    assert [len(r["members"]) for r in rounds] == [6, 3]
    for record in rounds:
        rows = record["members"]
        k = max(1, int(len(rows) * 0.5))
        expected = [r["id"] for r in sorted(rows, key=lambda r: (r["val_loss"], r["id"]))[:k]]
        assert record["kept_ids"] == expected
        assert {r["id"] for r in rows if r["kept"]} == set(expected)
    assert trainer.population.ids.tolist() == rounds[-1]["kept_ids"]


class CheckingPolicy:
    """Wraps a policy; before each decision re-evaluates every member alone with plain PyTorch."""

    def __init__(self, inner: SuccessiveHalving, trainer: PopulationTrainer, val: TensorSplit) -> None:
        self.inner = inner
        self.trainer = trainer
        self.val = val
        self.calls = 0

    def next_decision(self, step: int, n: int) -> int | None:
        return self.inner.next_decision(step, n)

    def decide(self, table: MetricsTable) -> list[int]:
        self.calls += 1
        pop = self.trainer.population
        assert table.ids == pop.ids.tolist()
        assert table.step == self.trainer.global_step
        plain = []
        with torch.no_grad():
            for i in range(pop.n):
                model = pop.member(i)
                model.eval()
                out = model(self.val.x)
                plain.append(float(F.cross_entropy(out, self.val.y)))
                acc = float((out.argmax(-1) == self.val.y).float().mean())
                assert table.columns["val_accuracy"][i] == pytest.approx(acc, abs=1e-6)
        torch.testing.assert_close(torch.tensor(table.columns["val_loss"]), torch.tensor(plain), rtol=1e-5, atol=0)
        keep = self.inner.decide(table)
        order = sorted(range(pop.n), key=lambda p: (plain[p], table.ids[p]))
        assert keep == order[: len(keep)]
        return keep


def test_policy_sees_losses_of_members_evaluated_alone(digits: DatasetSplits) -> None:
    pop = Population.from_factory(mlp, 8, seed=SEED)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-3), console=quiet(), progress=False)
    loader = DeviceLoader(digits.train, BATCH, seed=2)
    policy = CheckingPolicy(SuccessiveHalving(4, 0.5, final_step=14), trainer, digits.val)
    rounds: list[dict[str, Any]] = []
    history = trainer.fit(loader, digits.val, 14, policy, on_round=rounds.append)
    assert policy.calls == 3  # 8 -> 4 (step 4) -> 2 (step 8) -> 1 (step 12)
    assert [r["step"] for r in history["rounds"]] == [4, 8, 12]
    assert rounds == history["rounds"]
    assert trainer.population.n == 1 and trainer.global_step == 14


# --------------------------------------------------------------------------- vs plain PyTorch
def reference_elimination(
    model_fn: Callable[[], nn.Module],
    num_models: int,
    seed: int,
    loader: DeviceLoader,
    val: TensorSplit,
    total_steps: int,
    interval: int,
    reduce_factor: float,
) -> tuple[int, nn.Module, list[list[int]]]:
    """The Multiple Initializations algorithm, one model at a time with torch.optim.Adam."""
    members = []
    for i in range(num_models):
        torch.manual_seed(seed + i)
        model = model_fn()
        members.append((i, model, adam(model.parameters())))
    kept_history = []
    for step in range(1, total_steps + 1):
        x, y = loader.next_batch()
        for _, model, opt in members:
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if len(members) > 1 and (step % interval == 0 or step == total_steps):
            losses = []
            with torch.no_grad():
                for _, model, _ in members:
                    model.eval()
                    losses.append(float(F.cross_entropy(model(val.x), val.y)))
            k = 1 if step == total_steps else max(1, int(len(members) * reduce_factor))
            order = sorted(range(len(members)), key=lambda p: (losses[p], members[p][0]))[:k]
            members = [members[p] for p in order]
            kept_history.append([m[0] for m in members])
    return members[0][0], members[0][1], kept_history


@pytest.mark.parametrize(("num_models", "reduce_factor"), [(6, 0.5), (5, 0.7)])
def test_matches_one_model_at_a_time_reference(small: DatasetSplits, num_models: int, reduce_factor: float) -> None:
    interval, epochs = 3, 2
    total = epochs * DeviceLoader(small.train, BATCH).steps_per_epoch  # 10 steps
    trainer = make_trainer(num_models, interval, reduce_factor)
    winner = trainer.train(DeviceLoader(small.train, BATCH, seed=7), small.val, num_epochs=epochs)
    ref_id, ref_model, ref_kept = reference_elimination(
        mlp, num_models, SEED, DeviceLoader(small.train, BATCH, seed=7), small.val, total, interval, reduce_factor
    )
    assert [r["kept_ids"] for r in trainer.history["rounds"]] == ref_kept
    assert int(trainer.population.ids[0]) == ref_id
    assert_modules_close(winner, ref_model)


def test_matches_reference_when_budget_ends_before_elimination(small: DatasetSplits) -> None:
    """10 members, elimination every 4 steps, 5 steps in all: 10 -> 5 at step 4, then 5 -> 1 at step 5."""
    trainer = make_trainer(10, 4, 0.5)
    winner = trainer.train(DeviceLoader(small.train, BATCH, seed=1), small.val, num_epochs=1)
    ref_id, ref_model, ref_kept = reference_elimination(mlp, 10, SEED, DeviceLoader(small.train, BATCH, seed=1), small.val, 5, 4, 0.5)
    assert [len(k) for k in ref_kept] == [5, 1]
    assert [r["kept_ids"] for r in trainer.history["rounds"]] == ref_kept
    assert [r["step"] for r in trainer.history["rounds"]] == [4, 5]
    assert int(trainer.population.ids[0]) == ref_id
    assert_modules_close(winner, ref_model)


# --------------------------------------------------------------------------- data sources
@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_and_device_loader_agree(small: DatasetSplits, drop_last: bool) -> None:
    batch = 48  # 320 = 6 * 48 + 32: a partial last batch unless dropped
    x, y = small.train.x, small.train.y
    torch_loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=drop_last)
    device_loader = DeviceLoader(small.train, batch, shuffle=False, drop_last=drop_last)
    assert len(torch_loader) == device_loader.steps_per_epoch
    a = make_trainer(5, 3, 0.5)
    wa = a.train(torch_loader, small.val, num_epochs=2)
    b = make_trainer(5, 3, 0.5)
    wb = b.train(device_loader, small.val, num_epochs=2)
    assert int(a.population.ids[0]) == int(b.population.ids[0])
    assert strip_wall_time(a.history) == strip_wall_time(b.history)
    assert_modules_equal(wa, wb)


def test_per_member_data_follows_selection(small: DatasetSplits) -> None:
    n, seed = 6, 100
    loader = DeviceLoader(small.train, BATCH, num_members=n, seed=seed)
    checks: list[list[int]] = []

    def on_round(record: dict[str, Any]) -> None:
        assert loader.member_seeds is not None
        assert loader.member_seeds.tolist() == [seed + i for i in record["kept_ids"]]
        checks.append(record["kept_ids"])

    trainer = make_trainer(n, 3, 0.5)
    winner = trainer.train(loader, small.val, num_epochs=2, on_round=on_round)
    assert [len(k) for k in checks] == [3, 1]
    assert loader.num_members == 1
    assert trainer.population.ids.tolist() == checks[-1]
    assert isinstance(winner, MLP)


def test_per_member_data_differs_from_shared(small: DatasetSplits) -> None:
    """Per-member orders really are different: member i with seed s+i sees other batches than shared mode."""
    shared = make_trainer(3, 100, 0.5)
    shared.train(DeviceLoader(small.train, BATCH, seed=0), small.val, num_epochs=1)
    per = make_trainer(3, 100, 0.5)
    per.train(DeviceLoader(small.train, BATCH, num_members=3, seed=0), small.val, num_epochs=1)
    ls = [r["train_loss"] for r in shared.history["rounds"][0]["members"]]
    lp = [r["train_loss"] for r in per.history["rounds"][0]["members"]]
    assert ls[0] == pytest.approx(lp[0], rel=1e-6)  # member 0 has seed 0 in both
    assert ls[1:] != pytest.approx(lp[1:], rel=1e-6)


def test_per_member_loader_size_must_match(small: DatasetSplits) -> None:
    with pytest.raises(ValueError, match="num_members"):
        make_trainer(4).train(DeviceLoader(small.train, BATCH, num_members=3), small.val)


# --------------------------------------------------------------------------- kill and resume
class Interrupt(Exception):
    pass


def interrupt_after(rounds: int) -> Callable[[dict[str, Any]], None]:
    def hook(record: dict[str, Any]) -> None:
        if record["round"] >= rounds:
            raise Interrupt

    return hook


LOADERS: dict[str, Callable[[TensorSplit], Any]] = {
    "device_shared": lambda split: DeviceLoader(split, BATCH, seed=11),
    "device_per_member": lambda split: DeviceLoader(split, BATCH, num_members=6, seed=11),
    "torch_shuffle": lambda split: DataLoader(TensorDataset(split.x, split.y), batch_size=BATCH, shuffle=True),
}


@pytest.mark.parametrize("after", [1, 2])
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_kill_and_resume_equals_uninterrupted(small: DatasetSplits, tmp_path: Path, kind: str, after: int) -> None:
    make_loader = LOADERS[kind]
    # interval 3 on 5 batches/epoch, 6 -> 3 -> 1 over 2 epochs: round 1 at step 3 (epoch 0,
    # position 3), round 2 at step 6 (epoch 1, position 1); both are mid-epoch.
    torch.manual_seed(1234)
    full = make_trainer(6, 3, 0.5)
    full_winner = full.train(make_loader(small.train), small.val, num_epochs=2)
    assert len(full.history["rounds"]) == 2

    torch.manual_seed(1234)
    first = make_trainer(6, 3, 0.5)
    with pytest.raises(Interrupt):
        first.train(make_loader(small.train), small.val, num_epochs=2, checkpoint_dir=tmp_path, on_round=interrupt_after(after))
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["counters"]["global_step"] == 3 * after
    assert len(saved["history"]["rounds"]) == after

    torch.manual_seed(999)  # whatever the RNG did since, the checkpoint restores it
    resumed = make_trainer(6, 3, 0.5)
    resumed_winner = resumed.train(make_loader(small.train), small.val, num_epochs=2, checkpoint_dir=tmp_path, resume=True)

    assert int(resumed.population.ids[0]) == int(full.population.ids[0])
    assert_modules_equal(resumed_winner, full_winner)
    assert strip_wall_time(resumed.history) == strip_wall_time(full.history)
    assert resumed.best_val_loss == full.best_val_loss


def test_resume_of_finished_run_is_a_no_op(small: DatasetSplits, tmp_path: Path) -> None:
    a = make_trainer(4, 3, 0.5)
    wa = a.train(DeviceLoader(small.train, BATCH), small.val, num_epochs=1, checkpoint_dir=tmp_path)
    b = make_trainer(4, 3, 0.5)
    wb = b.train(DeviceLoader(small.train, BATCH), small.val, num_epochs=1, checkpoint_dir=tmp_path, resume=True)
    assert_modules_equal(wa, wb)
    assert strip_wall_time(a.history) == strip_wall_time(b.history)


def test_resume_without_checkpoint_file(small: DatasetSplits, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_trainer(3).train(DeviceLoader(small.train, BATCH), small.val, checkpoint_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------- history and checkpoints
def test_history_structure_and_cost(digits: DatasetSplits, tmp_path: Path) -> None:
    n, interval = 6, 5
    loader = DeviceLoader(digits.train, BATCH, seed=5)
    total = loader.steps_per_epoch  # 19
    trainer = make_trainer(n, interval, 0.5)
    trainer.train(loader, digits.val, num_epochs=1, checkpoint_dir=tmp_path)
    history = trainer.history
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["step"] for r in rounds] == [5, 10]
    prev_ids = list(range(n))
    for record in rounds:
        assert [m["id"] for m in record["members"]] == prev_ids
        for m in record["members"]:
            assert set(m) == {"id", "train_loss", "val_loss", "val_accuracy", "kept", "diverged"}
            assert isinstance(m["id"], int) and isinstance(m["kept"], bool)
            assert all(isinstance(m[k], float) for k in ("train_loss", "val_loss", "val_accuracy"))
            assert 0.0 <= m["val_accuracy"] <= 1.0 and m["val_loss"] > 0 and m["train_loss"] > 0
        assert sorted(record["kept_ids"]) == sorted(m["id"] for m in record["members"] if m["kept"])
        prev_ids = record["kept_ids"]
    # cost: n * steps summed over the segments between decisions
    sizes = [len(r["members"]) for r in rounds] + [1]
    bounds = [0] + [r["step"] for r in rounds] + [total]
    expected = sum(size * (b - a) for size, a, b in zip(sizes, bounds, bounds[1:]))
    assert expected == 6 * 5 + 3 * 5 + 1 * 9
    cost = history["cost"]
    assert cost["member_steps"] == expected
    assert cost["naive_member_steps"] == n * total
    assert cost["member_steps"] < cost["naive_member_steps"]
    assert cost["fraction_of_naive"] == pytest.approx(expected / (n * total))
    assert cost["global_steps"] == total
    assert cost["samples_seen"] == expected * BATCH
    assert cost["wall_time_s"] > 0
    assert [r["member_steps"] for r in rounds] == [30, 45]

    # the checkpoint is plain data: weights_only loading works and holds the final state
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert set(state) >= {"state", "rng", "history", "counters", "policy", "callbacks"}
    assert set(state["state"]) >= {"population", "optimizer", "loss_hparams", "active", "source"}
    assert state["counters"]["global_step"] == total
    assert state["state"]["population"]["ids"].tolist() == trainer.population.ids.tolist()
    assert strip_wall_time(state["history"]) == strip_wall_time(history)
    winner = trainer.population.member(0)
    for name, value in winner.state_dict().items():
        assert torch.equal(state["state"]["population"]["params"][name][0], value)


def test_population_trainer_fit_without_policy(digits: DatasetSplits, tmp_path: Path) -> None:
    pop = Population.from_factory(mlp, 3, seed=0)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-3), console=quiet(), progress=False)
    history = trainer.fit(DeviceLoader(digits.train, BATCH), digits.val, 7, checkpoint_path=tmp_path / "c.pt")
    assert history["rounds"] == []
    assert history["cost"]["member_steps"] == 21 == history["cost"]["naive_member_steps"]
    assert trainer.population.n == 3
    torch.load(tmp_path / "c.pt", weights_only=True)
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(DeviceLoader(digits.train, BATCH), digits.val, -1)


def test_trainer_rejects_optimizer_of_other_population() -> None:
    a, b = Population.from_factory(mlp, 2), Population.from_factory(mlp, 2)
    with pytest.raises(ValueError, match="optimizer"):
        PopulationTrainer(a, optim.Adam(b, lr=1e-3), console=quiet(), progress=False)


def test_console_output_mentions_elimination(small: DatasetSplits) -> None:
    import io

    buffer = io.StringIO()
    trainer = MultipleInitializationsTrainer(
        mlp,
        adam,
        num_models=4,
        num_elim_steps=2,
        reduce_factor=0.5,
        device="cpu",
        console=Console(file=buffer, width=200),
        progress=False,
    )
    trainer.train(DeviceLoader(small.train, BATCH), small.val, num_epochs=1)
    text = buffer.getvalue()
    assert "Eliminated poor performers. Remaining models: 2" in text
    assert "Eliminated poor performers. Remaining models: 1" in text
    assert "Training complete! Best validation loss:" in text


def test_nan_member_is_eliminated_first(small: DatasetSplits) -> None:
    pop = Population.from_factory(mlp, 4, seed=0)
    pop.params["net.0.weight"][0] = float("nan")  # member 0 (the lowest id) is broken
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-3), console=quiet(), progress=False)
    history = trainer.fit(DeviceLoader(small.train, BATCH), small.val, 6, SuccessiveHalving(3, 0.75, final_step=6))
    first = history["rounds"][0]
    assert first["members"][0]["id"] == 0 and first["members"][0]["val_loss"] != first["members"][0]["val_loss"]
    assert first["kept_ids"] == [r["id"] for r in sorted(first["members"][1:], key=lambda r: (r["val_loss"], r["id"]))]
    assert 0 not in first["kept_ids"] and len(first["kept_ids"]) == 3
    assert trainer.population.n == 1 and int(trainer.population.ids[0]) != 0


def test_validation_dataloader_matches_tensor_split(small: DatasetSplits) -> None:
    val_loader = DataLoader(TensorDataset(small.val.x, small.val.y), batch_size=100)
    a = make_trainer(4, 2, 0.5)
    a.train(DeviceLoader(small.train, BATCH), small.val, num_epochs=1)
    b = make_trainer(4, 2, 0.5)
    b.train(DeviceLoader(small.train, BATCH), val_loader, num_epochs=1)
    assert [r["kept_ids"] for r in a.history["rounds"]] == [r["kept_ids"] for r in b.history["rounds"]]
    for ra, rb in zip(a.history["rounds"], b.history["rounds"]):
        for ma, mb in zip(ra["members"], rb["members"]):
            assert ma["val_loss"] == pytest.approx(mb["val_loss"], rel=1e-5)
            assert ma["val_accuracy"] == pytest.approx(mb["val_accuracy"], abs=1e-6)
    assert a.best_val_loss == pytest.approx(b.best_val_loss, rel=1e-5)
