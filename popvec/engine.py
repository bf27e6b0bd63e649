"""The training step and evaluation: one vmapped forward/backward for all N members.

:func:`make_grad_fn` is the pure core: ``(trainable, frozen, buffers, x, y) -> (grads, losses)`` as
one ``vmap(grad_and_value(loss))`` call. :class:`TrainStep` binds it to a population and an
optimizer (optionally under ``torch.compile`` or recorded as a CUDA graph); :func:`evaluate`
computes per-member loss and accuracy over a whole dataset in bounded chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from popvec import checks, chunking, diagnose
from popvec.optim import Optimizer, grad_norm
from popvec.population import Population, as_mask, check_batch

__all__ = ["LossFn", "make_grad_fn", "preflight", "TrainStep", "evaluate", "accumulate_metrics", "batch_accuracy"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def make_grad_fn(
    population: Population,
    loss_fn: LossFn,
    per_member: bool,
    member_chunk_size: int | None = None,
    with_loss_hparams: bool = False,
    randomness: str = "different",
) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """``grad_fn(trainable, frozen, buffers, x, y) -> (grads, losses)`` for the whole stack.

    ``trainable``/``frozen``/``buffers`` map names to ``[N, ...]``; ``x`` is ``[B, ...]`` shared or
    ``[N, B, ...]`` per member (likewise ``y``); ``grads`` maps trainable names to ``[N, ...]`` and
    ``losses`` is ``[N]``. BatchNorm buffers are updated in place in train mode; dropout masks are
    independent per member. ``member_chunk_size`` runs the members in chunks of that many
    (same results; on a CPU, small chunks keep activations in cache and avoid grouped convolutions;
    chunks of 1 with ``randomness="different"`` run without vmap, see :mod:`popvec.chunking`).
    ``with_loss_hparams=True``: the function takes one more argument, a dict of ``[N]`` tensors
    (per-member loss hyperparameters such as label smoothing), and member i's loss is
    ``loss_fn(out, y, **{k: v[i]})`` (the values reach ``loss_fn`` as 0-d tensors).
    ``randomness`` is vmap's: ``"different"`` (an independent dropout mask per member) or ``"same"``
    (one mask shared by all members; needed by modules that draw random numbers in place into a
    tensor shared by all members, such as stochastic depth). Each member's forward gets its own copy
    of ``x``, so a forward that modifies its input in place gives the same results for any chunking.
    """
    skeleton = population.skeleton
    randomness = diagnose.check_randomness(randomness)

    def member_loss(trainable: dict[str, Tensor], frozen: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(skeleton, ({**trainable, **frozen}, buffers), (x.clone(),))
        return loss_fn(out, y)

    if member_chunk_size == 1 and randomness == "different":
        return chunking.member_loop_grad_fn(skeleton, loss_fn, per_member, with_loss_hparams)
    data_dim = 0 if per_member else None
    if with_loss_hparams:

        def member_loss_kw(trainable, frozen, buffers, x, y, loss_hparams):  # type: ignore[no-untyped-def]
            out = functional_call(skeleton, ({**trainable, **frozen}, buffers), (x.clone(),))
            return loss_fn(out, y, **loss_hparams)

        return vmap(
            grad_and_value(member_loss_kw), in_dims=(0, 0, 0, data_dim, data_dim, 0), randomness=randomness, chunk_size=member_chunk_size
        )
    return vmap(grad_and_value(member_loss), in_dims=(0, 0, 0, data_dim, data_dim), randomness=randomness, chunk_size=member_chunk_size)


def preflight(
    population: Population,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    per_member: bool = False,
    loss_hparams: dict[str, Tensor] | None = None,
    randomness: str = "different",
) -> None:
    """Check that a training step can run under vmap, before any training; raise a clear error if not.

    Runs one forward/backward of at most two members on at most two samples of ``(x, y)`` under
    ``vmap`` (as :func:`make_grad_fn` does). Nothing is changed: parameters are only read, buffers
    (BatchNorm statistics) and the batch are copies, and the global RNG is restored. On failure raises
    one RuntimeError (:class:`popvec.diagnose.VmapError`) naming the innermost module that was running,
    the torch operation and a known fix (``randomness="same"`` for in-place random draws, no LSTM
    batching rule, ``enable_nested_tensor=False`` for TransformerEncoder padding masks). The cost is
    one tiny step; :class:`TrainStep` runs it once per batch shape.
    """
    members = min(population.n, 2)
    samples = min(int(x.shape[1 if per_member else 0]) if x.dim() > int(per_member) else 1, 2)

    def cut(t: Tensor) -> Tensor:
        return (t[:members, :samples] if per_member else t[:samples]).clone()

    probe = Population(
        population.skeleton,
        {k: v[:members] for k, v in population.params.items()},
        {k: v[:members].clone() for k, v in population.buffers.items()},
        trainable=population.trainable,
    )
    hparams = {k: v[:members] for k, v in (loss_hparams or {}).items()}
    grad_fn = make_grad_fn(probe, loss_fn, per_member, None, bool(hparams), randomness)
    trainable = {k: probe.params[k] for k in probe.trainable}
    frozen = {k: v for k, v in probe.params.items() if k not in trainable}
    xs, ys = cut(x), cut(y)
    extra = (hparams,) if hparams else ()

    was_training = population.training
    devices = [x.device] if x.is_cuda else []
    try:
        population.train()
        with torch.random.fork_rng(devices=devices):
            grad_fn(trainable, frozen, probe.buffers, xs, ys, *extra)
    except (RuntimeError, NotImplementedError) as error:
        raise probe._explained(error, "training step") from error
    finally:
        population.train(was_training)


class TrainStep:
    """One training step of a population: vmapped forward/backward, then one optimizer update.

    ``compile=True`` runs the gradient computation under ``torch.compile`` (expect one compilation
    per distinct population size and batch shape). ``cuda_graph`` (default: on for CUDA with a
    popvec optimizer) records the whole step (forward, backward, update) once as a CUDA graph and
    replays it: the per-step cost of the Python/vmap dispatch disappears. A graph is reused while
    the batch shape and every stacked tensor stay the same, and recorded again after a selection
    or any change of hyperparameter layout (a few eager warmup steps first).
    ``randomness`` is passed to vmap (see :func:`make_grad_fn`). Before the first step of each batch
    shape a :func:`preflight` (one tiny step on a slice) turns what vmap cannot batch into one clear
    error naming the module and the fix. ``member_chunk_size``: an integer, None (the whole stack) or
    ``"auto"`` (the chunk size a short probe finds fastest on the CPU, cached per model, N and batch
    shape; the whole stack elsewhere; see :mod:`popvec.chunking`).
    """

    warmup_steps = 2

    def __init__(
        self,
        population: Population,
        optimizer: Optimizer,
        loss_fn: LossFn = F.cross_entropy,
        compile: bool = False,
        cuda_graph: bool | None = None,
        member_chunk_size: int | str | None = None,
        randomness: str = "different",
    ) -> None:
        checks.integer_or_auto("member_chunk_size", member_chunk_size)
        self.randomness = diagnose.check_randomness(randomness)
        self._preflown: set[tuple[Any, ...]] = set()
        self.population = population
        self.member_chunk_size = member_chunk_size
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.compile = compile
        self.cuda_graph = cuda_graph
        self._grad_fns: dict[tuple[bool, bool, int | None], Callable[..., Any]] = {}
        # the chunk size in use; "auto" sets it per batch shape and N
        self._chosen: dict[tuple[Any, ...], int | None] = {}
        self._chunk: int | None = None if member_chunk_size == chunking.AUTO else member_chunk_size  # type: ignore[assignment]
        self._graph: _RecordedStep | None = None
        self._warm_key: tuple[Any, ...] | None = None
        self._warm_count = 0
        self.last_grad_norm: Tensor | None = None
        #: keep ``grad_norm_max``, each member's largest gradient norm since the last reset (eager steps)
        self.track_grad_norm = False
        self.grad_norm_max: Tensor | None = None

    def _grad_fn(self, per_member: bool, with_loss_hparams: bool) -> Callable[..., Any]:
        key = (per_member, with_loss_hparams, self._chunk)
        if key not in self._grad_fns:
            fn = make_grad_fn(self.population, self.loss_fn, per_member, self._chunk, with_loss_hparams, self.randomness)
            self._grad_fns[key] = torch.compile(fn) if self.compile else fn
        return self._grad_fns[key]

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        per_member: bool = False,
        mask: Tensor | None = None,
        loss_hparams: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Train every member on its batch once; returns the per-member losses ``[N]`` (detached).

        ``mask`` (``[N]`` bools): only members marked True train; the others keep their
        parameters, buffers (BatchNorm statistics), optimizer state and step count exactly (their
        losses are still computed). A masked step always runs eagerly, never as a CUDA graph.
        ``loss_hparams``: per-member loss hyperparameters (``[N]`` tensors) passed to ``loss_fn``
        as keywords (member i gets ``v[i]``).
        """
        pop = self.population
        check_batch(x, pop.n, per_member, "x")
        check_batch(y, pop.n, per_member, "y")
        loss_hparams = loss_hparams or {}
        shape_key = (per_member, tuple(x.shape), tuple(y.shape), tuple(sorted(loss_hparams)))
        if shape_key not in self._preflown:  # once per batch shape: a clear error instead of a vmap one
            preflight(pop, x, y, self.loss_fn, per_member, loss_hparams, self.randomness)
            self._preflown.add(shape_key)
        self._resolve_chunk(x, y, per_member, loss_hparams, (*shape_key, pop.n, x.dtype))
        if mask is not None:
            return self._masked_step(x, y, per_member, as_mask(mask, pop.n, pop.device), loss_hparams)
        if self._graphs_enabled(x):
            return self._graph_step(x, y, per_member, loss_hparams)
        return self._eager_step(x, y, per_member, loss_hparams)

    def _eager_step(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor], mask: Tensor | None = None) -> Tensor:
        pop = self.population
        trainable = {k: pop.params[k] for k in pop.trainable}
        frozen = {k: v for k, v in pop.params.items() if k not in trainable}
        pop.train()
        extra = (loss_hparams,) if loss_hparams else ()
        grads, losses = self._grad_fn(per_member, bool(loss_hparams))(trainable, frozen, pop.buffers, x, y, *extra)
        if self.track_grad_norm:
            norms = grad_norm([grads[k] for k in pop.trainable])
            self.grad_norm_max = norms if self.grad_norm_max is None else torch.maximum(self.grad_norm_max, norms)
        self.last_grad_norm = self.optimizer.step(grads) if mask is None else self.optimizer.step(grads, mask=mask)
        return losses.detach()

    def _resolve_chunk(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor], key: tuple[Any, ...] = ()) -> None:
        """Set the chunk size of this step: as given, or for "auto" the probe's (cached) choice."""
        if self.member_chunk_size != chunking.AUTO:
            return
        if key and key in self._chosen:  # this batch shape and N seen before: no signature to rebuild
            self._chunk = self._chosen[key]
            return

        def factory(chunk: int | None) -> Callable[..., Any]:
            return make_grad_fn(self.population, self.loss_fn, per_member, chunk, bool(loss_hparams), self.randomness)

        self._chunk = chunking.resolve_chunk_size(
            chunking.AUTO, self.population, factory, x, y, per_member, loss_hparams, (self.loss_fn,), self.randomness
        )
        if key:
            self._chosen[key] = self._chunk

    def _masked_step(self, x: Tensor, y: Tensor, per_member: bool, mask: Tensor, loss_hparams: dict[str, Tensor]) -> Tensor:
        """An eager step whose masked members' buffers are restored (the optimizer restores the rest)."""
        saved = {k: v.clone() for k, v in self.population.buffers.items()}
        losses = self._eager_step(x, y, per_member, loss_hparams, mask)
        for k, old in saved.items():
            buf = self.population.buffers[k]
            buf.copy_(torch.where(mask.view(-1, *([1] * (buf.dim() - 1))), buf, old))
        return losses

    # ------------------------------------------------------------------ CUDA graphs
    def _graphs_enabled(self, x: Tensor) -> bool:
        if self.track_grad_norm:  # the running maximum is host-managed state: eager steps only
            return False
        capable = x.is_cuda and self.optimizer.cuda_graph_capable and not self.compile
        if self.cuda_graph is None:
            return capable
        if self.cuda_graph and not capable:
            raise ValueError("cuda_graph=True needs CUDA tensors, a popvec optimizer (not from_torch) and compile=False")
        return self.cuda_graph

    def _key(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor]) -> tuple[Any, ...]:
        pop = self.population
        stacks = [*pop.params.values(), *pop.buffers.values()]
        return (
            per_member,
            tuple(x.shape),
            x.dtype,
            tuple(y.shape),
            y.dtype,
            tuple(pop.trainable),
            tuple((t.data_ptr(), tuple(t.shape)) for t in stacks),
            self.optimizer.graph_key(),
            tuple((k, t.data_ptr(), tuple(t.shape)) for k, t in loss_hparams.items()),
        )

    def _graph_step(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor]) -> Tensor:
        key = self._key(x, y, per_member, loss_hparams)
        if self._graph is not None and self._graph.key == key:
            return self._graph.replay(x, y, self.optimizer)
        self._graph = None
        if self._warm_key != key:
            self._warm_key, self._warm_count = key, 0
        if self._warm_count < self.warmup_steps:
            # Eager steps on a side stream before recording, as CUDA graph capture requires.
            self._warm_count += 1
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                losses = self._eager_step(x, y, per_member, loss_hparams)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return losses
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        host_state = self.optimizer.host_state()
        with torch.cuda.graph(graph):
            static_losses = self._eager_step(static_x, static_y, per_member, loss_hparams)
        # Recording ran the host-side bookkeeping once but trained nothing: undo it; replays tick.
        self.optimizer.restore_host_state(host_state)
        self._graph = _RecordedStep(key, graph, static_x, static_y, static_losses)
        return self._graph.replay(x, y, self.optimizer)


