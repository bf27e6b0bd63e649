"""Running members in chunks (``member_chunk_size``) changes speed, not results."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, MODEL_FNS, RTOL, make_batches

import popvec
from popvec import Population
from popvec.engine import TrainStep


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
