"""Hyperband: bracket arithmetic (the paper's table), rung pruning checked against an independent
evaluation of exported members, side by side vs one bracket after another, ASHA cutoffs, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec import cli
from popvec.data import load_dataset
from popvec.loaders import DeviceLoader
from popvec.models import model_factory
from popvec.search.hyperband import HyperbandPolicy, hyperband, hyperband_brackets, s_max
from popvec.search.run import make_trainer
from popvec.search.space import LogUniform, SearchSpace
from popvec.selection import MetricsTable


def table_of(brackets):
    return [(b.s, [(r.members, r.resource, r.keep) for r in b.rungs]) for b in brackets]


# --------------------------------------------------------------------------- arithmetic
def test_paper_table_r81_eta3() -> None:
    brackets = hyperband_brackets(max_t=81, reduction_factor=3)
    assert [b.n for b in brackets] == [81, 34, 15, 8, 5]
    assert [b.r for b in brackets] == [1, 3, 9, 27, 81]
    assert table_of(brackets) == [
        (4, [(81, 1, 27), (27, 3, 9), (9, 9, 3), (3, 27, 1), (1, 81, 1)]),
        (3, [(34, 3, 11), (11, 9, 3), (3, 27, 1), (1, 81, 1)]),
        (2, [(15, 9, 5), (5, 27, 1), (1, 81, 1)]),
        (1, [(8, 27, 2), (2, 81, 2)]),
        (0, [(5, 81, 5)]),
    ]


def test_other_settings() -> None:
    # R=27, eta=3: s_max=3
    assert table_of(hyperband_brackets(27)) == [
        (3, [(27, 1, 9), (9, 3, 3), (3, 9, 1), (1, 27, 1)]),
        (2, [(12, 3, 4), (4, 9, 1), (1, 27, 1)]),
        (1, [(6, 9, 2), (2, 27, 2)]),
        (0, [(4, 27, 4)]),
    ]
    # R=16, eta=2: s_max=4
    b = hyperband_brackets(max_resource=16, reduction_factor=2)
    assert [x.n for x in b] == [16, 10, 7, 5, 5] and [x.r for x in b] == [1, 2, 4, 8, 16]
    assert [r.members for r in b[0].rungs] == [16, 8, 4, 2, 1]
    # a grace period: max_t=81 in units of 3 is R=27 (s_max=3), resources scaled by 3
    g = hyperband_brackets(max_t=81, grace_period=3)
    assert [x.n for x in g] == [27, 12, 6, 4] and [x.r for x in g] == [3, 9, 27, 81]
    assert hyperband_brackets(max_t=81, min_resource=3) == g
    # brackets=k: the k most aggressive; brackets=1 is plain successive halving
    assert [x.s for x in hyperband_brackets(81, brackets=2)] == [4, 3]
    # float log fails here (log(243, 3) = 4.999...); the integer loop does not
    assert s_max(243, 1, 3) == 5 and s_max(1000, 1, 10) == 3 and s_max(80, 1, 3) == 3


@settings(max_examples=150, deadline=None)
@given(max_t=st.integers(1, 3000), grace=st.integers(1, 50), eta=st.integers(2, 6))
def test_bracket_properties(max_t: int, grace: int, eta: int) -> None:
    if grace > max_t:
        with pytest.raises(ValueError, match="grace_period must be <= max_t"):
            hyperband_brackets(max_t, grace, eta)
        return
    top = s_max(max_t, grace, eta)
    assert grace * eta**top <= max_t < grace * eta ** (top + 1)
    brackets = hyperband_brackets(max_t, grace, eta)
    assert [b.s for b in brackets] == list(range(top, -1, -1))
    for b in brackets:
        assert b.n == math.ceil((top + 1) * eta**b.s / (b.s + 1) - 1e-9)
        assert b.rungs[-1].resource == max_t and len(b.rungs) == b.s + 1
        for i, rung in enumerate(b.rungs):
            assert rung.members == b.n // eta**i >= 1
            assert rung.resource >= grace
            if i < b.s:
                assert rung.keep == rung.members // eta == b.rungs[i + 1].members
        assert all(a.resource <= c.resource for a, c in zip(b.rungs, b.rungs[1:]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_t": 0}, "max_t must be an integer >= 1"),
        ({"max_t": 9, "reduction_factor": 1}, "reduction_factor must be an integer >= 2"),
        ({"max_t": 9, "grace_period": 10}, "grace_period must be <= max_t"),
        ({"max_t": 9, "brackets": 4}, r"brackets must be at most s_max \+ 1 = 3"),
        ({"max_t": 9, "max_resource": 27}, "max_t and max_resource name the same setting"),
        ({}, "max_t must be an integer"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hyperband_brackets(**kwargs)


# --------------------------------------------------------------------------- pruning
@pytest.fixture(scope="module")
def digits() -> object:
    return load_dataset("digits")


def small_mlp(data) -> object:
    return model_factory("mlp", data.input_shape, data.num_classes, hidden=(16,))


SPACE = SearchSpace({"lr": LogUniform(1e-4, 3e-1)})


def test_pruned_members_are_the_worst_by_independent_evaluation(digits, single_thread) -> None:
    brackets = hyperband_brackets(max_t=9)  # brackets of 9, 5, 3 members side by side
    bracket_of, ids = {}, []
    for b in brackets:
        for _ in range(b.n):
            bracket_of[len(ids)] = b.s
            ids.append(len(ids))
    trainer = make_trainer(small_mlp(digits), SPACE.sample(len(ids), 1), "adam", seed=1, progress=False)
    policy = HyperbandPolicy(brackets, bracket_of, unit_steps=2)
    exported: dict[int, dict[int, torch.nn.Module]] = {}
    original = trainer.metrics_table

    def export_then_table(val, train_loss=None):  # every member as a plain module, before the decision
        exported[trainer.global_step] = {int(m): trainer.population.member(p) for p, m in enumerate(trainer.population.ids)}
        return original(val, train_loss)

    trainer.metrics_table = export_then_table  # type: ignore[method-assign]
    trainer.fit(DeviceLoader(digits.train, 64, seed=0), digits.val, 18, policy)
    rounds = trainer.history["rounds"]
    assert [r["step"] for r in rounds] == [2, 6, 18]
    for record in rounds:
        step = record["step"]
        losses = {}
        for member, model in exported[step].items():
            model.eval()
            with torch.no_grad():
                losses[member] = F.cross_entropy(model(digits.val.x), digits.val.y).item()
        kept = set(record["kept_ids"])
        for b in brackets:
            rung = next((r for r in b.rungs if r.resource * 2 == step), None)
            alive = [m for m in exported[step] if bracket_of[m] == b.s]
            if rung is None or rung.index == b.s:
                assert set(alive) <= kept
                continue
            order = sorted(alive, key=lambda m: losses[m])
            assert len(alive) == rung.members
            assert {m for m in alive if m in kept} == set(order[: rung.keep])  # exactly the best keep ...
            for m in order[rung.keep :]:  # ... and the pruned are the worst, with a reason
                row = next(r for r in record["members"] if r["id"] == m)
                assert not row["kept"] and f"bracket {b.s} rung {rung.index}" in row["reason"]
    member_steps = sum(b.member_resource for b in brackets) * 2
    trainer._record_cost(18)
    assert trainer.history["cost"]["member_steps"] == member_steps


def test_side_by_side_equals_one_after_another(digits, single_thread) -> None:
    kwargs = dict(max_t=9, unit_steps=2, batch_size=32, seed=3, progress=False)
    a = hyperband(small_mlp(digits), SPACE, digits.train, digits.val, digits.test, **kwargs)
    b = hyperband(small_mlp(digits), SPACE, digits.train, digits.val, digits.test, side_by_side=False, **kwargs)
    pruned = lambda h: sorted(m for r in h["rounds"] for e in r["events"] for m in e["pruned_ids"])  # noqa: E731
    assert pruned(a.history) == pruned(b.history)
    assert [r["id"] for r in a.leaderboard] == [r["id"] for r in b.leaderboard]
    assert a.cost["member_steps"] == b.cost["member_steps"] == sum(x.member_resource for x in hyperband_brackets(9)) * 2
    assert a.cost["naive_member_steps"] == 17 * 18
    assert a.cost["global_steps"] == 18 and b.cost["global_steps"] == 3 * 18
    assert a.best["hparams"]["lr"] == pytest.approx(a.history["members"][str(a.best["id"])]["hparams"]["lr"], rel=1e-6)
    for key in ("member_steps", "samples_seen", "wall_time_s", "naive_member_steps", "fraction_of_naive"):
        assert key in a.history["cost"]


def test_asha_rule_keeps_the_top_quantile() -> None:
    brackets = hyperband_brackets(max_t=9)
    policy = HyperbandPolicy(brackets[:1], {i: 2 for i in range(9)}, rule="asha")
    values = [0.9, 0.1, 0.5, 0.3, float("nan"), 0.7, 0.2, 0.8, 0.6]
    decision = policy.decide(MetricsTable(list(range(9)), {"val_loss": values}, step=1))
    # 1/3-quantile of the 8 finite values (linear interpolation) is 0.3333: keep 0.1, 0.2, 0.3
    assert sorted(decision.keep) == [1, 3, 6]
    # the next decision at the same resource compares against everything recorded there
    policy2 = HyperbandPolicy(brackets[:1], {i: 2 for i in range(3)}, rule="asha")
    policy2._records[1] = [0.0, 0.05, 0.06]
    assert policy2.decide(MetricsTable([0, 1, 2], {"val_loss": [0.5, 0.04, 0.6]}, step=1)).keep == [1]


# --------------------------------------------------------------------------- CLI
def test_cli_hyperband_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.toml"
    space.write_text('[space]\nlr = { distribution = "loguniform", low = 1e-3, high = 1e-1 }\n')
    out = tmp_path / "run"
    code = cli.main(
        [
            "hyperband",
            "--max-t",
            "9",
            "--unit-steps",
            "1",
            "--space",
            str(space),
            "--label-smoothing-range",
            "0,0.1",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-plots",
            "--patience",
            "100",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "alive per bracket" in text and "best so far" in text and "Winner: member" in text and "member-steps" in text
    history = json.loads((out / "history.json").read_text())
    assert [b["n"] for b in history["brackets"]] == [9, 5, 3]
    assert history["cost"]["naive_member_steps"] == 17 * 9
    board = json.loads((out / "leaderboard.json").read_text())
    assert board[0]["rank"] == 1 and set(board[0]["hparams"]) >= {"lr", "label_smoothing"}
    for name in ("summary.json", "winner.pt", "config.json"):
        assert (out / name).is_file()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--max-t", "0"], "argument --max-t/--max-resource: must be an integer >= 1"),
        (["--max-t", "3", "--grace-period", "9"], "--grace-period must be <= --max-t"),
        (["--reduction-factor", "1"], "--reduction-factor must be an integer >= 2"),
        (["--lr-range", "0,1"], "--lr-range: needs LOW > 0"),
        (["--lr-range", "abc"], "argument --lr-range: must be LOW,HIGH"),
        (["--momentum-range", "0,0.9"], "--momentum-range: hyperparameter 'momentum' does not apply to --optimizer adam"),
        (["--space", "nope.toml"], "--space: config file nope.toml does not exist"),
    ],
)
def test_cli_bad_flags(argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["hyperband", *argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
