"""``evaluate`` equals evaluating each member alone, for every way of batching the data; the
accumulator under it (``accumulate_metrics``) equals a hand float64 sum over uneven batches."""

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
from popvec.engine import TrainStep, accumulate_metrics, evaluate

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


# --------------------------------------------------------------------------- the accumulator
def test_accumulate_metrics_over_uneven_batches_equals_a_hand_sum() -> None:
    """Float64 sums of batch-mean loss x batch size and of correct predictions, divided by all samples."""
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(N, 64, NUM_CLASSES, generator=g)
    x, y = dataset(seed=2)
    sizes = [5, 1, 17, 14]  # uneven, summing to M
    batches = list(zip(x.split(sizes), y.split(sizes)))

    def outputs_fn(xb: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,nic->nbc", xb.flatten(1), weight)

    def losses_fn(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.cross_entropy(o, yb) for o in out])

    result = accumulate_metrics(iter(batches), outputs_fn, losses_fn, "cpu")
    for i in range(N):
        total, correct = 0.0, 0
        for xb, yb in batches:
            out = outputs_fn(xb)[i]
            total += float(F.cross_entropy(out, yb)) * len(yb)
            correct += int((out.argmax(-1) == yb).sum())
        assert result["loss"][i].item() == total / M  # bit for bit: the same float64 operations in the same order
        assert result["accuracy"][i].item() == correct / M
    assert result["loss"].dtype == result["accuracy"].dtype == torch.float64


def test_accumulate_metrics_counts_no_accuracy_for_float_targets_and_rejects_no_data() -> None:
    x = torch.randn(6, 3)
    batches = [(x[:4], x[:4, :1]), (x[4:], x[4:, :1])]  # a regression: outputs [1, B, 1], float targets

    def losses_fn(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out[0], yb).reshape(1)

    result = accumulate_metrics(batches, lambda xb: xb[None, :, :1], losses_fn, "cpu")
    assert result["loss"].item() == 0.0 and result["accuracy"].item() == 0.0
    with pytest.raises(ValueError, match="at least one sample"):
        accumulate_metrics([], lambda xb: xb, losses_fn, "cpu")
