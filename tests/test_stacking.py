"""Faithful stacking: tied weights stay tied (stacked once, trained as in the torch model, exported tied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, RTOL, make_references, run_references
from torch import Tensor, nn

from popvec import Population, optim
from popvec.engine import TrainStep
from popvec.population import tie_groups

VOCAB, DIM, SEQ = 11, 6, 5


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight (as in tied language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x)))).mean(1)


def token_batches(steps: int, n: int | None = None) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    lead = () if n is None else (n,)
    return [(torch.randint(0, VOCAB, (*lead, 8, SEQ), generator=g), torch.randint(0, VOCAB, (*lead, 8), generator=g)) for _ in range(steps)]


def test_tie_groups_lists_every_name_of_a_shared_tensor() -> None:
    assert tie_groups(TiedLM()) == [("emb.weight", "head.weight")]
    assert tie_groups(nn.Linear(2, 2)) == []


def test_tied_weight_is_stacked_once_and_kept_tied_in_the_skeleton() -> None:
    pop = Population.from_factory(TiedLM, 3)
    assert "head.weight" not in pop.params and "emb.weight" in pop.params
    assert pop.skeleton.head.weight is pop.skeleton.emb.weight
    torch.manual_seed(1)
    model = TiedLM()
    x = token_batches(1)[0][0]
    torch.testing.assert_close(pop(x)[1], model(x).detach())


@pytest.mark.parametrize(
    "opt",
    [
        (lambda pop: optim.SGD(pop, lr=0.2, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
        (lambda pop: optim.Adam(pop, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    ],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("per_member", [False, True])
def test_tied_training_equals_each_member_alone(opt, per_member: bool) -> None:  # type: ignore[no-untyped-def]
    make_opt, torch_opt = opt
    n = 3
    pop = Population.from_factory(TiedLM, n, seed=5)
    step = TrainStep(pop, make_opt(pop))
    refs = make_references(TiedLM, n, 5, torch_opt)
    batches = token_batches(8, n if per_member else None)
    losses = [step(x, y, per_member=per_member) for x, y in batches]
    run_references(refs, batches, per_member)
    assert all(torch.isfinite(loss).all() for loss in losses)
    for i, ref in enumerate(refs):
        for name, p in ref.model.named_parameters():
            torch.testing.assert_close(pop.params[name][i], p.detach(), rtol=RTOL, atol=ATOL)
        exported = pop.member(i)
        assert exported.head.weight is exported.emb.weight
        x = batches[0][0][i] if per_member else batches[0][0]
        torch.testing.assert_close(exported(x), ref.model(x), rtol=RTOL, atol=ATOL)
        assert torch.isfinite(F.cross_entropy(exported(x), batches[0][1][i] if per_member else batches[0][1]))


def test_tied_and_untied_models_do_not_stack_together() -> None:
    untied = TiedLM()
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    with pytest.raises(ValueError, match="architecture"):
        Population.from_modules([TiedLM(), untied])


def test_shrink_perturb_noise_respects_the_tie() -> None:
    pop = Population.from_factory(TiedLM, 2, seed=0)
    pop.shrink_perturb(0.0, 1.0, seed=9)
    fresh = Population.from_factory(TiedLM, 2, seed=9)
    torch.testing.assert_close(pop.params["emb.weight"], fresh.params["emb.weight"])
