"""Running a population's training step in chunks of members, and choosing the chunk size.

Why: on a CPU, one vmapped step over N convolutional members turns every convolution into a
grouped convolution over ``[B, N*C, H, W]`` activations that no longer fit in the cache, and is
slower than N separate steps. Smaller chunks keep activations in cache. In chunks of one member
the step needs no vmap at all: each member is a plain ``functional_call`` on views of its
``[N, ...]`` slices with ``torch.autograd.grad`` (measured faster than ``vmap(chunk_size=1)``,
which still pays vmap's batching for each member). Larger chunks use ``vmap(chunk_size=...)``.
Every chunking gives the same results (float tolerance).

``member_chunk_size="auto"`` picks the chunk size per (model, N, batch shape, dtype): on the CPU
by a short probe (:func:`probe_chunk_size`, cached in-process), on a GPU the whole stack (capped by
a memory estimate once one is available: :func:`_memory_cap`).

channels_last is not a candidate: on a 2-core Xeon (torch 2.14) it made the member loop 0.78x the
time for ResNet-20 and 0.81x for VGGSmall (0.94x for LeNet-5), but its float32 convolution
gradients were about 1% off (relative to float64), against 1e-6 in the default layout, in plain
PyTorch as much as here: not the same results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["AUTO", "member_loop_grad_fn", "probe_chunk_size", "resolve_chunk_size", "clear_cache"]

AUTO = "auto"

ChunkSize = int | str | None
GradFnFactory = Callable[[int | None], Callable[..., tuple[dict[str, Tensor], Tensor]]]

#: the probe's choice per (model signature, N, batch shapes, dtypes, ...): measured once per process
_CACHE: dict[tuple[Any, ...], int | None] = {}

#: timed rounds over all candidates (after one warmup round); each one's fastest measurement counts
PROBE_REPEATS = 2

#: how much faster per member than the whole stack another chunking must measure to be chosen
PROBE_MARGIN = 0.15


def member_loop_grad_fn(
    skeleton: nn.Module, loss_fn: Callable[..., Tensor], per_member: bool, with_loss_hparams: bool
) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """``grad_fn`` of :func:`popvec.engine.make_grad_fn` computed one member at a time, without vmap.

    Member i runs ``functional_call`` on views ``p[i]`` of the stacked tensors, so its BatchNorm
    statistics are updated in place in the stack; its gradients come from ``torch.autograd.grad``
    (zeros for parameters the loss does not reach, as under vmap). Dropout draws an independent
    mask per member (vmap's ``randomness="different"``). Returns grads ``[N, ...]`` and losses ``[N]``.
    """

    def grad_fn(
        trainable: dict[str, Tensor],
        frozen: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        loss_hparams: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        names = list(trainable)
        n = next(iter({**trainable, **frozen, **buffers}.values())).shape[0]
        per_grads: list[tuple[Tensor, ...]] = []
        losses = []
        with torch.enable_grad():
            for i in range(n):
                leaves = {k: trainable[k][i].detach().requires_grad_() for k in names}
                params = {**leaves, **{k: v[i] for k, v in frozen.items()}}
                member_buffers = {k: v[i] for k, v in buffers.items()}
                xi, yi = (x[i], y[i]) if per_member else (x, y)
                out = functional_call(skeleton, (params, member_buffers), (xi.clone(),))
                kwargs = {k: v[i] for k, v in loss_hparams.items()} if with_loss_hparams and loss_hparams else {}
                loss = loss_fn(out, yi, **kwargs)
                per_grads.append(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True))
                losses.append(loss.detach())
        grads = {k: torch.stack([g[j] for g in per_grads]) for j, k in enumerate(names)}
        return grads, torch.stack(losses)

    return grad_fn


def _signature(
    population: Any, x: Tensor, y: Tensor, per_member: bool, loss_hparams: Mapping[str, Tensor], extra: tuple[Any, ...]
) -> tuple[Any, ...]:
    skeleton = population.skeleton
    stacks = {**population.params, **population.buffers}
    return (
        type(skeleton).__module__,
        type(skeleton).__qualname__,
        tuple((k, tuple(v.shape), v.dtype) for k, v in stacks.items()),
        tuple(population.trainable),
        population.device.type,
        per_member,
        tuple(x.shape),
        x.dtype,
        tuple(y.shape),
        y.dtype,
        tuple(sorted(loss_hparams)),
        torch.get_num_threads(),
        extra,
    )


def _candidates(n: int) -> list[tuple[int | None, int]]:
    """(chunk size, members to time it on): 1 (the member loop), 2, 4, ... below ``n``, then None (the whole stack)."""
    out: list[tuple[int | None, int]] = [(1, 1)]
    c = 2
    while c < n:
        out.append((c, c))
        c *= 2
    return [*out, (None, n)]


def probe_chunk_size(
    population: Any, factory: GradFnFactory, x: Tensor, y: Tensor, per_member: bool, loss_hparams: Mapping[str, Tensor]
) -> int | None:
    """The chunk size whose gradient computation takes the least time per member (None: the whole stack).

    Candidates: the member loop (chunks of 1, no vmap), vmapped chunks of 2, 4, ... below N, and the
    whole stack (None). Candidate c is timed on one chunk of its own size (members ``[:c]``): chunks
    are independent, so the time per member of one chunk is that of the whole step in chunks of c.
    After two warmup calls each (the second one's time sets how often each is called),
    :data:`PROBE_REPEATS` rounds time every candidate in turn (a change of load hits all alike),
    each measurement repeating the call so that it spans about the time of the slowest candidate's
    call (short calls are not favoured by escaping preemption); each candidate's fastest
    measurement counts. The whole stack is kept unless another candidate is at least
    :data:`PROBE_MARGIN` faster. Nothing changes: parameters are only read, BatchNorm statistics
    and the batch are copies, the global RNG is restored. Costs about
    ``PROBE_REPEATS * (log2(N) + 1)`` steps of the whole population's gradient computation.
    """
    n = population.n
    devices = [x.device] if x.is_cuda else []
    runs = []
    for choice, c in _candidates(n):
        trainable = {k: population.params[k][:c] for k in population.trainable}
        frozen = {k: v[:c] for k, v in population.params.items() if k not in trainable}
        buffers = {k: v[:c].clone() for k, v in population.buffers.items()}
        xs, ys = (x[:c], y[:c]) if per_member else (x, y)
        extra = ({k: v[:c] for k, v in loss_hparams.items()},) if loss_hparams else ()
        runs.append((choice, c, factory(choice), (trainable, frozen, buffers, xs, ys, *extra)))

    def timed(fn: Callable[..., Any], args: tuple[Any, ...], calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            grads, losses = fn(*args)
            del grads, losses
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    best_s = {choice: float("inf") for choice, *_ in runs}
    with torch.random.fork_rng(devices=devices):
        # warmup: one call each, then one more that gives each candidate's rough time per call
        per_call = {}
        for choice, _, fn, args in runs:
            timed(fn, args, 1)
            per_call[choice] = timed(fn, args, 1)
        budget = max(per_call.values())
        for _ in range(PROBE_REPEATS):
            for choice, c, fn, args in runs:
                # Each measurement spans about the same wall time (that of the slowest call): on a
                # loaded machine a short call escapes preemption more often than a long one would.
                calls = max(1, min(64, round(budget / max(per_call[choice], 1e-9))))
                best_s[choice] = min(best_s[choice], timed(fn, args, calls) / (calls * c))
    whole = None
    fastest = min(best_s, key=lambda k: best_s[k])
    return fastest if best_s[fastest] < (1 - PROBE_MARGIN) * best_s[whole] else whole


def _memory_cap(population: Any, x: Tensor, per_member: bool) -> int | None:
    """The most members whose activations fit at once in the device's free memory (None: no limit known).

    The stacks already live on the device, so only one member's training activations are probed
    (:func:`popvec.memory.probe_member` on member 0 and one member's batch) and divided into the free
    memory, with :data:`popvec.memory.SAFETY_FRACTION` of it counted.
    """
    from popvec import memory

    free = memory.available_bytes(population.device)
    if free is None or not memory.checks_enabled():
        return None
    estimate = memory.probe_member(population.member(0), x[0] if per_member else x)
    if estimate.activations == 0:
        return None
    return max(1, int(free * memory.SAFETY_FRACTION) // estimate.activations)


def resolve_chunk_size(
    member_chunk_size: ChunkSize,
    population: Any,
    factory: GradFnFactory,
    x: Tensor,
    y: Tensor,
    per_member: bool,
    loss_hparams: Mapping[str, Tensor],
    extra_key: tuple[Any, ...] = (),
    randomness: str = "different",
) -> int | None:
    """The chunk size (None: the whole stack) to use for this step.

    An integer or None is returned as given. ``"auto"``: on the CPU the probe's
    choice (measured once per process for each model signature, N, batch shapes and dtypes, thread
    count and ``extra_key``); on other devices the whole stack, capped by :func:`_memory_cap`.
    With ``randomness="same"`` the member loop is not a candidate (vmapped chunks only).
    """
    if member_chunk_size != AUTO:
        return member_chunk_size  # type: ignore[return-value]
    if population.device.type != "cpu":
        cap = _memory_cap(population, x, per_member)
        return None if cap is None or cap >= population.n else cap
    key = _signature(population, x, y, per_member, loss_hparams, (*extra_key, randomness))
    if key not in _CACHE:
        if randomness != "different":
            _CACHE[key] = None
        else:
            _CACHE[key] = probe_chunk_size(population, factory, x, y, per_member, loss_hparams)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every probed choice (the next "auto" step probes again)."""
    _CACHE.clear()
