"""Members are isolated: one member diverging (NaN/inf) never touches another, bit for bit.

Each test trains the same population twice, once clean and once with member ``BAD`` poisoned
(NaN weights, inf/NaN inputs, or a huge learning rate), and requires every other member's
parameters, buffers and losses to be ``torch.equal`` across the two runs. Also: dropout draws an
independent mask per member, reproducibly under ``torch.manual_seed``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODEL_FNS, TinyMLP, make_batches, tiny_mlp_dropout

from popvec import Population, optim
from popvec.engine import TrainStep

pytestmark = pytest.mark.usefixtures("single_thread")

N = 4
BAD = 2
STEPS = 8


def lrs(base: float, bad: float | None) -> list[float]:
    return [bad if (i == BAD and bad is not None) else base for i in range(N)]


# name -> factory(pop, bad_lr or None)
OPTIMIZERS: dict[str, Callable[[Population, float | None], Any]] = {
    "adam": lambda pop, bad: optim.Adam(pop, lr=lrs(1e-2, bad)),
    "adam_clip": lambda pop, bad: optim.Adam(pop, lr=lrs(1e-2, bad), max_grad_norm=1.0),
    "adamw_general": lambda pop, bad: optim.AdamW(pop, lr=lrs(1e-2, bad), betas=([0.9, 0.8, 0.7, 0.6], 0.99)),
    "sgd_momentum": lambda pop, bad: optim.SGD(pop, lr=lrs(0.05, bad), momentum=0.9, weight_decay=1e-4),
    "sgd_momentum_clip": lambda pop, bad: optim.SGD(pop, lr=lrs(0.05, bad), momentum=0.9, max_grad_norm=[1.0, 0.5, 1.0, 2.0]),
    "sgd_general": lambda pop, bad: optim.SGD(pop, lr=lrs(0.05, bad), momentum=[0.9, 0.5, 0.9, 0.0]),
    "from_torch_adam_clip": lambda pop, bad: optim.from_torch(pop, lambda ps: torch.optim.Adam(ps, lr=1e-2), max_grad_norm=1.0),
}

POISONS = ("nan_weights", "inf_weights", "nan_inputs", "inf_inputs", "huge_lr")


def train(model: str, opt_name: str, poison: str | None) -> tuple[Population, list[torch.Tensor]]:
    pop = Population.from_factory(MODEL_FNS[model], N, seed=5)
    first = next(iter(pop.params))
    if poison in ("nan_weights", "inf_weights"):
        pop.params[first][BAD].fill_(float("nan") if poison == "nan_weights" else float("inf"))
    bad_lr = 1e12 if poison == "huge_lr" else None
    step = TrainStep(pop, OPTIMIZERS[opt_name](pop, bad_lr))
    losses = []
    for t, (x, y) in enumerate(make_batches(STEPS, N, seed=17)):
        if poison in ("nan_inputs", "inf_inputs") and t >= 2:
            x = x.clone()
            x[BAD, 0] = float("nan") if poison == "nan_inputs" else float("inf")
        losses.append(step(x, y, per_member=True))
    return pop, losses


def assert_others_bit_identical(clean: Population, dirty: Population) -> None:
    others = [i for i in range(N) if i != BAD]
    for name in [*clean.params, *clean.buffers]:
        a = clean.params[name] if name in clean.params else clean.buffers[name]
        b = dirty.params[name] if name in dirty.params else dirty.buffers[name]
        for i in others:
            assert torch.equal(a[i], b[i]), f"member {i} {name} changed because member {BAD} diverged"


CASES = [
    (opt_name, poison)
    for opt_name in sorted(OPTIMIZERS)
    for poison in POISONS
    if not (opt_name.startswith("from_torch") and poison == "huge_lr")  # from_torch shares one lr
]


@pytest.mark.parametrize(("opt_name", "poison"), CASES)
@pytest.mark.parametrize("model", sorted(MODEL_FNS))
def test_diverging_member_leaves_others_bit_identical(model: str, opt_name: str, poison: str) -> None:
    clean, clean_losses = train(model, opt_name, None)
    dirty, dirty_losses = train(model, opt_name, poison)
    assert_others_bit_identical(clean, dirty)
    others = [i for i in range(N) if i != BAD]
    for a, b in zip(clean_losses, dirty_losses):
        assert torch.equal(a[others], b[others])
        assert torch.isfinite(a).all()
    # the poison really took: the bad member's run is broken or at least far off the clean one
    bad_params = torch.cat([v[BAD].flatten() for v in dirty.params.values()])
    clean_params = torch.cat([v[BAD].flatten() for v in clean.params.values()])
    broken = not torch.isfinite(bad_params).all() or not torch.isfinite(torch.stack(dirty_losses)[:, BAD]).all()
    assert broken or (bad_params - clean_params).abs().max() > 1e3


def test_nan_gradient_norm_stays_in_its_member() -> None:
    """Per-member clipping sees a NaN norm for the bad member only."""
    pop = Population.from_factory(MODEL_FNS["mlp"], N, seed=5)
    pop.params["fc1.weight"][BAD].fill_(float("nan"))
    step = TrainStep(pop, OPTIMIZERS["sgd_momentum_clip"](pop, None))
    x, y = make_batches(1, N, seed=17)[0]
    step(x, y, per_member=True)
    norms = step.last_grad_norm
    assert norms is not None
    assert torch.isnan(norms[BAD])
    assert torch.isfinite(norms[[i for i in range(N) if i != BAD]]).all()


# --------------------------------------------------------------------------- dropout
def identical_dropout_population() -> Population:
    torch.manual_seed(0)
    module = tiny_mlp_dropout()
    return Population.from_modules([copy.deepcopy(module) for _ in range(N)])


@pytest.mark.parametrize("per_member", [False, True])
def test_dropout_masks_differ_between_members(per_member: bool) -> None:
    pop = identical_dropout_population()
    x = make_batches(1)[0][0]
    if per_member:
        x = x.expand(N, *x.shape).contiguous()
    pop.train()
    with torch.no_grad():
        out = pop.forward(x, per_member=per_member)
    for i in range(N):
        for j in range(i + 1, N):
            assert not torch.equal(out[i], out[j]), f"members {i} and {j} drew the same dropout mask"
    pop.eval()
    with torch.no_grad():
        out = pop.forward(x, per_member=per_member)
    for i in range(1, N):
        assert torch.equal(out[0], out[i])


def test_dropout_repeats_under_manual_seed() -> None:
    pop = identical_dropout_population().train()
    x = make_batches(1)[0][0]
    with torch.no_grad():
        torch.manual_seed(42)
        a = pop(x)
        b = pop(x)
        torch.manual_seed(42)
        c = pop(x)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_dropout_training_is_per_member_and_reproducible() -> None:
    def run() -> Population:
        pop = identical_dropout_population()
        step = TrainStep(pop, optim.SGD(pop, lr=0.1))
        torch.manual_seed(123)
        for x, y in make_batches(3):
            step(x, y)
        return pop

    a, b = run(), run()
    w = a.params["fc1.weight"]
    assert all(not torch.equal(w[0], w[i]) for i in range(1, N)), "identical members got identical dropout masks"
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])


def test_dropout_module_sanity() -> None:
    assert isinstance(tiny_mlp_dropout(), TinyMLP)
    assert tiny_mlp_dropout().drop.p == 0.5
