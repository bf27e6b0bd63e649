"""Shared fixtures for the core tests: tiny models, data, and one-model-at-a-time references.

The reference for member ``i`` of ``Population.from_factory(model_fn, n, seed)`` is always
``torch.manual_seed(seed + i); model_fn()`` trained by a plain loop with ``torch.optim`` on the
same batches; ``assert_members_equal`` compares every parameter and buffer of the stack with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IN_SHAPE = (1, 8, 8)
NUM_CLASSES = 3
BATCH = 16

# Stacked and one-at-a-time runs reduce in different orders (bmm vs mm), so they agree to a few
# ulps, not bit for bit; over 20 steps the error stays far below these tolerances.
RTOL = 1e-5
ATOL = 1e-6


class TinyMLP(nn.Module):
    """64 -> 16 -> 3 ReLU MLP (optionally with dropout)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(torch.flatten(x, 1)))))


class TinyCNN(nn.Module):
    """conv(1, 4, 3, no bias) + BatchNorm2d + ReLU + avgpool(2) + linear, on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        # No conv bias: BatchNorm cancels it, so its true gradient is 0 and Adam would turn the
        # rounding noise of that zero into full-size steps (different noise in every implementation).
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def tiny_mlp() -> nn.Module:
    return TinyMLP()


def tiny_mlp_dropout() -> nn.Module:
    return TinyMLP(dropout=0.5)


def tiny_cnn() -> nn.Module:
    return TinyCNN()


MODEL_FNS: dict[str, Callable[[], nn.Module]] = {"mlp": tiny_mlp, "cnn_bn": tiny_cnn}


def make_batches(steps: int, n: int | None = None, batch: int = BATCH, seed: int = 1234) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches ``(x, y)``: shared ``[B, 1, 8, 8]`` or, with ``n``, per member ``[n, B, ...]``."""
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    return [
        (torch.randn(*lead, batch, *IN_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (*lead, batch), generator=g))
        for _ in range(steps)
    ]


def member_batch(batch: tuple[Tensor, Tensor], i: int, per_member: bool) -> tuple[Tensor, Tensor]:
    """What member ``i`` sees of a (shared or per-member) batch."""
    x, y = batch
    return (x[i], y[i]) if per_member else (x, y)


def reference_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_fn()


class Reference:
    """One model trained alone with a ``torch.optim`` optimizer (and optionally a scheduler/clipping)."""

    def __init__(
        self,
        model: nn.Module,
        opt_fn: Callable[[Any], torch.optim.Optimizer],
        sched_fn: Callable[[torch.optim.Optimizer], Any] | None = None,
        max_grad_norm: float | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        self.model = model
        self.opt = opt_fn(model.parameters())
        self.sched = sched_fn(self.opt) if sched_fn is not None else None
        self.max_grad_norm = max_grad_norm
        self.loss_fn = loss_fn
        self.last_grad_norm: float | None = None

    def step(self, x: Tensor, y: Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.max_grad_norm is not None:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss.item()

    def clone(self) -> Reference:
        """An independent copy: model, optimizer state and scheduler (deep-copied together)."""
        return copy.deepcopy(self)


def make_references(
    model_fn: Callable[[], nn.Module],
    n: int,
    seed: int,
    opt_fns: Callable[[Any], torch.optim.Optimizer] | Sequence[Callable[[Any], torch.optim.Optimizer]],
    **kwargs: Any,
) -> list[Reference]:
    """Member i's reference: ``torch.manual_seed(seed + i); model_fn()`` with its own optimizer."""
    if callable(opt_fns):
        opt_fns = [opt_fns] * n
    per_member = {k: v for k, v in kwargs.items() if isinstance(v, (list, tuple))}
    shared = {k: v for k, v in kwargs.items() if k not in per_member}
    return [
        Reference(reference_model(model_fn, seed + i), opt_fns[i], **shared, **{k: v[i] for k, v in per_member.items()}) for i in range(n)
    ]


def run_references(refs: Sequence[Reference], batches: Sequence[tuple[Tensor, Tensor]], per_member: bool) -> None:
    for batch in batches:
        for i, ref in enumerate(refs):
            ref.step(*member_batch(batch, i, per_member))


def run_population(step: Any, batches: Sequence[tuple[Tensor, Tensor]], per_member: bool) -> list[Tensor]:
    return [step(x, y, per_member=per_member) for x, y in batches]


def assert_member_equals(pop: Any, i: int, model: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Every parameter and buffer of member ``i`` equals ``model``'s (integer buffers exactly)."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert set(pop.params) == set(params)
    assert set(pop.buffers) == set(buffers)
    for name, stack in [*pop.params.items(), *pop.buffers.items()]:
        expected = params[name] if name in params else buffers[name]
        actual = stack[i]
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected.detach(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"member {i} {n}: {m}")
        else:
            assert torch.equal(actual, expected), f"member {i} {name}: {actual} != {expected}"


def assert_members_equal(pop: Any, models: Sequence[nn.Module], rtol: float = RTOL, atol: float = ATOL) -> None:
    assert pop.n == len(models)
    for i, model in enumerate(models):
        assert_member_equals(pop, i, model, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for these tiny models: no speed lost alone, and no OpenMP spin-waiting
    (10x slowdowns seen) when another process shares the 2 cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=sorted(MODEL_FNS))
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param
