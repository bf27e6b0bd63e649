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

from popvec import checks, chunking, diagnose, losses
from popvec.optim import Optimizer, PopulationOptimizer, TorchOptimizer, grad_norm
from popvec.population import Population, as_mask, check_batch, check_placement
from popvec.precision import LossScaler, autocast, check_precision, norms_need_float32, under_autocast

__all__ = ["LossFn", "make_grad_fn", "preflight", "TrainStep", "evaluate", "accumulate_metrics", "batch_accuracy"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Losses over class labels: with these, ``y`` must hold integers in ``[0, C)`` (checked, see :func:`check_pair`).
CLASSIFICATION_LOSSES: tuple[Callable[..., Tensor], ...] = (F.cross_entropy, F.nll_loss, losses.cross_entropy)


def check_pair(x: Tensor, y: Tensor, per_member: bool) -> None:
    """Raise unless ``y`` has one entry per sample of ``x`` (no host sync)."""
    dim = 1 if per_member else 0
    if y.dim() <= dim or y.shape[: dim + 1] != x.shape[: dim + 1]:
        lead = "[N, B, ...]" if per_member else "[B, ...]"
        raise checks.InvalidArgument(
            f"y must have one entry per sample of x ({lead}: {tuple(x.shape[: dim + 1])}), got shape {tuple(y.shape)}"
        )


def check_labels(loss_fn: Callable[..., Tensor], outputs: Tensor, y: Tensor) -> None:
    """For a classification loss and class-index targets (``y`` one dim less than ``outputs``), every
    label in ``[0, C)`` for ``C = outputs.shape[-1]`` (one reduction and one host sync)."""
    if loss_fn in CLASSIFICATION_LOSSES and y.dim() == outputs.dim() - 1:
        checks.labels("y", y, int(outputs.shape[-1]))


def make_grad_fn(
    population: Population,
    loss_fn: LossFn,
    per_member: bool,
    member_chunk_size: int | None = None,
    with_loss_hparams: bool = False,
    randomness: str = "different",
    precision: str = "fp32",
    loss_scaled: bool = False,
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
    ``precision`` ``"bf16"``/``"fp16"``: each member's forward and loss run under
    :func:`popvec.precision.autocast` (gradients stay float32, like the parameters).
    ``loss_scaled=True``: the function takes one more argument after those above, the per-member
    loss scales ``[N]``; the gradients are those of ``loss * scale[i]`` and the losses returned are
    the unscaled ones.
    """
    skeleton = population.skeleton
    randomness = diagnose.check_randomness(randomness)
    data_dim = 0 if per_member else None
    if check_precision(precision) != "fp32" or loss_scaled:
        return _mixed_grad_fn(population, loss_fn, data_dim, member_chunk_size, with_loss_hparams, randomness, precision, loss_scaled)

    def member_loss(trainable: dict[str, Tensor], frozen: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(skeleton, ({**trainable, **frozen}, buffers), (x.clone(),))
        return loss_fn(out, y)

    if member_chunk_size == 1 and randomness == "different":
        return chunking.member_loop_grad_fn(skeleton, loss_fn, per_member, with_loss_hparams)
    if with_loss_hparams:

        def member_loss_kw(trainable, frozen, buffers, x, y, loss_hparams):  # type: ignore[no-untyped-def]
            out = functional_call(skeleton, ({**trainable, **frozen}, buffers), (x.clone(),))
            return loss_fn(out, y, **loss_hparams)

        return vmap(
            grad_and_value(member_loss_kw), in_dims=(0, 0, 0, data_dim, data_dim, 0), randomness=randomness, chunk_size=member_chunk_size
        )
    return vmap(grad_and_value(member_loss), in_dims=(0, 0, 0, data_dim, data_dim), randomness=randomness, chunk_size=member_chunk_size)


def _mixed_grad_fn(
    population: Population,
    loss_fn: LossFn,
    data_dim: int | None,
    member_chunk_size: int | None,
    with_loss_hparams: bool,
    randomness: str,
    precision: str,
    loss_scaled: bool,
) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """:func:`make_grad_fn` under autocast (and with loss scales): kept apart so the fp32 path stays as it was."""
    skeleton = population.skeleton
    device_type = population.device.type
    float32_norms = norms_need_float32(device_type, precision)  # probed here, outside the transforms

    def member_loss(trainable, frozen, buffers, x, y, loss_hparams, scale):  # type: ignore[no-untyped-def]
        with autocast(device_type, precision, float32_norms):  # the forward and the loss; the backward runs outside
            out = functional_call(skeleton, ({**trainable, **frozen}, buffers), (x.clone(),))
            loss = loss_fn(out, y, **loss_hparams).float()
        return (loss if scale is None else loss * scale), loss

    vmapped = vmap(
        grad_and_value(member_loss, has_aux=True),
        in_dims=(0, 0, 0, data_dim, data_dim, 0, 0 if loss_scaled else None),
        randomness=randomness,
        chunk_size=member_chunk_size,
    )

    def grad_fn(trainable, frozen, buffers, x, y, *extra):  # type: ignore[no-untyped-def]
        rest = list(extra)
        loss_hparams = rest.pop(0) if with_loss_hparams else {}
        scale = rest.pop(0) if loss_scaled else None
        grads, (_, losses) = vmapped(trainable, frozen, buffers, x, y, loss_hparams, scale)
        return grads, losses

    return grad_fn


def preflight(
    population: Population,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    per_member: bool = False,
    loss_hparams: dict[str, Tensor] | None = None,
    randomness: str = "different",
    precision: str = "fp32",
) -> None:
    """Check that a training step can run under vmap, before any training; raise a clear error if not.

    Runs one forward/backward of at most two members on at most two samples of ``(x, y)`` under
    ``vmap`` (as :func:`make_grad_fn` does). Nothing is changed: parameters are only read, buffers
    (BatchNorm statistics) and the batch are copies, and the global RNG is restored. On failure raises
    one RuntimeError (:class:`popvec.diagnose.VmapError`) naming the innermost module that was running,
    the torch operation and a known fix (``randomness="same"`` for in-place random draws, no LSTM
    batching rule, ``enable_nested_tensor=False`` for TransformerEncoder padding masks). The cost is
    one tiny step; :class:`TrainStep` runs it once per batch shape.

    First member 0 runs alone, without vmap, on the same samples: what fails there is the data's
    fault, not vmap's, and raises :class:`popvec.checks.InvalidArgument` naming ``x`` (the forward)
    or ``y`` (the loss). With a classification loss every label of ``y`` (the whole batch) is
    checked to lie in ``[0, C)`` here: so labels are checked at the first step of each batch
    shape, not at every step (no host sync per step).
    ``precision``: the step's autocast (loss scaling changes nothing that could fail, so it is left out).
    """
    check_pair(x, y, per_member)
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
    grad_fn = make_grad_fn(probe, loss_fn, per_member, None, bool(hparams), randomness, precision)
    trainable = {k: probe.params[k] for k in probe.trainable}
    frozen = {k: v for k, v in probe.params.items() if k not in trainable}
    xs, ys = cut(x), cut(y)
    extra = (hparams,) if hparams else ()

    was_training = population.training
    devices = [x.device] if x.is_cuda else []
    try:
        population.train()
        outputs = probe.probe_member(x[0] if per_member else x, samples)
        check_labels(loss_fn, outputs.unsqueeze(0) if per_member else outputs, y)
        y0 = ys[0] if per_member else ys
        try:
            with torch.no_grad():
                loss_fn(outputs, y0, **{k: v[0] for k, v in hparams.items()})
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            raise checks.InvalidArgument(
                f"y of shape {tuple(y.shape)} and dtype {y.dtype} does not fit the loss (one member on one batch): "
                f"{type(error).__name__}: {' '.join(str(error).split())}"
            ) from error
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
    error naming the module and the fix.

    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): see :mod:`popvec.precision`; parameters and
    optimizer state stay float32. ``fp16`` scales each member's loss by its own dynamic scale
    (``loss_scaler``, a :class:`~popvec.precision.LossScaler`; a fresh one by default): a member
    whose gradients overflow skips only its own update (the optimizer's step mask: parameters,
    state and step count unchanged) and halves only its own scale; the others are untouched by it.
    Its update then runs the optimizer's per-member (unfused) rule for every step, so that whether
    one member skipped never changes how the others are computed; CUDA graphs are off (each step
    reads on the host whether any member overflowed, as ``torch.amp.GradScaler`` does).
    ``member_chunk_size``: an integer, None (the whole stack) or ``"auto"`` (the chunk size a short
    probe finds fastest on the CPU, cached per model, N and batch shape; the whole stack elsewhere
    and with fp16 loss scaling; see :mod:`popvec.chunking`).
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
        precision: str = "fp32",
        loss_scaler: LossScaler | None = None,
    ) -> None:
        checks.integer_or_auto("member_chunk_size", member_chunk_size)
        self.randomness = diagnose.check_randomness(randomness)
        self.precision = check_precision(precision)
        self.loss_scaler = _loss_scaler_for(self.precision, loss_scaler, population, optimizer, cuda_graph)
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
            fn = make_grad_fn(
                self.population,
                self.loss_fn,
                per_member,
                self._chunk,
                with_loss_hparams,
                self.randomness,
                self.precision,
                self.loss_scaler is not None,
            )
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
        check_placement(x, pop, "x")
        if y.device != pop.device:
            raise checks.InvalidArgument(f"y must be on the population's device {pop.device}, got {y.device}")
        loss_hparams = loss_hparams or {}
        shape_key = (per_member, tuple(x.shape), tuple(y.shape), tuple(sorted(loss_hparams)))
        if shape_key not in self._preflown:  # once per batch shape: a clear error instead of a vmap one
            preflight(pop, x, y, self.loss_fn, per_member, loss_hparams, self.randomness, self.precision)
            self._preflown.add(shape_key)
        self._resolve_chunk(x, y, per_member, loss_hparams, (*shape_key, pop.n, x.dtype))
        if mask is not None:
            return self._masked_step(x, y, per_member, as_mask(mask, pop.n, pop.device), loss_hparams)
        if self._graphs_enabled(x):
            return self._graph_step(x, y, per_member, loss_hparams)
        return self._eager_step(x, y, per_member, loss_hparams)

    def _eager_step(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor], mask: Tensor | None = None) -> Tensor:
        if self.loss_scaler is not None:
            return self._scaled_step(x, y, per_member, loss_hparams, mask)
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

    def _scaled_step(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor], mask: Tensor | None) -> Tensor:
        """An fp16 step with per-member loss scaling: members whose gradients overflow skip their update."""
        pop, scaler = self.population, self.loss_scaler
        assert scaler is not None
        trainable = {k: pop.params[k] for k in pop.trainable}
        frozen = {k: v for k, v in pop.params.items() if k not in trainable}
        pop.train()
        extra = (loss_hparams,) if loss_hparams else ()
        scaled, losses = self._grad_fn(per_member, bool(loss_hparams))(trainable, frozen, pop.buffers, x, y, *extra, scaler.scale)
        grads, finite = scaler.unscale(scaled)
        if self.track_grad_norm:  # a skipped step's gradients are no measurement: NaN, ignored by fmax
            norms = torch.where(finite, grad_norm([grads[k] for k in pop.trainable]), torch.nan)
            self.grad_norm_max = norms if self.grad_norm_max is None else torch.fmax(self.grad_norm_max, norms)
        update = finite if mask is None else mask & finite
        if mask is None and bool(finite.all()):  # one host read per step, as GradScaler.step
            self.last_grad_norm = self.optimizer.step(grads)
        else:
            self.last_grad_norm = self.optimizer.step(grads, mask=update)
        scaler.update(finite, mask)
        return losses.detach()

    def _resolve_chunk(self, x: Tensor, y: Tensor, per_member: bool, loss_hparams: dict[str, Tensor], key: tuple[Any, ...] = ()) -> None:
        """Set the chunk size of this step: as given, or for "auto" the probe's (cached) choice."""
        if self.member_chunk_size != chunking.AUTO:
            return
        if self.loss_scaler is not None:  # the probe times unscaled steps: fp16 with loss scaling runs the whole stack
            self._chunk = None
            return
        if key and key in self._chosen:  # this batch shape and N seen before: no signature to rebuild
            self._chunk = self._chosen[key]
            return

        def factory(chunk: int | None) -> Callable[..., Any]:
            return make_grad_fn(self.population, self.loss_fn, per_member, chunk, bool(loss_hparams), self.randomness, self.precision)

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
        if self.loss_scaler is not None:  # fp16 loss scaling reads overflows on the host every step
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


def _loss_scaler_for(
    precision: str, loss_scaler: LossScaler | None, population: Population, optimizer: Optimizer, cuda_graph: bool | None
) -> LossScaler | None:
    """The step's loss scaler: ``loss_scaler`` or a fresh one for fp16, None otherwise; refuses what cannot work."""
    if precision != "fp16":
        if loss_scaler is not None:
            raise ValueError(f"loss_scaler is used with precision='fp16' only, got precision={precision!r}")
        return None
    if cuda_graph:
        raise ValueError(
            "cuda_graph=True cannot be used with precision='fp16': per-member loss scaling reads on the host "
            "whether a member overflowed at each step; use bf16 with CUDA graphs, or cuda_graph=None"
        )
    scaler = loss_scaler if loss_scaler is not None else LossScaler(population.n, population.device)
    if scaler.n != population.n:
        raise ValueError(f"loss_scaler must have one scale per member ({population.n}), got {scaler.n}")
    problem = optimizer.mask_problem() if isinstance(optimizer, TorchOptimizer) else None
    if problem:
        raise ValueError(f"precision='fp16' skips an overflowing member's update with a step mask, but {problem}")
    if isinstance(optimizer, PopulationOptimizer):
        # A skipped member keeps its step count; the fused kernel needs one count shared by all, so after a
        # skip the others would switch kernels (same maths, other rounding). The per-member rule never does.
        optimizer.use_fused = False
    return scaler


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
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Per-member mean loss and accuracy over all of ``data``: ``{"loss": [N], "accuracy": [N]}``.

    ``data`` is an ``(x, y)`` pair of tensors (split into chunks of ``batch_size`` samples), a
    ``TensorSplit``, or any iterable of shared ``(x, y)`` batches such as a ``DataLoader``.
    ``member_chunk_size`` bounds how many members run at once. Runs in eval mode and restores the
    population's mode afterwards. ``loss_fn`` must return the mean over a batch. A member whose
    loss is not finite (NaN weights or outputs) gets accuracy NaN: an argmax over NaN outputs is no
    measurement. Inputs holding NaN or inf raise ValueError ("... x contains NaN ...").
    ``precision`` ``"bf16"``/``"fp16"``: the forward and the loss run under autocast (sums stay float64).
    """
    from popvec.loaders import iterate_batches

    device_type = population.device.type
    precision = check_precision(precision)
    was_training = population.training
    population.eval()
    try:
        metrics = accumulate_metrics(
            iterate_batches(data, batch_size),
            under_autocast(lambda x: population.forward(x, member_chunk_size=member_chunk_size), device_type, precision),
            under_autocast(vmap(loss_fn, in_dims=(0, None)), device_type, precision),
            population.device,
            check_labels=loss_fn in CLASSIFICATION_LOSSES,
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
    check_labels: bool = False,
) -> dict[str, Tensor]:
    """Per-member mean loss and accuracy over all ``batches``: ``{"loss": [N], "accuracy": [N]}`` in float64.

    Each ``(x, y)`` batch goes to ``device``; ``outputs_fn(x)`` gives the members' outputs
    ``[N, B, ...]`` and ``losses_fn(outputs, y)`` their mean losses over the batch ``[N]``. Sums
    are kept in float64, each batch weighted by its size B (so uneven batches count per sample);
    correct argmax predictions are counted when outputs are ``[N, B, C]`` and labels integers
    (accuracy 0 otherwise). Inputs ``x``
    holding NaN or inf raise ValueError (checked per batch, reported once at the end). The one
    evaluation loop behind :func:`evaluate`, the LMC shortcut and
    the ensembles; raises ValueError when ``batches`` hold no sample. ``check_labels``: class-index
    labels must be integers in ``[0, C)`` and each batch's ``y`` must match its ``x`` in length
    (one reduction and one host sync per batch: evaluation is not the training hot path).
    """
    sums: tuple[Tensor, Tensor] | None = None  # per member: loss x batch size, correct predictions
    count = 0
    bad_x: Tensor | None = None  # whether any batch's x held NaN/inf: one reduction per batch, one sync at the end
    for batch in batches:
        x, y = (t.to(device, non_blocking=True) for t in checks.xy_batch("data", batch))
        if x.is_floating_point():
            bad = ~torch.isfinite(x).all()
            bad_x = bad if bad_x is None else bad_x | bad
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise checks.InvalidArgument(f"y must have one entry per sample of x ({x.shape[0]}), got shape {tuple(y.shape)}")
        outputs = outputs_fn(x)
        if check_labels and y.dim() == outputs.dim() - 2:
            checks.labels("y", y, int(outputs.shape[-1]))
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
