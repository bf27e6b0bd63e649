"""``evaluate`` equals evaluating each member alone, for every way of batching the data."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import IN_SHAPE, MODEL_FNS, NUM_CLASSES, make_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from popvec import Population, optim
from popvec.data import TensorSplit
from popvec.engine import TrainStep, evaluate

pytestmark = pytest.mark.usefixtures("single_thread")

N = 4
M = 37  # not divisible by any batch size used below except 1 and 37


def dataset(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, *IN_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (M,), generator=g)


def trained(model: str) -> Population:
    """Members that differ in accuracy, with non-trivial BatchNorm statistics."""
    pop = Population.from_factory(MODEL_FNS[model], N, seed=1)
    step = TrainStep(pop, optim.Adam(pop, lr=[1e-2, 3e-2, 1e-3, 0.0]))
    for x, y in make_batches(5, N, seed=3):
        step(x, y, per_member=True)
    return pop


def reference(pop: Population, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy) -> dict[str, torch.Tensor]:
    """Each member exported as a plain module, evaluated on the whole dataset in one batch."""
    losses, accs = [], []
    for m in pop.members():
        m.eval()
        with torch.no_grad():
            out = m(x)
        losses.append(loss_fn(out, y))
        accs.append((out.argmax(-1) == y).float().mean())
    return {"loss": torch.stack(losses), "accuracy": torch.stack(accs)}


def check(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(result) >= {"loss", "accuracy"}
    for key in ("loss", "accuracy"):
        assert result[key].shape == (N,)
        assert result[key].dtype == torch.float32
        torch.testing.assert_close(result[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module", params=sorted(MODEL_FNS))
def setup(request: pytest.FixtureRequest) -> tuple[Population, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    pop = trained(request.param)
    x, y = dataset()
    return pop, (x, y), reference(pop, x, y)


@pytest.mark.parametrize("member_chunk_size", [None, 1, 3])
@pytest.mark.parametrize("batch_size", [1, 8, 10, M, 1024])
def test_evaluate_equals_per_module(setup, batch_size: int, member_chunk_size: int | None) -> None:
    pop, data, expected = setup
    check(evaluate(pop, data, batch_size=batch_size, member_chunk_size=member_chunk_size), expected)


def test_accuracies_differ_between_members(setup) -> None:
    """Sanity: the reference is not trivially equal for all members."""
    _, _, expected = setup
    assert len(set(expected["loss"].tolist())) == N


@settings(max_examples=10, deadline=None, derandomize=True)
@given(batch_size=st.integers(1, 50), member_chunk_size=st.one_of(st.none(), st.integers(1, N + 2)))
def test_evaluate_any_batching(batch_size: int, member_chunk_size: int | None) -> None:
    pop = trained("cnn_bn")
    x, y = dataset(seed=4)
    check(evaluate(pop, (x, y), batch_size=batch_size, member_chunk_size=member_chunk_size), reference(pop, x, y))


@pytest.mark.parametrize("kind", ["tensor_split", "dataloader", "list_of_batches", "generator"])
def test_evaluate_data_forms(setup, kind: str) -> None:
    pop, (x, y), expected = setup
    if kind == "tensor_split":
        data = TensorSplit(x, y)
    elif kind == "dataloader":
        data = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=False)
    elif kind == "list_of_batches":
        data = [(x[:5], y[:5]), (x[5:], y[5:])]
    else:
        data = ((xb, yb) for xb, yb in zip(x.split(6), y.split(6)))
    check(evaluate(pop, data), expected)


def test_evaluate_shuffled_dataloader(setup) -> None:
    """Order does not matter: a shuffling DataLoader gives the same means."""
    pop, (x, y), expected = setup
    torch.manual_seed(0)
    check(evaluate(pop, DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)), expected)


def test_evaluate_custom_loss() -> None:
    pop = trained("mlp")
    x, y = dataset()

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, label_smoothing=0.2)

    check(evaluate(pop, (x, y), loss_fn=loss_fn, batch_size=9), reference(pop, x, y, loss_fn))


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_evaluate_restores_mode_and_leaves_state(mode: bool) -> None:
    pop = trained("cnn_bn")
    pop.train(mode)
    before = {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}
    evaluate(pop, dataset(), batch_size=8)
    assert pop.training is mode
    for k, v in [*pop.params.items(), *pop.buffers.items()]:
        assert torch.equal(v, before[k]), f"evaluate changed {k}"


def test_evaluate_restores_mode_on_error() -> None:
    pop = trained("cnn_bn").train()

    def broken(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate(pop, dataset(), loss_fn=broken)
    assert pop.training is True


def test_evaluate_uses_eval_mode() -> None:
    """BatchNorm in eval mode uses running statistics: a one-sample batch gives the same answer."""
    pop = trained("cnn_bn").train()
    x, y = dataset()
    check(evaluate(pop, (x, y), batch_size=1), reference(pop, x, y))


def test_evaluate_bad_input() -> None:
    pop = trained("mlp")
    x, y = dataset()
    with pytest.raises(ValueError):
        evaluate(pop, [])
    with pytest.raises(ValueError):
        evaluate(pop, (x, y[:-1]))
    with pytest.raises(ValueError):
        evaluate(pop, (x, y), batch_size=0)
