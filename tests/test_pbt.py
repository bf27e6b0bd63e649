"""PBT: exploit copies weights, optimizer state and hyperparameters (checked before explore),
explore multiplies by 0.8/1.2 or resamples, lineage is recorded, runs are seeded; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_batches, tiny_mlp
from torch import Tensor

from popvec import cli, optim
from popvec.data import load_dataset
from popvec.losses import cross_entropy
from popvec.models import model_factory
from popvec.population import Population
from popvec.search.pbt import PBT, pbt, quantile_size
from popvec.search.space import Choice, LogUniform, SearchSpace, Uniform
from popvec.selection import MetricsTable
from popvec.trainer import PopulationTrainer

SPACE = SearchSpace({"lr": LogUniform(1e-4, 1e-1), "label_smoothing": Uniform(0.0, 0.5), "beta1": Choice([0.8, 0.85, 0.9])})


@pytest.mark.parametrize(
    ("n", "q", "k"), [(16, 0.25, 4), (8, 0.25, 2), (5, 0.25, 2), (3, 0.25, 1), (2, 0.25, 1), (1, 0.25, 0), (10, 0.5, 5), (7, 0.5, 3)]
)
def test_quantile_size(n: int, q: float, k: int) -> None:
    assert quantile_size(n, q) == k


def make_trainer(n: int = 8) -> PopulationTrainer:
    pop = Population.from_factory(tiny_mlp, n, seed=0)
    values = SPACE.sample(n, seed=2)
    opt = optim.Adam(pop, lr=values["lr"], betas=(values["beta1"], 0.999))
    return PopulationTrainer(pop, opt, cross_entropy, progress=False, loss_hparams={"label_smoothing": values["label_smoothing"]})


def snapshot(trainer: PopulationTrainer, p: int) -> dict[str, Tensor]:
    out = {f"param.{k}": v[p].clone() for k, v in trainer.population.params.items()}
    out.update({f"state.{s}.{k}": v[p].clone() for s, d in trainer.optimizer.state.items() for k, v in d.items()})
    out.update({f"hparam.{k}": v[p].clone() for k, v in trainer.hparams().items()})
    out["steps"] = trainer.optimizer.steps[p].clone()
    return out


@pytest.mark.parametrize("resample_probability", [0.0, 1.0])
def test_exploit_copies_then_explore_perturbs(resample_probability: float, single_thread: None) -> None:
    trainer = make_trainer(8)
    for x, y in make_batches(5):
        trainer.step(x, y)
    x_val, y_val = make_batches(1, batch=64, seed=99)[0]
    table = trainer.metrics_table((x_val, y_val))
    policy = PBT(5, SPACE, quantile_fraction=0.25, resample_probability=resample_probability, seed=7)
    decision = policy.decide(table)
    recipients = [p for p, src in enumerate(decision.keep) if src != p]
    assert len(recipients) == 2 and decision.ids == table.ids
    order = sorted(range(8), key=lambda p: table.columns["val_loss"][p])
    assert set(recipients) == set(order[-2:])
    assert all(decision.keep[p] in order[:2] for p in recipients)
    donors = {p: snapshot(trainer, decision.keep[p]) for p in recipients}
    others = {p: snapshot(trainer, p) for p in range(8) if p not in recipients}
    ids_before = trainer.population.ids.tolist()
    trainer.select(decision.keep)  # exploit only: the recipient is now exactly its donor
    for p in recipients:
        mine = snapshot(trainer, p)
        assert mine.keys() == donors[p].keys()
        for k in mine:
            assert torch.equal(mine[k], donors[p][k]), k
    trainer.apply_decision(decision)  # explore
    assert trainer.population.ids.tolist() == ids_before  # recipients keep their own ids
    hp = trainer.hparams()
    for event, p in zip(policy.lineage, recipients):
        assert event["recipient"] == table.ids[p] and event["donor"] == table.ids[decision.keep[p]] and event["step"] == table.step
        for name in SPACE.names:
            old, new = event["donor_hparams"][name], float(hp[name][p])
            assert new == pytest.approx(event["new_hparams"][name], rel=1e-6)
            how = event["explore"][name]
            if resample_probability == 0.0:
                assert how in ("x0.8", "x1.2")
                # continuous: old * factor (clipped to the bounds); choice: the neighbouring value
                assert new == pytest.approx(SPACE.perturb(name, old, float(how[1:])), rel=1e-6)
                if name == "lr" and SPACE.params[name].low < old * float(how[1:]) < SPACE.params[name].high:
                    assert new / old == pytest.approx(float(how[1:]), rel=1e-5)
            else:
                assert how == "resample"
                dist = SPACE.params[name]
                if isinstance(dist, Choice):
                    assert any(new == pytest.approx(v) for v in dist.values)
                else:
                    assert dist.low * (1 - 1e-6) <= new <= dist.high * (1 + 1e-6)
    for p, snap in others.items():  # everyone else is untouched
        assert all(torch.equal(snapshot(trainer, p)[k], v) for k, v in snap.items())
    for x, y in make_batches(2):  # and training goes on
        assert torch.isfinite(trainer.step(x, y)).all()


def test_explore_without_the_hyperparameter_is_an_error() -> None:
    policy = PBT(5, SPACE)
    table = MetricsTable([0, 1, 2, 3], {"val_loss": [1.0, 2.0, 3.0, 4.0]}, step=5, hparams={"lr": [0.1] * 4})
    with pytest.raises(ValueError, match=r"no hyperparameters \['label_smoothing', 'beta1'\]"):
        policy.decide(table)
    with pytest.raises(ValueError, match="quantile_fraction must lie in"):
        PBT(5, SPACE, quantile_fraction=0.7)
    with pytest.raises(ValueError, match="perturbation_interval must be"):
        PBT(0, SPACE)


@pytest.fixture(scope="module")
def digits() -> object:
    return load_dataset("digits")


def test_pbt_run_records_lineage_and_is_seeded(digits, single_thread) -> None:
    mf = model_factory("mlp", digits.input_shape, 10, hidden=(16,))
    space = SearchSpace({"lr": LogUniform(1e-3, 1e-1)})
    kw = dict(num_models=6, perturbation_interval=5, steps=20, batch_size=32, seed=4, progress=False)
    a = pbt(mf, space, digits.train, digits.val, digits.test, **kw)
    b = pbt(mf, space, digits.train, digits.val, digits.test, **kw)
    lineage = a.history["lineage"]
    assert [e["step"] for e in lineage] == [5, 5, 10, 10, 15, 15]  # 2 exploits per round; none at the last step
    assert lineage == b.history["lineage"]
    for event in lineage:
        assert {"recipient", "donor", "donor_hparams", "new_hparams", "old_hparams", "explore"} <= set(event)
        assert event["recipient_metric"] >= event["donor_metric"]
    traj = a.history["trajectory"]
    assert [t["step"] for t in traj] == [0, 5, 10, 15, 20]
    last = a.history["rounds"][-1]
    for event in last["events"]:
        p = last["kept_ids"].index(event["recipient"])
        assert last["hparams_after"]["lr"][p] == pytest.approx(event["new_hparams"]["lr"], rel=1e-6)
    assert a.cost["member_steps"] == 6 * 20 == a.cost["naive_member_steps"]
    assert sorted(r["id"] for r in a.leaderboard) == list(range(6))


def test_cli_pbt_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = cli.main(
        [
            "pbt",
            "--num-models",
            "4",
            "--perturbation-interval",
            "5",
            "--steps",
            "15",
            "--batch-size",
            "32",
            "--lr-range",
            "1e-3,1e-1",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--grad-norm-threshold",
            "1e6",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "exploits:" in text and "Final leaderboard" in text and "member-steps" in text
    history = json.loads((out / "history.json").read_text())
    assert len(history["lineage"]) == 2 and history["cost"]["member_steps"] == 60
    pytest.importorskip("matplotlib")
    assert (out / "pbt_hparams.png").stat().st_size > 0 and (out / "pbt_lineage.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--population", "0"], "argument --population: must be an integer >= 1"),
        (["--num-models", "0"], "argument --num-models: must be an integer >= 1"),
        (["--quantile-fraction", "0.75"], "argument --quantile-fraction: must lie in (0, 0.5]"),
        (["--resample-probability", "2"], "argument --resample-probability: must lie in [0, 1]"),
        (["--steps", "x"], "argument --steps: must be an integer >= 1"),
    ],
)
def test_cli_pbt_bad_flags(argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["pbt", *argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
