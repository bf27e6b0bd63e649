"""Per-member step masks: a masked member stays exactly as it was; the others train as usual.

A member that is masked for some steps must equal a single model trained alone that simply
skipped those steps (same initialization, same batches on its active steps, same optimizer),
through momentum/Adam state, per-member step counts (bias correction) and BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODEL_FNS, assert_members_equal, make_batches, make_references, member_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec import Population, PopulationTrainer, optim
from popvec.engine import TrainStep

pytestmark = pytest.mark.usefixtures("single_thread")

N = 3
SEED = 11
STEPS = 12

OPTIMIZERS: dict[str, tuple[Callable[[Population], Any], Callable[[Any], torch.optim.Optimizer]]] = {
    "sgd_momentum": (
        lambda pop: optim.SGD(pop, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    ),
    "adam": (lambda pop: optim.Adam(pop, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "adamw_clip": (
        lambda pop: optim.AdamW(pop, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    ),
    "torch_rmsprop": (
        lambda pop: optim.from_torch(pop, lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5)),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    ),
}


def masks_for(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Member 0 always trains, member 1 skips the first steps, member 2 trains every other step."""
    out = []
    for t in range(steps):
        out.append(torch.tensor([True, t >= 4, t % 2 == 1]))
    return out


def run_masked(model_fn, make_opt, opt_fn, masks, per_member: bool, clip: float | None = None) -> None:
    pop = Population.from_factory(model_fn, N, seed=SEED)
    step = TrainStep(pop, make_opt(pop))
    refs = make_references(model_fn, N, SEED, opt_fn, max_grad_norm=clip)
    for (x, y), mask in zip(make_batches(len(masks), N if per_member else None), masks):
        before = {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}
        step(x, y, per_member=per_member, mask=mask)
        for i in range(N):
            if bool(mask[i]):
                refs[i].step(*member_batch((x, y), i, per_member))
            else:  # bit-identical, not just close
                for k, v in [*pop.params.items(), *pop.buffers.items()]:
                    assert torch.equal(v[i], before[k][i]), (i, k)
    assert_members_equal(pop, [r.model for r in refs])


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("per_member", [False, True])
def test_masked_member_equals_model_that_skipped_steps(model_name: str, opt_name: str, per_member: bool) -> None:
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    clip = 0.5 if opt_name == "adamw_clip" else None
    run_masked(MODEL_FNS[model_name], make_opt, opt_fn, masks_for(STEPS), per_member, clip)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=1, max_size=6))
def test_random_masks_adam_batchnorm(rows: list[list[bool]]) -> None:
    make_opt, opt_fn = OPTIMIZERS["adam"]
    run_masked(MODEL_FNS["cnn_bn"], make_opt, opt_fn, [torch.tensor(r) for r in rows], per_member=False)


def test_mask_freezes_optimizer_state_and_steps() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    opt = optim.Adam(pop, lr=1e-2)
    step = TrainStep(pop, opt)
    ((x, y),) = make_batches(1)
    step(x, y)
    assert opt._shared_step == 1
    state = {s: {k: v.clone() for k, v in d.items()} for s, d in opt.state.items()}
    step(x, y, mask=torch.tensor([False, True, False]))
    assert opt.steps.tolist() == [1.0, 2.0, 1.0]
    assert opt._shared_step is None and not opt.fused_now()
    for s, d in opt.state.items():
        for k, v in d.items():
            assert torch.equal(v[0], state[s][k][0]) and torch.equal(v[2], state[s][k][2])
            assert not torch.equal(v[1], state[s][k][1])
    # reset_state brings the counts back together: the fused path is available again
    opt.reset_state([0, 1, 2])
    assert opt._shared_step == 0 and opt.steps.tolist() == [0.0, 0.0, 0.0]
    assert all(bool((v == 0).all()) for d in opt.state.values() for v in d.values())


def test_reset_state_member_restarts_like_a_fresh_optimizer() -> None:
    """Reset member 1's Adam state mid-run: from then on it matches a fresh torch Adam on its weights."""
    model_fn = MODEL_FNS["mlp"]
    pop = Population.from_factory(model_fn, N, seed=SEED)
    opt = optim.Adam(pop, lr=1e-2)
    step = TrainStep(pop, opt)
    batches = make_batches(8)
    refs = make_references(model_fn, N, SEED, lambda ps: torch.optim.Adam(ps, lr=1e-2))
    for t, (x, y) in enumerate(batches):
        if t == 4:
            opt.reset_state([1])
            refs[1].opt = torch.optim.Adam(refs[1].model.parameters(), lr=1e-2)
        step(x, y)
        for r in refs:
            r.step(x, y)
    assert_members_equal(pop, [r.model for r in refs])


def test_trainer_step_mask_counts_active_members() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), progress=False)
    ((x, y),) = make_batches(1)
    before = {k: v.clone() for k, v in pop.params.items()}
    trainer.step(x, y, mask=[True, False, False])
    assert trainer.member_steps == 1 and trainer.samples_seen == x.shape[0] and trainer.global_step == 1
    assert all(torch.equal(v[1:], before[k][1:]) for k, v in pop.params.items())
    assert not torch.equal(pop.params["fc1.weight"][0], before["fc1.weight"][0])


def test_all_false_mask_changes_nothing() -> None:
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], N, seed=SEED)
    step = TrainStep(pop, optim.SGD(pop, lr=0.1, momentum=0.9))
    before = {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}
    ((x, y),) = make_batches(1)
    losses = step(x, y, mask=torch.zeros(N, dtype=torch.bool))
    assert losses.shape == (N,)
    for k, v in [*pop.params.items(), *pop.buffers.items()]:
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.ones(N + 1, dtype=torch.bool), ValueError, "mask must have one entry per member"),
        (torch.ones(N), TypeError, "mask must hold bools"),
        ([1, 0, 1], TypeError, "mask must hold bools"),
    ],
)
def test_bad_mask(mask: Any, error: type[Exception], match: str) -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    step = TrainStep(pop, optim.SGD(pop, lr=0.1))
    ((x, y),) = make_batches(1)
    with pytest.raises(error, match=match):
        step(x, y, mask=mask)


def test_torch_adam_mask_refused() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    opt = optim.from_torch(pop, lambda ps: torch.optim.Adamax(ps, lr=1e-2))
    step = TrainStep(pop, opt)
    ((x, y),) = make_batches(1)
    with pytest.raises(ValueError, match="mask: torch.optim.Adamax"):
        step(x, y, mask=torch.tensor([True, False, True]))
