"""Early stopping: a diverging member is eliminated by the NaN or gradient-norm proxy with its
reason in the history, and the others are bit-identical to a run without it; slope and patience
rules; wrapping another policy; never emptying the population."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batches, tiny_mlp

from popvec import optim
from popvec.population import Population
from popvec.search.early_stopping import EarlyStopping, slope
from popvec.selection import MetricsTable, SuccessiveHalving
from popvec.trainer import PopulationTrainer

# Member 2's learning rate is absurd: its weights blow up to inf within a few steps. Adam's update is
# element-wise and vmap's forward/backward does not depend on N here, so the other members can be
# compared bit for bit with a stack that never held member 2.
LRS = [1e-2, 3e-3, 1e30, 1e-3]


def run(lrs: list[float], keep: list[int], policy: EarlyStopping, steps: int = 20) -> PopulationTrainer:
    pop = Population.from_factory(tiny_mlp, 4, seed=0).select(keep)
    trainer = PopulationTrainer(pop, optim.Adam(pop, lr=[lrs[i] for i in keep]), progress=False)
    trainer.print_rounds = False
    val = make_batches(1, batch=64, seed=7)[0]
    trainer.fit(make_batches(steps), val, steps, policy)
    return trainer


@pytest.mark.parametrize(
    ("rules", "reason"),
    [
        ({"nonfinite": True}, "non-finite"),
        ({"nonfinite": False, "grad_norm_threshold": 1e3}, "gradient norm"),
    ],
)
def test_diverging_member_is_eliminated_and_others_unaffected(rules: dict, reason: str, single_thread: None) -> None:
    with_bad = run(LRS, [0, 1, 2, 3], EarlyStopping(check_every=4, **rules))
    without = run(LRS, [0, 1, 3], EarlyStopping(check_every=4, **rules))
    assert with_bad.population.ids.tolist() == [0, 1, 3] == without.population.ids.tolist()
    for name in with_bad.population.params:
        assert torch.equal(with_bad.population.params[name], without.population.params[name]), name
    for d_a, d_b in zip(with_bad.optimizer.state.values(), without.optimizer.state.values()):
        assert all(torch.equal(d_a[k], d_b[k]) for k in d_a)
    rounds = with_bad.history["rounds"]
    first = rounds[0]
    assert first["step"] == 4  # at the first check
    row = next(r for r in first["members"] if r["id"] == 2)
    assert not row["kept"] and reason in row["reason"]
    assert all(r["kept"] and "reason" not in r for r in first["members"] if r["id"] != 2)
    assert all(len(r["members"]) == 3 for r in without.history["rounds"])
    # cost: the eliminated member stopped counting at step 4
    with_bad._record_cost(20)
    assert with_bad.history["cost"]["member_steps"] == 4 * 4 + 3 * 16


def table(step: int, train: list[float], val: list[float], ids: list[int] | None = None) -> MetricsTable:
    ids = ids if ids is not None else list(range(len(train)))
    return MetricsTable(ids, {"train_loss": train, "val_loss": val, "val_accuracy": [0.5] * len(ids)}, step=step)


def test_slope_rule() -> None:
    assert slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert slope([(0, 1.0)]) == 0.0
    policy = EarlyStopping(slope_window=20, check_every=10)
    assert policy.next_decision(0, 2) == 10
    kept = []
    for step, losses in [(10, [1.0, 1.0]), (20, [0.8, 1.1]), (30, [0.7, 1.3])]:
        decision = policy.decide(table(step, losses, [1.0, 1.0]))
        kept.append(decision.keep)
    assert kept == [[0, 1], [0, 1], [0]]
    assert "slope" in decision.reasons[1] and "not negative" in decision.reasons[1]


def test_patience_rule() -> None:
    policy = EarlyStopping(patience=20, min_delta=0.01)
    answers = [policy.decide(table(s, [1.0, 1.0], v)) for s, v in [(10, [1.0, 1.0]), (20, [0.9, 0.995]), (30, [0.8, 0.992])]]
    assert [a.keep for a in answers] == [[0, 1], [0, 1], [0]]
    assert answers[-1].reasons == {1: "no val_loss improvement for 20 steps (best 1 at step 10)"}


def test_wraps_another_policy_and_keeps_one() -> None:
    inner = SuccessiveHalving(interval=10, reduce_factor=0.5)
    policy = EarlyStopping(inner, check_every=5)
    assert policy.next_decision(0, 4) == 5
    d = policy.decide(table(5, [1.0, math.nan, 1.0, 1.0], [0.4, 0.1, 0.3, 0.2], ids=[10, 11, 12, 13]))
    assert d.keep == [0, 2, 3] and list(d.reasons) == [11]  # a check only: the inner policy is not due
    assert policy.next_decision(5, 3) == 10
    d = policy.decide(table(10, [1.0, 1.0, math.inf], [0.4, 0.3, 0.2], ids=[10, 12, 13]))
    assert d.keep == [1] and "non-finite train_loss" in d.reasons[13]  # inner keeps int(2 * 0.5) = 1 of the rest
    everyone_bad = EarlyStopping().decide(table(3, [math.nan, math.nan], [math.nan, 2.0]))
    assert everyone_bad.keep == [1] and list(everyone_bad.reasons) == [0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_norm_threshold": 0}, "grad_norm_threshold must be None or a finite number > 0"),
        ({"patience": 0}, "patience must be None or an integer >= 1"),
        ({"slope_window": 2.5}, "slope_window must be None or an integer >= 1"),
        ({"check_every": -1}, "check_every must be None or an integer >= 1"),
        ({"min_delta": -1}, "min_delta must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)
