"""The central guarantee: training N members in one stack equals training each member alone.

Member i of ``Population.from_factory(model_fn, N, seed)`` trained by ``TrainStep`` must match
``torch.manual_seed(seed + i); model_fn()`` trained by a plain ``torch.optim`` loop on the same
batches: every parameter and buffer (BatchNorm running statistics and ``num_batches_tracked``
included), every step's loss, through per-member hyperparameters and through ``select``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from conftest import (
    ATOL,
    MODEL_FNS,
    RTOL,
    Reference,
    assert_members_equal,
    make_batches,
    make_references,
    member_batch,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from popvec import Population, optim
from popvec.engine import TrainStep

pytestmark = pytest.mark.usefixtures("single_thread")

N = 4
SEED = 7
STEPS = 20

OptPair = tuple[Callable[[Population], Any], Callable[[Any], torch.optim.Optimizer]]

# popvec optimizer factory, and the torch.optim factory each member's reference uses.
OPTIMIZERS: dict[str, OptPair] = {
    "sgd_nesterov": (
        lambda pop: optim.SGD(pop, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    "adam": (
        lambda pop: optim.Adam(pop, lr=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
    ),
    "adamw": (
        lambda pop: optim.AdamW(pop, lr=1e-2, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    ),
}


def train_and_compare(
    model_fn: Callable[[], torch.nn.Module],
    make_opt: Callable[[Population], Any],
    opt_fns: Callable[[Any], torch.optim.Optimizer] | Sequence[Callable[[Any], torch.optim.Optimizer]],
    per_member: bool,
    steps: int = STEPS,
    select_at: int | None = None,
    select: Sequence[int] | None = None,
    general_path: bool = False,
    **ref_kwargs: Any,
) -> tuple[Population, list[Reference]]:
    """Train a population and its references side by side; compare losses each step and state at the end."""
    pop = Population.from_factory(model_fn, N, seed=SEED)
    opt = make_opt(pop)
    if general_path:
        opt.use_fused = False
    train_step = TrainStep(pop, opt)
    refs = make_references(model_fn, N, SEED, opt_fns, **ref_kwargs)
    for t, (x, y) in enumerate(make_batches(steps, N if per_member else None)):
        if t == select_at:
            pop.select(select)
            opt.select(select)
            refs = [refs[j].clone() for j in select]
        if per_member:  # after a shrinking select, member j still sees xs[j]
            x, y = x[: pop.n], y[: pop.n]
        losses = train_step(x, y, per_member=per_member)
        expected = torch.tensor([ref.step(*member_batch((x, y), i, per_member)) for i, ref in enumerate(refs)])
        assert losses.shape == (pop.n,)
        torch.testing.assert_close(losses, expected, rtol=RTOL, atol=ATOL, msg=lambda m, t=t: f"losses at step {t}: {m}")
    assert_members_equal(pop, [ref.model for ref in refs])
    return pop, refs


@pytest.mark.parametrize("per_member", [False, True], ids=["shared_batch", "per_member_batch"])
@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_stack_equals_members_trained_alone(opt_name: str, model: str, per_member: bool) -> None:
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    train_and_compare(MODEL_FNS[model], make_opt, opt_fn, per_member)


@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_general_path_with_shared_hparams_equals_members(opt_name: str, model: str) -> None:
    """The per-member formula (no fused kernel) gives the same result with shared hyperparameters."""
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    train_and_compare(MODEL_FNS[model], make_opt, opt_fn, per_member=True, general_path=True)


def test_batchnorm_buffers_are_tracked_per_member() -> None:
    """Sanity check of the BN comparison itself: running stats moved, and differ between members."""
    make_opt, opt_fn = OPTIMIZERS["adam"]
    pop, _ = train_and_compare(MODEL_FNS["cnn_bn"], make_opt, opt_fn, per_member=True, steps=3)
    assert torch.equal(pop.buffers["bn.num_batches_tracked"], torch.full((N,), 3, dtype=torch.long))
    mean = pop.buffers["bn.running_mean"]
    assert not torch.equal(mean, torch.zeros_like(mean))
    assert not torch.allclose(mean[0], mean[1])


# --------------------------------------------------------------------------- per-member hyperparameters
LRS = [0.05, 0.02, 0.1, 0.01]
ADAM_LRS = [1e-2, 3e-3, 2e-2, 5e-3]
BETA1 = [0.9, 0.5, 0.95, 0.0]
BETA2 = [0.999, 0.9, 0.99, 0.95]
EPS = [1e-8, 1e-6, 1e-8, 1e-4]
WD = [0.0, 1e-3, 1e-2, 0.1]

PER_MEMBER_OPTIMIZERS: dict[str, OptPair] = {
    "sgd_momentum_dampening": (
        lambda pop: optim.SGD(pop, lr=LRS, momentum=[0.9, 0.5, 0.0, 0.8], dampening=[0.0, 0.1, 0.3, 0.5], weight_decay=WD),
        [
            (
                lambda ps, i=i: torch.optim.SGD(
                    ps, lr=LRS[i], momentum=[0.9, 0.5, 0.0, 0.8][i], dampening=[0.0, 0.1, 0.3, 0.5][i], weight_decay=WD[i]
                )
            )
            for i in range(N)
        ],
    ),
    "sgd_nesterov": (
        lambda pop: optim.SGD(pop, lr=LRS, momentum=[0.9, 0.5, 0.7, 0.99], nesterov=True, weight_decay=WD),
        [
            (lambda ps, i=i: torch.optim.SGD(ps, lr=LRS[i], momentum=[0.9, 0.5, 0.7, 0.99][i], nesterov=True, weight_decay=WD[i]))
            for i in range(N)
        ],
    ),
    "adam": (
        lambda pop: optim.Adam(pop, lr=ADAM_LRS, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD),
        [
            (lambda ps, i=i: torch.optim.Adam(ps, lr=ADAM_LRS[i], betas=(BETA1[i], BETA2[i]), eps=EPS[i], weight_decay=WD[i]))
            for i in range(N)
        ],
    ),
    "adamw": (
        lambda pop: optim.AdamW(pop, lr=ADAM_LRS, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD),
        [
            (lambda ps, i=i: torch.optim.AdamW(ps, lr=ADAM_LRS[i], betas=(BETA1[i], BETA2[i]), eps=EPS[i], weight_decay=WD[i]))
            for i in range(N)
        ],
    ),
    # Only lr and weight decay differ: the fused kernel still applies, with per-member lr and L2/decoupled decay.
    "adam_fused_per_member_lr_wd": (
        lambda pop: optim.Adam(pop, lr=ADAM_LRS, weight_decay=WD),
        [(lambda ps, i=i: torch.optim.Adam(ps, lr=ADAM_LRS[i], weight_decay=WD[i])) for i in range(N)],
    ),
    "adamw_fused_per_member_lr_wd": (
        lambda pop: optim.AdamW(pop, lr=ADAM_LRS, weight_decay=WD),
        [(lambda ps, i=i: torch.optim.AdamW(ps, lr=ADAM_LRS[i], weight_decay=WD[i])) for i in range(N)],
    ),
}


@pytest.mark.parametrize("per_member", [False, True], ids=["shared_batch", "per_member_batch"])
@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("opt_name", sorted(PER_MEMBER_OPTIMIZERS))
def test_per_member_hparams_equal_members(opt_name: str, model: str, per_member: bool) -> None:
    make_opt, opt_fns = PER_MEMBER_OPTIMIZERS[opt_name]
    train_and_compare(MODEL_FNS[model], make_opt, opt_fns, per_member)


# --------------------------------------------------------------------------- select half way
SELECTIONS = {"copy_reorder": [2, 0, 0, 3], "shrink": [3, 1], "permute": [3, 2, 1, 0]}


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_select_half_way_follows_lineage(opt_name: str, model: str, selection: str) -> None:
    """After ``select``, each surviving or copied member equals its reference lineage."""
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    idx = SELECTIONS[selection]
    pop, _ = train_and_compare(MODEL_FNS[model], make_opt, opt_fn, per_member=True, select_at=10, select=idx)
    assert pop.ids.tolist() == idx


@pytest.mark.parametrize("opt_name", sorted(PER_MEMBER_OPTIMIZERS))
def test_select_carries_per_member_hparams(opt_name: str) -> None:
    """Hyperparameters and optimizer state of the general per-member path follow ``select``."""
    make_opt, opt_fns = PER_MEMBER_OPTIMIZERS[opt_name]
    idx = [2, 0, 0, 3]
    train_and_compare(MODEL_FNS["cnn_bn"], make_opt, opt_fns, per_member=False, select_at=10, select=idx)


def test_copies_diverge_only_through_their_data() -> None:
    """Two copies of one member trained on the same shared batches stay identical."""
    make_opt, _ = OPTIMIZERS["adam"]
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], N, seed=SEED)
    opt = make_opt(pop)
    step = TrainStep(pop, opt)
    batches = make_batches(6)
    for x, y in batches[:3]:
        step(x, y)
    pop.select([1, 1, 0, 1])
    opt.select([1, 1, 0, 1])
    for x, y in batches[3:]:
        step(x, y)
    for stack in [*pop.params.values(), *pop.buffers.values()]:
        assert torch.equal(stack[0], stack[1])
        assert torch.equal(stack[0], stack[3])


# --------------------------------------------------------------------------- from_torch adapter
TORCH_FACTORIES: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


@pytest.mark.parametrize("per_member", [False, True], ids=["shared_batch", "per_member_batch"])
@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
def test_from_torch_equals_members(name: str, model: str, per_member: bool) -> None:
    fn = TORCH_FACTORIES[name]
    train_and_compare(MODEL_FNS[model], lambda pop: optim.from_torch(pop, fn), fn, per_member)


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("name", sorted(TORCH_FACTORIES))
def test_from_torch_select_follows_lineage(name: str, selection: str) -> None:
    fn = TORCH_FACTORIES[name]
    idx = SELECTIONS[selection]
    pop, _ = train_and_compare(MODEL_FNS["cnn_bn"], lambda pop: optim.from_torch(pop, fn), fn, per_member=True, select_at=10, select=idx)
    assert pop.ids.tolist() == idx


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    idx=st.lists(st.integers(0, N - 1), min_size=1, max_size=N),
    at=st.integers(1, 5),
    opt_name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_any_selection_follows_lineage(idx: list[int], at: int, opt_name: str) -> None:
    make_opt, opt_fn = OPTIMIZERS[opt_name]
    pop, _ = train_and_compare(MODEL_FNS["mlp"], make_opt, opt_fn, per_member=True, steps=at + 3, select_at=at, select=idx)
    assert pop.ids.tolist() == idx


def test_train_step_rejects_wrong_per_member_batches() -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=SEED)
    step = TrainStep(pop, optim.SGD(pop, lr=0.1))
    ((x, y),) = make_batches(1, N)
    before = {k: v.clone() for k, v in pop.params.items()}
    with pytest.raises(ValueError, match="x"):
        step(x[:3], y, per_member=True)
    with pytest.raises(ValueError, match="y"):
        step(x, y[:3], per_member=True)
    for k, v in pop.params.items():
        assert torch.equal(v, before[k])
