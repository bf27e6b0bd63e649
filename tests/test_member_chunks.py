"""Running members in chunks (``member_chunk_size``) changes speed, not results."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, MODEL_FNS, RTOL, make_batches
from torch import Tensor

import popvec
from popvec import Population, chunking
from popvec.cli.argtypes import positive_int_or_auto
from popvec.engine import TrainStep, make_grad_fn
from popvec.losses import cross_entropy


@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_step_equals_whole_stack(model: str, per_member: bool, chunk: int) -> None:
    runs = []
    for member_chunk_size in (None, chunk):
        pop = Population.from_factory(MODEL_FNS[model], 4, seed=0)
        step = TrainStep(pop, popvec.optim.Adam(pop, lr=[1e-3, 2e-3, 5e-3, 1e-2]), member_chunk_size=member_chunk_size)
        losses = torch.stack([step(x, y, per_member) for x, y in make_batches(10, 4 if per_member else None)])
        runs.append((pop, losses))
    (whole, whole_losses), (chunked, chunked_losses) = runs
    torch.testing.assert_close(chunked_losses, whole_losses, rtol=RTOL, atol=ATOL)
    for name in whole.params:
        torch.testing.assert_close(chunked.params[name], whole.params[name], rtol=RTOL, atol=ATOL)
    for name in whole.buffers:
        torch.testing.assert_close(chunked.buffers[name], whole.buffers[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2"])
def test_bad_member_chunk_size_is_refused(bad: object) -> None:
    pop = Population.from_factory(MODEL_FNS["mlp"], 2)
    with pytest.raises(ValueError, match="member_chunk_size"):
        TrainStep(pop, popvec.optim.SGD(pop, lr=0.1), member_chunk_size=bad)  # type: ignore[arg-type]


def _train(member_chunk_size: int | str | None, model: str, per_member: bool, n: int = 4, **step_kw: Any) -> tuple[Population, Tensor]:
    pop = Population.from_factory(MODEL_FNS[model], n, seed=0)
    step = TrainStep(pop, popvec.optim.Adam(pop, lr=[1e-3, 2e-3, 5e-3, 1e-2][:n]), member_chunk_size=member_chunk_size)
    losses = torch.stack([step(x, y, per_member, **step_kw) for x, y in make_batches(6, n if per_member else None)])
    return pop, losses


def _assert_same(a: Population, b: Population) -> None:
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], rtol=RTOL, atol=ATOL)
    for name in a.buffers:
        torch.testing.assert_close(a.buffers[name], b.buffers[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model", sorted(MODEL_FNS))
@pytest.mark.parametrize("per_member", [False, True])
def test_auto_chunking_equals_whole_stack(model: str, per_member: bool) -> None:
    chunking.clear_cache()
    rng = torch.get_rng_state()
    whole, whole_losses = _train(None, model, per_member)
    torch.set_rng_state(rng)
    auto, auto_losses = _train("auto", model, per_member)
    torch.testing.assert_close(auto_losses, whole_losses, rtol=RTOL, atol=ATOL)
    _assert_same(auto, whole)


def test_probe_changes_nothing_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    chunking.clear_cache()
    calls = []
    probe = chunking.probe_chunk_size

    def counting(*args: Any, **kwargs: Any) -> int | None:
        calls.append(1)
        return probe(*args, **kwargs)

    monkeypatch.setattr(chunking, "probe_chunk_size", counting)
    pop = Population.from_factory(MODEL_FNS["cnn_bn"], 4, seed=0)
    before = {k: v.clone() for k, v in {**pop.params, **pop.buffers}.items()}
    x, y = make_batches(1)[0]
    rng = torch.get_rng_state()
    step = TrainStep(pop, popvec.optim.SGD(pop, lr=0.1), member_chunk_size="auto")
    step._resolve_chunk(x, y, False, {})
    assert step._chunk in (1, 2, None)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in {**pop.params, **pop.buffers}.items():
        assert torch.equal(v, before[k]), k
    other = Population.from_factory(MODEL_FNS["cnn_bn"], 4, seed=1)
    again = TrainStep(other, popvec.optim.SGD(other, lr=0.1), member_chunk_size="auto")
    again._resolve_chunk(x, y, False, {})  # same model, N, batch shape and loss: the cached choice
    assert again._chunk == step._chunk and len(calls) == 1
    again._resolve_chunk(x[:5], y[:5], False, {})  # another batch shape: probed again
    assert len(calls) == 2


def test_member_loop_with_loss_hparams_and_mask_equals_vmap() -> None:
    smoothing = torch.tensor([0.0, 0.1, 0.2, 0.3])
    mask = torch.tensor([True, False, True, True])
    runs = []
    for member_chunk_size in (None, 1):
        pop = Population.from_factory(MODEL_FNS["cnn_bn"], 4, seed=0)
        step = TrainStep(pop, popvec.optim.Adam(pop, lr=1e-2), loss_fn=cross_entropy, member_chunk_size=member_chunk_size)
        losses = [step(x, y, loss_hparams={"label_smoothing": smoothing}, mask=mask) for x, y in make_batches(4)]
        runs.append((pop, torch.stack(losses)))
    (whole, whole_losses), (looped, looped_losses) = runs
    torch.testing.assert_close(looped_losses, whole_losses, rtol=RTOL, atol=ATOL)
    _assert_same(looped, whole)


def test_member_loop_gives_zero_gradients_to_unused_parameters() -> None:
    model_fn = lambda: torch.nn.ModuleDict({"used": torch.nn.Linear(64, 10), "unused": torch.nn.Linear(3, 3)})  # noqa: E731

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model_fn()

        def forward(self, x: Tensor) -> Tensor:
            return self.body["used"](torch.flatten(x, 1))

    pop = Population.from_factory(Net, 3, seed=0)
    grad_fn = make_grad_fn(pop, F.cross_entropy, per_member=False, member_chunk_size=1)
    x, y = make_batches(1)[0]
    grads, losses = grad_fn(dict(pop.params), {}, dict(pop.buffers), x, y)
    assert losses.shape == (3,)
    assert torch.equal(grads["body.unused.weight"], torch.zeros(3, 3, 3))
    assert grads["body.used.weight"].abs().sum() > 0


@pytest.mark.parametrize(("text", "expected"), [("auto", "auto"), ("3", 3)])
def test_cli_member_chunk_size_accepts_auto(text: str, expected: object) -> None:
    assert positive_int_or_auto(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "fast"])
def test_cli_member_chunk_size_refuses_bad_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="'auto'"):
        positive_int_or_auto(text)
