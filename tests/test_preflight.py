"""What torch.func cannot batch fails early with one clear error: the module, the operation and the fix.

Also: ``randomness="same"`` (shared masks) and models that modify their input in place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popvec import Population, PopulationTrainer, optim
from popvec.diagnose import VmapError
from popvec.engine import TrainStep, evaluate, preflight

N_CLASSES = 3


class InplaceRandom(nn.Module):
    """Stochastic depth as torchvision writes it: a mask drawn in place into a fresh (unbatched) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.empty(x.shape[0], 1, dtype=x.dtype)
        noise.bernoulli_(0.8)
        return self.fc(x) * noise


class InplaceDropout(nn.Module):
    """In-place dropout on a tensor shared by all members."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.ones(x.shape[0], 1)
        F.dropout(scale, 0.5, training=True, inplace=True)
        return self.fc(x) * scale


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(5, N_CLASSES)


class LSTMModel(Wrapped):
    def __init__(self) -> None:
        super().__init__(nn.LSTM(4, 5, batch_first=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x)[0][:, -1])


class EncoderModel(nn.Module):
    def __init__(self, nested: bool = True) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(4, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, -2:] = True
        return self.head(self.encoder(x, src_key_padding_mask=padding)[:, 0])


class MutatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x.add_(1.0)
        return self.fc(x)


def flat_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g), torch.randint(0, N_CLASSES, (6,), generator=g)


def seq_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 7, 4, generator=g), torch.randint(0, N_CLASSES, (6,), generator=g)


@pytest.mark.parametrize("model_fn", [InplaceRandom, InplaceDropout])
def test_inplace_randomness_is_explained_before_training(model_fn) -> None:  # type: ignore[no-untyped-def]
    pop = Population.from_factory(model_fn, 3)
    before = {k: v.clone() for k, v in pop.params.items()}
    x, y = flat_batch()
    step = TrainStep(pop, optim.SGD(pop, lr=0.1))
    with pytest.raises(RuntimeError) as info:
        step(x, y)
    message = str(info.value)
    assert model_fn.__name__ in message
    assert "randomness='same'" in message and "out-of-place" in message
    assert all(torch.equal(pop.params[k], v) for k, v in before.items())  # nothing trained


@pytest.mark.parametrize("model_fn", [InplaceRandom, InplaceDropout])
def test_randomness_same_trains_with_shared_masks(model_fn) -> None:  # type: ignore[no-untyped-def]
    pop = Population.from_factory(model_fn, 3)
    pop.params = {k: v[:1].expand_as(v).clone() for k, v in pop.params.items()}  # identical members
    x, y = flat_batch()
    trainer = PopulationTrainer(pop, optim.SGD(pop, lr=0.1), randomness="same", progress=False, callbacks=[])
    losses = trainer.step(x, y)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, losses[:1].expand_as(losses))  # one shared mask: identical members stay identical
    out = pop.forward(x, randomness="same")
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_bad_randomness_is_refused() -> None:
    pop = Population.from_factory(InplaceRandom, 2)
    with pytest.raises(ValueError, match="randomness"):
        TrainStep(pop, optim.SGD(pop, lr=0.1), randomness="error")
    with pytest.raises(ValueError, match="randomness"):
        pop.forward(flat_batch()[0], randomness="other")


def test_lstm_trains_and_its_evaluation_is_explained() -> None:
    pop = Population.from_factory(LSTMModel, 3)
    x, y = seq_batch()
    step = TrainStep(pop, optim.SGD(pop, lr=0.1))
    try:
        losses = step(x, y)
    except VmapError as error:  # a torch without the batching used in training: still explained
        assert "LSTM" in str(error) and "loop" in str(error)
        return
    assert torch.isfinite(losses).all()
    try:
        metrics = evaluate(pop, (x, y))
    except RuntimeError as error:
        message = str(error)
        assert "LSTM (module 'inner')" in message
        assert "aten::lstm" in message
        assert "no batching rule for LSTM" in message and "population.member(i)" in message
    else:  # this torch batches LSTM evaluation: then it must be right
        expected = torch.stack([F.cross_entropy(pop.member(i).eval()(x), y) for i in range(pop.n)])
        torch.testing.assert_close(metrics["loss"], expected.detach(), rtol=1e-5, atol=1e-6)


def test_transformer_padding_mask_is_explained_and_the_fix_works() -> None:
    x, y = seq_batch()
    pop = Population.from_factory(EncoderModel, 2)
    step = TrainStep(pop, optim.SGD(pop, lr=0.1))
    assert torch.isfinite(step(x, y)).all()  # training takes the batched (non-nested) path
    try:
        evaluate(pop, (x, y))
    except RuntimeError as error:
        message = str(error)
        assert "TransformerEncoderLayer" in message
        assert "enable_nested_tensor=False" in message
    fixed = Population.from_factory(lambda: EncoderModel(nested=False), 2)
    metrics = evaluate(fixed, (x, y))
    expected = torch.stack([F.cross_entropy(fixed.member(i).eval()(x), y) for i in range(fixed.n)])
    torch.testing.assert_close(metrics["loss"], expected.detach(), rtol=1e-5, atol=1e-6)


def test_preflight_changes_nothing() -> None:
    pop = Population.from_factory(lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)), 3)
    state = {k: v.clone() for k, v in [*pop.params.items(), *pop.buffers.items()]}
    x, y = flat_batch()
    x0 = x.clone()
    pop.eval()
    rng = torch.get_rng_state()
    preflight(pop, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not pop.training
    assert torch.equal(x, x0)
    assert all(torch.equal(v, {**pop.params, **pop.buffers}[k]) for k, v in state.items())


@pytest.mark.parametrize("per_member", [False, True])
def test_input_mutating_model_gives_the_same_results_for_any_chunking(per_member: bool) -> None:
    g = torch.Generator().manual_seed(1)
    lead = (4,) if per_member else ()
    batches = [(torch.randn(*lead, 6, 4, generator=g), torch.randint(0, N_CLASSES, (*lead, 6), generator=g)) for _ in range(3)]
    runs = []
    for chunk in (None, 1, 3):
        pop = Population.from_factory(MutatesInput, 4)
        step = TrainStep(pop, optim.SGD(pop, lr=0.1), member_chunk_size=chunk)
        losses = [step(x, y, per_member=per_member) for x, y in batches]
        out = pop.forward(batches[0][0], per_member=per_member, member_chunk_size=chunk)
        runs.append((torch.stack(losses), pop.params["fc.weight"], out))
    for losses, weight, out in runs[1:]:
        torch.testing.assert_close(losses, runs[0][0])
        torch.testing.assert_close(weight, runs[0][1])
        torch.testing.assert_close(out, runs[0][2])
    # ... and equal to each member run alone on its own copy of the batch
    torch.manual_seed(0)
    alone = MutatesInput()
    x0, y0 = batches[0]
    x_first = (x0[0] if per_member else x0).clone()
    torch.testing.assert_close(runs[0][0][0, 0], F.cross_entropy(alone(x_first), y0[0] if per_member else y0).detach())
    assert torch.equal(batches[0][0], x0)  # the caller's batch is left as it was
