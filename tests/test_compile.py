"""``compile=True``: the vmapped forward/backward under torch.compile trains exactly like eager."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, RTOL, make_batches, tiny_mlp

import popvec
from popvec import Population
from popvec.engine import TrainStep


@pytest.mark.slow
def test_compiled_step_equals_eager() -> None:
    runs = []
    for compile in (False, True):
        pop = Population.from_factory(tiny_mlp, 3, seed=0)
        step = TrainStep(pop, popvec.optim.Adam(pop, lr=[1e-2, 5e-3, 0.0]), compile=compile)
        losses = torch.stack([step(x, y) for x, y in make_batches(6)])
        runs.append((pop, losses))
    (eager, eager_losses), (compiled, compiled_losses) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=RTOL, atol=ATOL)
    for name in eager.params:
        torch.testing.assert_close(compiled.params[name], eager.params[name], rtol=RTOL, atol=ATOL)
