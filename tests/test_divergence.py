"""Results you can trust: diverged members rank last and are recorded, barriers over non-finite networks
are NaN, a run with no finite member fails loudly (no winner.pt), NaN data is refused, and --seed
reproduces a run with dropout bit for bit across processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from popvec import MultipleInitializationsTrainer, Population, PopulationTrainer, cli, optim
from popvec.data import DatasetSplits, TensorSplit, load_dataset
from popvec.engine import evaluate
from popvec.loaders import DeviceLoader
from popvec.models import MLP
from popvec.selection import SuccessiveHalving
from popvec.studies import lmc
from popvec.trainer import AllDiverged

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
TINY = ["--num-models", "3", "--num-elim-steps", "5", "--epochs", "1", "--batch-size", "64", "--model", "mlp", "--optimizer", "sgd"]
QUIET = ["--no-progress", "--device", "cpu"]


def mlp() -> nn.Module:
    return MLP(64, (32,), 10)


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


def quiet_trainer(pop: Population) -> PopulationTrainer:
    return PopulationTrainer(pop, optim.SGD(pop, lr=0.05), console=Console(quiet=True), progress=False)


def poison(pop: Population, member: int) -> None:
    for value in pop.params.values():
        value.data[member] = float("nan")


# --------------------------------------------------------------------------- the trainer
def test_nan_member_is_eliminated_first_and_the_others_are_unaffected(digits: DatasetSplits) -> None:
    clean = quiet_trainer(Population.from_factory(mlp, 4, seed=0))
    clean.fit(DeviceLoader(digits.train, BATCH, seed=1), digits.val, 5)
    pop = Population.from_factory(mlp, 4, seed=0)
    poison(pop, 2)
    trainer = quiet_trainer(pop)
    trainer.fit(DeviceLoader(digits.train, BATCH, seed=1), digits.val, 5, SuccessiveHalving(5, 0.75))
    (record,) = trainer.history["rounds"]
    assert record["kept_ids"] == [i for i in record["kept_ids"] if i != 2] and 2 not in record["kept_ids"]
    rows = {row["id"]: row for row in record["members"]}
    assert rows[2]["diverged"] and not any(rows[i]["diverged"] for i in (0, 1, 3))
    assert math.isnan(rows[2]["val_loss"]) and math.isnan(rows[2]["val_accuracy"])
    assert rows[2]["diverged_step"] == 1 and rows[2]["diverged_reason"] == "loss nan"
    assert trainer.history["diverged"] == {"2": {"step": 1, "reason": "loss nan"}}
    assert "all_nan" not in record
    for position, member in enumerate(trainer.population.ids.tolist()):
        for name, value in trainer.population.params.items():
            assert torch.equal(value[position], clean.population.params[name][member]), (member, name)


def test_weights_gone_non_finite_without_a_bad_loss_are_caught_at_the_decision(digits: DatasetSplits) -> None:
    trainer = quiet_trainer(Population.from_factory(mlp, 3, seed=0))
    trainer.fit(DeviceLoader(digits.train, BATCH, seed=1), digits.val, 2)
    poison(trainer.population, 0)
    diverged = trainer.check_divergence()
    assert diverged.tolist() == [True, False, False]
    assert trainer.history["diverged"]["0"] == {"step": 2, "reason": "weights not finite"}


def test_all_nan_round_says_so(digits: DatasetSplits) -> None:
    pop = Population.from_factory(mlp, 2, seed=0)
    poison(pop, 0)
    poison(pop, 1)
    trainer = quiet_trainer(pop)
    with pytest.warns(RuntimeWarning, match="NaN for every member"):
        trainer.fit(DeviceLoader(digits.train, BATCH, seed=1), digits.val, 3, SuccessiveHalving(3, 0.5))
    assert "val_loss" in trainer.history["rounds"][0]["all_nan"]


def test_multiple_initializations_raise_all_diverged(digits: DatasetSplits) -> None:
    trainer = MultipleInitializationsTrainer(
        mlp, lambda p: torch.optim.SGD(p, lr=1e9), num_models=3, num_elim_steps=3, device="cpu", console=Console(quiet=True), progress=False
    )
    with pytest.raises(AllDiverged, match=r"no member stayed finite: all 3 diverged \(first at step \d+: (val )?loss (nan|inf)\)"):
        trainer.train(DeviceLoader(digits.train, BATCH, seed=0), digits.val, num_epochs=1)


# --------------------------------------------------------------------------- the CLI
def test_cli_train_huge_lr_exits_1_without_winner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, *QUIET, "--lr", "1e9", "--out", str(out)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "no member stayed finite: all 3 diverged (first at step" in text and "try a smaller --lr" in text
    assert not (out / "winner.pt").exists() and "Winner:" not in text


def test_cli_pbt_huge_lr_exits_1_without_winner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["pbt", "--num-models", "3", "--steps", "6", "--perturbation-interval", "3", "--optimizer", "sgd"]
    assert cli.main([*argv, "--lr-range", "1e9,1e10", "--no-plots", *QUIET, "--out", str(out)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "no member stayed finite: all 3 diverged" in text
    assert not (out / "winner.pt").exists()


def test_cli_instability_huge_lr_prints_nan_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["instability", "--model", "mlp", "--k1", "0,2", "--k2", "5", "--alphas", "3", "--copies", "2", "--optimizer", "sgd"]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        code = cli.main([*argv, "--lr", "1e9", "--no-plots", *QUIET, "--out", str(tmp_path / "run")])
    assert code == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "Barrier nan for k1 = 0, 2" in text and "0.00" not in text


# --------------------------------------------------------------------------- paths and barriers
def test_interpolate_to_a_nan_network_gives_nan_barriers_and_warns(digits: DatasetSplits) -> None:
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=r"endpoint b has non-finite parameters.*alphas"):
        res = lmc.interpolate(a, b, digits.val, alphas=5)
    assert math.isnan(res.error_barrier) and math.isnan(res.loss_barrier)
    assert not math.isnan(float(res.error[0])) and torch.isnan(res.error[1:]).all() and torch.isnan(res.loss[1:]).all()
    with pytest.warns(RuntimeWarning):
        both = lmc.interpolate(a, b, digits.val, alphas=[0.0, 1.0])  # no interior alpha: still NaN, not 0
    assert math.isnan(both.error_barrier)


def test_finite_interpolation_does_not_warn(digits: DatasetSplits, recwarn: pytest.WarningsRecorder) -> None:
    torch.manual_seed(0)
    res = lmc.interpolate(mlp(), mlp(), digits.val, alphas=3)
    assert math.isfinite(res.error_barrier)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# --------------------------------------------------------------------------- data
def test_nan_in_evaluation_data_raises(digits: DatasetSplits) -> None:
    x = digits.val.x.clone()
    x[7, 0, 3, 3] = float("nan")
    pop = Population.from_factory(mlp, 2, seed=0)
    with pytest.raises(ValueError, match="x contains NaN"):
        evaluate(pop, (x, digits.val.y))
    trainer = quiet_trainer(pop)
    with pytest.raises(ValueError, match="x contains NaN"):
        trainer.fit(DeviceLoader(digits.train, BATCH, seed=1), TensorSplit(x, digits.val.y), 3, SuccessiveHalving(3, 0.5))


def test_cli_refuses_a_dataset_split_with_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from popvec.cli import common

    original = common.load_dataset

    def poisoned(*args: object, **kwargs: object) -> DatasetSplits:
        data = original(*args, **kwargs)  # type: ignore[arg-type]
        data.val.x[0, 0, 0, 0] = float("nan")
        return data

    monkeypatch.setattr(common, "load_dataset", poisoned)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *TINY, *QUIET, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "val" in err and "NaN" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- seeds
SEEDED_RUN = textwrap.dedent(
    """
    import sys
    import torch
    from rich.console import Console
    from popvec import MultipleInitializationsTrainer
    from popvec.data import load_dataset
    from popvec.loaders import DeviceLoader
    from popvec.models import MLP

    torch.manual_seed(int(sys.argv[2]))  # whatever the process did before, the run's seed decides
    digits = load_dataset("digits")
    trainer = MultipleInitializationsTrainer(
        lambda: MLP(64, (32,), 10, dropout=0.5), lambda p: torch.optim.SGD(p, lr=0.05),
        num_models=3, num_elim_steps=4, device="cpu", seed=5, console=Console(quiet=True), progress=False,
    )
    winner = trainer.train(DeviceLoader(digits.train, 64, seed=5), digits.val, num_epochs=1)
    torch.save(winner.state_dict(), sys.argv[1])
    """
)


def test_same_seed_with_dropout_gives_identical_weights_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SEEDED_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, noise in (("a.pt", "1"), ("b.pt", "2")):
        argv = [sys.executable, str(script), str(tmp_path / name), noise]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dropout_actually_draws_from_the_seeded_generator(digits: DatasetSplits) -> None:
    """Without seeding, two runs differ: the test above is not vacuous."""
    loader = DeviceLoader(digits.train, BATCH, seed=5)
    pop = Population.from_factory(lambda: MLP(64, (32,), 10, dropout=0.5), 1, seed=5)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        p = Population(pop.skeleton, {k: v.clone() for k, v in pop.params.items()}, dict(pop.buffers))
        t = PopulationTrainer(p, optim.SGD(p, lr=0.05), F.cross_entropy, console=Console(quiet=True), progress=False)
        t.fit(loader, None, 3)
        results.append(p.params)
        loader = DeviceLoader(digits.train, BATCH, seed=5)
    assert any(not torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_train_leaderboard_puts_a_diverged_member_last() -> None:
    from popvec.cli.train import _leaderboard

    nan = float("nan")
    rows = [
        {"id": 0, "train_loss": nan, "val_loss": nan, "val_accuracy": nan, "kept": False, "diverged": True},
        {"id": 1, "train_loss": 1.0, "val_loss": 2.0, "val_accuracy": 0.5, "kept": False, "diverged": False},
        {"id": 2, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.6, "kept": True, "diverged": False},
        {"id": 3, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.7, "kept": False, "diverged": False},
    ]
    assert [r["id"] for r in _leaderboard({"rounds": [{"round": 1, "members": rows}]})] == [2, 3, 1, 0]