class _RecordedStep:
    """A recorded step: static input buffers, the graph, and its static output."""

    def __init__(self, key: tuple[Any, ...], graph: Any, x: Tensor, y: Tensor, losses: Tensor) -> None:
        self.key, self.graph, self.x, self.y, self.losses = key, graph, x, y, losses

    def replay(self, x: Tensor, y: Tensor, optimizer: Optimizer) -> Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        optimizer.tick()
        return self.losses.clone()


def batch_accuracy(outputs: Tensor, y: Tensor) -> Tensor:
    """Number of correct argmax predictions per member: outputs ``[N, B, C]``, y ``[B]`` or ``[N, B]``."""
    return (outputs.argmax(dim=-1) == y).sum(dim=-1)


@torch.no_grad()
def evaluate(
    population: Population,
    data: Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor] | Any,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int = 1024,
    member_chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-member mean loss and accuracy over all of ``data``: ``{"loss": [N], "accuracy": [N]}``.

    ``data`` is an ``(x, y)`` pair of tensors (split into chunks of ``batch_size`` samples), a
    ``TensorSplit``, or any iterable of shared ``(x, y)`` batches such as a ``DataLoader``.
    ``member_chunk_size`` bounds how many members run at once. Runs in eval mode and restores the
    population's mode afterwards. ``loss_fn`` must return the mean over a batch. A member whose
    loss is not finite (NaN weights or outputs) gets accuracy NaN: an argmax over NaN outputs is no
    measurement. Inputs holding NaN or inf raise ValueError ("... x contains NaN ...").
    """
    from popvec.loaders import iterate_batches

    was_training = population.training
    population.eval()
    try:
        metrics = accumulate_metrics(
            iterate_batches(data, batch_size),
            lambda x: population.forward(x, member_chunk_size=member_chunk_size),
            vmap(loss_fn, in_dims=(0, None)),
            population.device,
        )
    finally:
        population.train(was_training)
    loss = metrics["loss"]
    accuracy = torch.where(torch.isfinite(loss), metrics["accuracy"], torch.full_like(loss, float("nan")))
    return {"loss": loss.float(), "accuracy": accuracy.float()}


@torch.no_grad()
def accumulate_metrics(
    batches: Iterable[tuple[Tensor, Tensor]],
    outputs_fn: Callable[[Tensor], Tensor],
    losses_fn: Callable[[Tensor, Tensor], Tensor],
    device: torch.device | str,
) -> dict[str, Tensor]:
    """Per-member mean loss and accuracy over all ``batches``: ``{"loss": [N], "accuracy": [N]}`` in float64.

    Each ``(x, y)`` batch goes to ``device``; ``outputs_fn(x)`` gives the members' outputs
    ``[N, B, ...]`` and ``losses_fn(outputs, y)`` their mean losses over the batch ``[N]``. Sums
    are kept in float64, each batch weighted by its size B (so uneven batches count per sample);
    correct argmax predictions are counted when outputs are ``[N, B, C]`` and labels integers
    (accuracy 0 otherwise). Inputs ``x``
    holding NaN or inf raise ValueError (checked per batch, reported once at the end). The one
    evaluation loop behind :func:`evaluate`, the LMC shortcut and
    the ensembles; raises ValueError when ``batches`` hold no sample.
    """
    sums: tuple[Tensor, Tensor] | None = None  # per member: loss x batch size, correct predictions
    count = 0
    bad_x: Tensor | None = None  # whether any batch's x held NaN/inf: one reduction per batch, one sync at the end
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if x.is_floating_point():
            bad = ~torch.isfinite(x).all()
            bad_x = bad if bad_x is None else bad_x | bad
        outputs = outputs_fn(x)
        losses = losses_fn(outputs, y)
        if sums is None:
            zeros = torch.zeros(losses.shape, dtype=torch.float64, device=losses.device)
            sums = (zeros, zeros.clone())
        total_loss, correct = sums
        total_loss += losses.double() * y.shape[0]
        if outputs.dim() == 3 and not y.is_floating_point():
            correct += batch_accuracy(outputs, y).double()
        count += y.shape[0]
    if sums is None or count == 0:
        raise ValueError("data must hold at least one sample")
    if bad_x is not None and bool(bad_x):
        raise ValueError("evaluation data x contains NaN or inf: every loss over it would be NaN; clean the data first")
    return {"loss": sums[0] / count, "accuracy": sums[1] / count}
