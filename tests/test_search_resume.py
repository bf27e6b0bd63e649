"""Searches resumable after a crash: every stateful policy saves and restores what it remembers (plain
data, read back with ``weights_only=True``) and decides on exactly as before."""

from __future__ import annotations

import copy
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from popvec.search.early_stopping import EarlyStopping
from popvec.search.hyperband import HyperbandPolicy, hyperband_brackets
from popvec.search.pbt import PBT
from popvec.search.space import Choice, LogUniform, SearchSpace
from popvec.selection import MetricsTable, SelectionPolicy, as_decision


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
        return {"step": due, "keep": decision.keep, "ids": self.ids, "hparams": decision.hparams, "reasons": decision.reasons, "events": decision.events}

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
        lambda: EarlyStopping(HyperbandPolicy(BRACKETS, BRACKET_OF, rule="asha"), slope_window=4, patience=3, min_delta=0.05, check_every=2),
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
