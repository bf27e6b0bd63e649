"""Linear mode connectivity: loss and error along the straight line between two networks.

The K networks ``w(alpha) = (1 - alpha) * w_a + alpha * w_b`` of a path *are* a population of K
members: :func:`interpolate_stacks` builds their ``[K, ...]`` stacks in one broadcast op and
:func:`popvec.engine.evaluate` runs them all in one vmapped pass. :func:`barrier_matrix` does the
same for every pair of a population's members (pairs x alphas, in chunks of pairs), and
:func:`instability` runs the spawning analysis of Frankle et al. (2020): one trunk, copies spawned
at several steps k1 with the trunk's weights and optimizer state, every branch trained in one stack.

>>> res = popvec.studies.lmc.interpolate(model_a, model_b, data=(x, y), alphas=25)
>>> res.loss_barrier, res.error_barrier, res.l2
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from popvec import optim
from popvec.checkpoint import save_checkpoint
from popvec.data import TensorSplit
from popvec.loaders import DeviceLoader, iterate_batches
from popvec.engine import LossFn, TrainStep, accumulate_metrics, evaluate
from popvec.plots import new_figure, save_figure
from popvec.population import Population, architecture_mismatch, as_index

__all__ = [
    "BarrierMatrix",
    "InstabilityResult",
    "InterpolationResult",
    "as_alphas",
    "barrier",
    "barrier_matrix",
    "instability",
    "interpolate",
    "interpolate_stacks",
    "interpolation_gap",
    "l2_distance",
    "recompute_batchnorm",
]

BNMode = Literal["auto", "recompute", "keep"]
Endpoint = nn.Module | tuple[Population, int]
StepCallback = Callable[[str, int, int, Tensor], None]
BN_MODES: tuple[str, ...] = ("auto", "recompute", "keep")


# --------------------------------------------------------------------------- pure tensor core
def interpolate_stacks(stacks_a: dict[str, Tensor], stacks_b: dict[str, Tensor], alphas: Tensor) -> dict[str, Tensor]:
    """Members ``(1 - alpha) * a + alpha * b`` of P paths: stacks ``[P, ...]``, alphas ``[K]`` -> ``[P * K, ...]``.

    Member ``p * K + k`` is path ``p`` at ``alphas[k]``, built for all of them in one broadcast
    ``torch.lerp`` (exact at alpha 0 and 1, and exactly ``a`` wherever ``a == b``). Non-floating
    tensors (BatchNorm's ``num_batches_tracked``) are not interpolated: every member takes ``a``'s.
    """
    k = alphas.numel()
    out = {}
    for name, a in stacks_a.items():
        a1, b1 = a.unsqueeze(1), stacks_b[name].unsqueeze(1)  # [P, 1, ...]
        if a.is_floating_point():
            path = torch.lerp(a1, b1, alphas.to(a).view(1, k, *[1] * (a.dim() - 1)))
        else:
            path = a1.expand(-1, k, *a.shape[1:])
        out[name] = path.reshape(a.shape[0] * k, *a.shape[1:])
    return out


def interpolation_gap(curve: Tensor, alphas: Tensor) -> Tensor:
    """``curve - [(1 - alpha) * curve(0) + alpha * curve(1)]``: curves ``[..., K]`` on alphas ``[K]`` from 0 to 1.

    Exactly 0 at both ends; its maximum over the interior alphas is the :func:`barrier`.
    """
    return curve - torch.lerp(curve[..., :1], curve[..., -1:], alphas.to(curve))


def barrier(gap: Tensor) -> Tensor:
    """The barrier of gap curves ``[..., K]`` on alphas from 0 to 1: their maximum over the interior alphas.

    The gap is 0 at both ends by definition, so they are left out: the barrier is negative where
    the whole path lies below the straight line between the ends (convex), and 0 with no interior alpha.
    """
    interior = gap[..., 1:-1]
    return interior.amax(dim=-1) if interior.shape[-1] else torch.zeros(gap.shape[:-1], dtype=gap.dtype)


def l2_distance(stacks_a: dict[str, Tensor], stacks_b: dict[str, Tensor]) -> Tensor:
    """``||a_p - b_p||`` over all given tensors for each of P pairs: stacks ``[P, ...]`` -> ``[P]`` float64."""
    squares = [(a.double() - stacks_b[name].double()).pow(2).flatten(1).sum(1) for name, a in stacks_a.items()]
    return torch.stack(squares).sum(0).sqrt()


def as_alphas(alphas: int | Sequence[float] | Tensor) -> Tensor:
    """``alphas`` as a strictly increasing 1-D float32 CPU tensor in [0, 1].

    An int K gives K equally spaced values including both ends (``torch.linspace(0, 1, K)``).
    """
    if isinstance(alphas, bool):
        raise TypeError(f"alphas must be an int >= 2 or a 1-D sequence of values in [0, 1], got {alphas!r}")
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError(f"alphas must be >= 2 when an int (both ends are included), got {alphas}")
        return torch.linspace(0.0, 1.0, alphas)
    values = torch.as_tensor(alphas, dtype=torch.float32).detach().cpu()
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"alphas must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or float(values.min()) < 0.0 or float(values.max()) > 1.0:
        raise ValueError(f"alphas must lie in [0, 1], got {values.tolist()}")
    if not bool((values.diff() > 0).all()):
        raise ValueError(f"alphas must be strictly increasing (monotone, no repeats), got {values.tolist()}")
    return values


def _grid(alphas: Tensor) -> tuple[Tensor, Tensor]:
    """The evaluated alphas (``alphas`` plus both ends, sorted) and where each requested alpha sits in them."""
    full = torch.cat([alphas, torch.tensor([0.0, 1.0])]).unique()
    return full, torch.searchsorted(full, alphas)


# --------------------------------------------------------------------------- BatchNorm
def _running_norms(module: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recompute_batchnorm(
    population: Population, data: Any, batch_size: int = 1024, member_chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Every member's buffers with its BatchNorm running statistics recomputed over ``data``: ``[N, ...]``.

    Each layer's running mean and variance become the average over the batches of ``data`` of its
    batch statistics (the network in eval mode except BatchNorm, so dropout is off) and
    ``num_batches_tracked`` the number of batches. That is exactly PyTorch's cumulative averaging
    (``reset_running_stats()`` then ``momentum=None``): independent of the batch order, unlike the
    default momentum. All members run in one vmapped forward per batch (BatchNorm momentum 1 makes
    each batch's statistics land in the buffers; they are summed outside).
    """
    skeleton = copy.deepcopy(population.skeleton).eval()
    norms = _running_norms(skeleton)
    for m in norms.values():
        m.train()
        m.momentum = 1.0
    buffers = dict(population.buffers)
    for name in norms:
        buffers[f"{name}.num_batches_tracked"] = torch.zeros_like(buffers[f"{name}.num_batches_tracked"])
    stats = [f"{name}.{kind}" for name in norms for kind in ("running_mean", "running_var")]
    probe = Population(skeleton, population.params, {**buffers, **{k: torch.zeros_like(buffers[k]) for k in stats}})
    totals = {k: torch.zeros_like(buffers[k]) for k in stats}
    count = 0
    for x, _ in iterate_batches(data, batch_size):
        probe.forward(x.to(population.device), chunk_size=member_chunk_size)
        for k, total in totals.items():
            total += probe.buffers[k]
        count += 1
    if count == 0:
        raise ValueError("bn_data must hold at least one batch")
    return {**probe.buffers, **{k: v / count for k, v in totals.items()}}


# --------------------------------------------------------------------------- evaluating paths
@dataclass(frozen=True)
class _Evaluation:
    """How every network on a path is evaluated."""

    data: Any
    loss_fn: LossFn
    recompute: bool
    bn_data: Any
    batch_size: int
    member_chunk_size: int | None


def _evaluation(skeleton: nn.Module, data: Any, loss_fn: LossFn, bn: str, bn_data: Any, batch_size: int, member_chunk_size: int | None) -> _Evaluation:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    recompute = bn != "keep" and bool(_running_norms(skeleton))
    if recompute and bn_data is None:
        raise ValueError(
            "bn_data (training batches) is required to recompute BatchNorm running statistics "
            "(bn='recompute', the default for BatchNorm models); pass bn_data=... or bn='keep'"
        )
    return _Evaluation(data, loss_fn, recompute, bn_data, batch_size, member_chunk_size)


def _paths(a: Population, b: Population, alphas: Tensor, spec: _Evaluation, shortcut: bool = True) -> tuple[Tensor, Tensor, bool]:
    """Loss and error ``[P, K]`` (CPU) along the P paths ``a[p] -> b[p]`` at ``alphas`` ``[K]``: one population of P * K.

    A single path (P = 1) is evaluated through the first-layer shortcut where it applies (see
    :func:`_first_affine`; ``shortcut=False`` never): the third value says whether it was.
    """
    grid = alphas.to(a.device)
    path = Population(a.skeleton, interpolate_stacks(a.params, b.params, grid), interpolate_stacks(a.buffers, b.buffers, grid))
    if spec.recompute:
        path.buffers = recompute_batchnorm(path, spec.bn_data, spec.batch_size, spec.member_chunk_size)
    metrics, data = None, spec.data
    if shortcut and a.n == 1:
        metrics, data = _evaluate_fast(path, a, b, grid, spec)
    used = metrics is not None
    if metrics is None:
        metrics = evaluate(path, data, spec.loss_fn, spec.batch_size, spec.member_chunk_size)
    shape = (a.n, alphas.numel())
    return metrics["loss"].cpu().view(shape), (1.0 - metrics["accuracy"]).cpu().view(shape), used


def _pair_barriers(population: Population, first: Tensor, second: Tensor, alphas: Tensor, spec: _Evaluation, pair_chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Loss barrier, error barrier and L2 distance ``[P]`` between members ``first[p]`` and ``second[p]``.

    Pairs are evaluated ``pair_chunk_size`` at a time, each chunk one population of pairs x alphas.
    """
    if not isinstance(pair_chunk_size, int) or isinstance(pair_chunk_size, bool) or pair_chunk_size < 1:
        raise ValueError(f"pair_chunk_size must be an integer >= 1, got {pair_chunk_size!r}")
    full = _grid(alphas)[0]
    rows = []
    for i, j in zip(first.split(pair_chunk_size), second.split(pair_chunk_size)):
        a, b = population.take(i), population.take(j)
        loss, error, _ = _paths(a, b, full, spec)
        barriers = [barrier(interpolation_gap(curve, full)) for curve in (loss, error)]
        rows.append(torch.stack([*barriers, l2_distance(a.params, b.params).float().cpu()], dim=1))
    loss_barrier, error_barrier, l2 = torch.cat(rows).unbind(1)
    return loss_barrier, error_barrier, l2


# --------------------------------------------------------------------------- first-layer fast path
# A path w(alpha) is linear in alpha up to its first nonlinearity: when the network's first
# computation is an affine layer (Linear/Conv) applied to the raw input (or a flatten/reshape view
# of it), its output for every alpha is ``lerp(f1(x; w_a), f1(x; w_b), alpha)``. Two evaluations
# of that layer per batch replace K; the rest of the network runs vmapped over the K alphas.
_AFFINE_FIRST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Unsupported(Exception):
    """The fast path does not apply; the caller falls back to the general path."""


class _Captured(Exception):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


class _Interpolated(nn.Module):
    """Stands in for the first layer: returns ``(1 - alpha) * y_a + alpha * y_b`` from the ends and
    the alpha set on it before each call (not ``torch.lerp``, which vmap runs one member at a time).

    With ``capture`` set it instead stops the forward, handing back the input it was given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.capture = False
        self.inp: Tensor | None = None
        self.ends: tuple[Tensor, Tensor] | None = None
        self.alpha: Tensor | None = None

    def forward(self, inp: Tensor) -> Tensor:
        if self.capture:
            raise _Captured(inp)
        expected = self.inp
        # The input must not depend on the vmapped members (no parameter or buffer before the
        # first layer) and must be the very tensor the ends were computed from.
        if (
            expected is None
            or torch._C._functorch.is_batchedtensor(inp)
            or inp.shape != expected.shape
            or inp.data_ptr() != expected.data_ptr()
            or inp.stride() != expected.stride()
        ):
            raise _Unsupported("the first layer's input changed between the capture and the vmapped pass")
        y_a, y_b = self.ends
        alpha = self.alpha  # a vmapped scalar; (1 - alpha) * a + alpha * b is exact at both ends
        return torch.addcmul(y_a * (1 - alpha), y_b, alpha)


def _first_affine(skeleton: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> str | None:
    """The name of the model's first layer when the fast path applies to it, else None.

    One eval-mode forward of member 0 on ``x`` (a couple of samples) with hooks on every leaf
    module: the first leaf called must be exactly a Linear/Conv1d/2d/3d without hooks of its own,
    called once, its parameters used by no other module, and its input the model input itself or a
    reshape/flatten view of it (same storage, same number of elements, contiguous).
    """
    model = copy.deepcopy(skeleton).eval()
    leaves = {name: m for name, m in model.named_modules() if not list(m.children())}
    calls: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0] if args else None)))
        for name, m in leaves.items()
    ]
    member = {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()}
    try:
        with torch.no_grad():
            functional_call(model, member, (x,))
    except Exception:  # noqa: BLE001 - any failure on the probe batch (e.g. a fixed batch size): the general path
        return None
    finally:
        for h in handles:
            h.remove()
    if not calls:
        return None
    name, inp = calls[0]
    first = leaves[name]
    if type(first) not in _AFFINE_FIRST or sum(1 for n, _ in calls if n == name) != 1:
        return None
    original = dict(skeleton.named_modules())[name]
    if original._forward_hooks or original._forward_pre_hooks or getattr(original, "_backward_hooks", None):
        return None
    own = {f"{name}.{k}" for k, _ in first.named_parameters()}
    if not own or not own <= set(params) or any(k.startswith(f"{name}.") for k in buffers):
        return None
    if any(p is q for n, p in skeleton.named_parameters(remove_duplicate=False) if not n.startswith(f"{name}.")
           for q in original.parameters()):
        return None  # tied weights
    if not isinstance(inp, Tensor) or not (
        inp is x or (inp.data_ptr() == x.data_ptr() and inp.numel() == x.numel() and inp.is_contiguous() and x.is_contiguous())
    ):
        return None
    return name


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def _evaluate_fast(
    path: Population, a: Population, b: Population, alphas: Tensor, spec: _Evaluation
) -> tuple[dict[str, Tensor] | None, Any]:
    """:func:`popvec.engine.evaluate` of the single path ``path`` (members at ``alphas``) through the
    first-layer shortcut: ``(metrics, None)``, or ``(None, data)`` when it does not apply, ``data``
    being what is left of ``spec.data`` to evaluate the general way (nothing of it is lost)."""
    batches = iter(iterate_batches(spec.data, spec.batch_size))
    first = next(batches, None)
    if first is None:
        return None, batches  # no data: the general path reports it
    x, y = (t.to(path.device, non_blocking=True) for t in first)
    forward = _path_forward(path, a, b, alphas, x, spec.batch_size, spec.member_chunk_size)
    if forward is None:
        return None, itertools.chain([(x, y)], batches)
    started = False

    def outputs(inputs: Tensor) -> Tensor:
        nonlocal started
        out = forward(inputs)
        started = True
        return out

    try:
        metrics = accumulate_metrics(itertools.chain([(x, y)], batches), outputs, vmap(spec.loss_fn, in_dims=(0, None)), path.device)
    except _Unsupported:
        if started:
            raise
        return None, itertools.chain([(x, y)], batches)
    return {name: value.float() for name, value in metrics.items()}, None


def _path_forward(
    path: Population, a: Population, b: Population, alphas: Tensor, x: Tensor, batch_size: int, member_chunk_size: int | None
) -> Callable[[Tensor], Tensor] | None:
    """The path's outputs ``[K, B, ...]`` for a batch ``[B, ...]`` through the shortcut, or None when it
    does not apply to the model (probed on the batch ``x``)."""
    skeleton = path.skeleton
    name = _first_affine(skeleton, a.params, a.buffers, x[:2])
    if name is None:
        return None
    original = copy.deepcopy(dict(skeleton.named_modules())[name])
    model = copy.deepcopy(skeleton).eval()
    interp = _Interpolated()
    _set_submodule(model, name, interp)
    prefix = f"{name}."
    rest = {k: v for k, v in path.params.items() if not k.startswith(prefix)}
    ends = [{k[len(prefix):]: v[0] for k, v in end.params.items() if k.startswith(prefix)} for end in (a, b)]
    rest_a = {k: v[0] for k, v in a.params.items() if not k.startswith(prefix)}
    bufs_a = {k: v[0] for k, v in a.buffers.items()}

    def member(params: dict[str, Tensor], buffers: dict[str, Tensor], alpha: Tensor, inputs: Tensor) -> Tensor:
        interp.alpha = alpha
        return functional_call(model, (params, buffers), (inputs,))

    chunk, samples = member_chunk_size, None
    if chunk is None and path.device.type == "cpu":
        try:
            width = functional_call(original, ends[0], (_capture(model, interp, rest_a, bufs_a, x[:1]),)).numel()
        except _Unsupported:
            return None
        chunk, samples = _cpu_chunks(width, alphas.numel(), batch_size)
    fn = vmap(member, in_dims=(0, 0, 0, None), randomness="different", chunk_size=chunk)

    def forward(inputs: Tensor) -> Tensor:
        parts = inputs.split(samples) if samples else (inputs,)
        outputs = [_shortcut_forward(fn, model, interp, original, ends, rest_a, bufs_a, rest, path.buffers, alphas, p) for p in parts]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    return forward


# On a CPU the shortcut runs fastest when one vmapped pass's first-layer activations (members x
# samples x the layer's output per sample) stay near this many floats (~4 MB, cache-sized):
# measured on 2 cores for LeNet-5 (a few hundred samples, one member at a time) and the
# 784-256-256-10 MLP (1000 samples, 4 members at a time).
_CPU_WORKING_SET = 1 << 20


def _cpu_chunks(width: int, k: int, batch_size: int) -> tuple[int, int]:
    """Members and samples per vmapped pass on a CPU, for a first layer of ``width`` outputs per sample."""
    samples = max(1, min(batch_size, _CPU_WORKING_SET // max(width, 1)))
    return max(1, min(k, _CPU_WORKING_SET // (samples * max(width, 1)))), samples


def _capture(model: nn.Module, interp: _Interpolated, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
    """The input the first layer gets for batch ``x`` (the forward stopped there)."""
    interp.capture = True
    try:
        functional_call(model, (params, buffers), (x,))
        raise _Unsupported("the first layer was not reached")
    except _Captured as stop:
        return stop.value
    finally:
        interp.capture = False


def _shortcut_forward(
    fn: Callable[..., Tensor], model: nn.Module, interp: _Interpolated, original: nn.Module,
    ends: list[dict[str, Tensor]], rest_a: dict[str, Tensor], bufs_a: dict[str, Tensor],
    rest: dict[str, Tensor], buffers: dict[str, Tensor], alphas: Tensor, x: Tensor,
) -> Tensor:
    """Outputs ``[K, B, ...]`` of the path on batch ``x``: the first layer's input captured (the
    forward stopped there), its two end outputs, then the rest vmapped over the alphas."""
    inp = _capture(model, interp, rest_a, bufs_a, x)
    y_a, y_b = (functional_call(original, end, (inp,)) for end in ends)
    interp.inp, interp.ends = inp, (y_a, y_b)
    try:
        return fn(rest, buffers, alphas.to(y_a), x)
    finally:
        interp.inp = interp.ends = interp.alpha = None


# --------------------------------------------------------------------------- interpolate
@dataclass(frozen=True)
class InterpolationResult:
    """One path ``w(alpha) = (1 - alpha) * w_a + alpha * w_b`` evaluated at K alphas.

    ``alphas``, ``loss``, ``error`` (1 - accuracy), ``loss_gap`` and ``error_gap`` are ``[K]`` CPU
    tensors. A gap is ``curve - [(1 - alpha) * curve(0) + alpha * curve(1)]``; a barrier is the
    maximum gap over the interior alphas (negative where the path is convex; see :func:`barrier`).
    ``l2 = ||w_a - w_b||`` over
    parameters (not buffers). ``bn`` is how BatchNorm statistics were treated (recompute or keep).
    ``shortcut`` says whether the first layer ran twice (its outputs at both ends, interpolated)
    instead of once per alpha; it is not part of :meth:`to_dict`.
    """

    alphas: Tensor
    loss: Tensor
    error: Tensor
    loss_gap: Tensor
    error_gap: Tensor
    loss_barrier: float
    error_barrier: float
    l2: float
    bn: str
    shortcut: bool = field(default=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for the curves, floats for the scalars."""
        curves = {k: getattr(self, k).tolist() for k in ("alphas", "loss", "error", "loss_gap", "error_gap")}
        return {**curves, "loss_barrier": self.loss_barrier, "error_barrier": self.error_barrier, "l2": self.l2, "bn": self.bn}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of loss and error vs alpha (needs matplotlib: ``pip install popvec[plot]``)."""
        figure = new_figure(9.0, 3.5)
        panels = [("loss", self.loss, self.loss_barrier, ""), ("error (%)", 100 * self.error, 100 * self.error_barrier, "%")]
        for ax, (label, curve, height, unit) in zip(figure.subplots(1, 2), panels):
            ax.plot(self.alphas.tolist(), curve.tolist(), marker="o", markersize=3)
            ax.set(xlabel="alpha", ylabel=label, title=f"{label.split()[0]} barrier {height:.4g}{unit}")
            ax.grid(alpha=0.3)
        return save_figure(figure, path)


def _as_member(endpoint: Endpoint, name: str) -> Population:
    """``endpoint`` as a population of one member (a population's member is sliced, not copied)."""
    if isinstance(endpoint, nn.Module):
        return Population.from_modules([endpoint])
    if isinstance(endpoint, tuple) and len(endpoint) == 2 and isinstance(endpoint[0], Population):
        population, index = endpoint
        (i,) = as_index([index], population.n).tolist()
        return Population(
            population.skeleton,
            {k: v[i : i + 1] for k, v in population.params.items()},
            {k: v[i : i + 1] for k, v in population.buffers.items()},
            trainable=population.trainable,
        )
    raise TypeError(f"{name} must be an nn.Module or a (Population, index) pair, got {type(endpoint).__name__}")


def interpolate(
    a: Endpoint,
    b: Endpoint,
    data: Any,
    alphas: int | Sequence[float] | Tensor = 25,
    loss_fn: LossFn = F.cross_entropy,
    bn: BNMode = "auto",
    bn_data: Any = None,
    batch_size: int = 1024,
    member_chunk_size: int | None = None,
) -> InterpolationResult:
    """Loss and error along ``w(alpha) = (1 - alpha) * w_a + alpha * w_b``, all alphas in one vmapped pass.

    ``a``/``b``: ``nn.Module``s or ``(population, index)`` members of one architecture. ``data``:
    ``(x, y)``, a ``TensorSplit`` or an iterable of ``(x, y)`` batches (any split). ``alphas``: an
    int K (equally spaced, both ends) or a strictly increasing 1-D sequence in [0, 1]; the ends are
    evaluated too when missing (the gap needs them). ``bn``: ``"recompute"`` (the default, via
    ``"auto"``, when the model has BatchNorm running statistics) recomputes every alpha's
    statistics over ``bn_data`` (training batches; see :func:`recompute_batchnorm`);
    ``"keep"`` evaluates with interpolated statistics. ``member_chunk_size`` bounds how many of
    the K networks run at once.
    """
    pa, pb = _as_member(a, "a"), _as_member(b, "b")
    problem = architecture_mismatch(pa.skeleton, pb.skeleton)
    if problem:
        raise ValueError(f"b must have the same architecture as a: {problem}")
    if pa.device != pb.device:
        raise ValueError(f"b must be on the same device as a: {pb.device} vs {pa.device}")
    requested = as_alphas(alphas)
    spec = _evaluation(pa.skeleton, data, loss_fn, bn, bn_data, batch_size, member_chunk_size)
    full, keep = _grid(requested)
    loss, error, shortcut = _paths(pa, pb, full, spec)
    loss, error = loss[0], error[0]
    loss_gap, error_gap = (interpolation_gap(curve, full) for curve in (loss, error))
    return InterpolationResult(
        alphas=requested,
        loss=loss[keep],
        error=error[keep],
        loss_gap=loss_gap[keep],
        error_gap=error_gap[keep],
        loss_barrier=float(barrier(loss_gap)),
        error_barrier=float(barrier(error_gap)),
        l2=float(l2_distance(pa.params, pb.params)[0]),
        bn="recompute" if spec.recompute else "keep",
        shortcut=shortcut,
    )


# --------------------------------------------------------------------------- barrier matrix
@dataclass(frozen=True)
class BarrierMatrix:
    """Barriers between every pair of a population's members: ``[N, N]`` symmetric, zero diagonal (CPU).

    ``loss``/``error``: loss and error barriers; ``l2``: parameter distances; ``ids``: member ids.
    """

    ids: Tensor
    alphas: Tensor
    loss: Tensor
    error: Tensor
    l2: Tensor
    bn: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("ids", "alphas", "loss", "error", "l2")} | {"bn": self.bn}


def _symmetric(n: int, first: Tensor, second: Tensor, values: Tensor) -> Tensor:
    matrix = torch.zeros(n, n, dtype=values.dtype)
    matrix[first, second] = values
    matrix[second, first] = values
    return matrix


def barrier_matrix(
    population: Population,
    data: Any,
    alphas: int | Sequence[float] | Tensor = 25,
    loss_fn: LossFn = F.cross_entropy,
    bn: BNMode = "auto",
    bn_data: Any = None,
    batch_size: int = 1024,
    pair_chunk_size: int = 8,
    member_chunk_size: int | None = None,
) -> BarrierMatrix:
    """Loss/error barriers between all N(N-1)/2 pairs of members, as ``[N, N]`` matrices.

    Each chunk of ``pair_chunk_size`` pairs is one population of pairs x alphas evaluated in one
    vmapped pass (so memory is bounded by ``pair_chunk_size * K`` networks). Arguments as in
    :func:`interpolate`; entry ``(i, j)`` equals ``interpolate((population, i), (population, j), ...)``'s barriers.
    """
    if population.n < 2:
        raise ValueError(f"population must have at least 2 members, got {population.n}")
    requested = as_alphas(alphas)
    spec = _evaluation(population.skeleton, data, loss_fn, bn, bn_data, batch_size, member_chunk_size)
    first, second = torch.triu_indices(population.n, population.n, offset=1)
    barriers = _pair_barriers(population, first, second, requested, spec, pair_chunk_size)
    loss, error, l2 = (_symmetric(population.n, first, second, v) for v in barriers)
    return BarrierMatrix(population.ids.clone(), requested, loss, error, l2, "recompute" if spec.recompute else "keep")


# --------------------------------------------------------------------------- instability
@dataclass(frozen=True)
class InstabilityResult:
    """Per k1 (``[G]`` CPU tensors): barriers and L2 distance between copies spawned at step k1 and
    trained k2 more steps (means over the pairs of copies), and ``error``, the copies' mean error.

    ``branches`` is the trained population of ``G * copies`` members (copy c of ``k1[g]`` is member
    ``g * copies + c``), for further analysis; it is not part of :meth:`to_dict`.
    """

    k1: list[int]
    k2: int
    copies: int
    loss_barrier: Tensor
    error_barrier: Tensor
    l2: Tensor
    error: Tensor
    branches: Population = field(repr=False, compare=False)

    def rows(self) -> list[dict[str, float | int]]:
        """One flat dict per k1: k1, loss_barrier, error_barrier, l2, error."""
        columns = ("loss_barrier", "error_barrier", "l2", "error")
        return [{"k1": k, **{c: float(getattr(self, c)[g]) for c in columns}} for g, k in enumerate(self.k1)]

    def to_dict(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "copies": self.copies, "rows": self.rows()}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the loss and error barriers vs k1 (needs matplotlib: ``pip install popvec[plot]``)."""
        figure = new_figure(9.0, 3.5)
        for ax, values, label in zip(figure.subplots(1, 2), (self.loss_barrier, 100 * self.error_barrier), ("loss barrier", "error barrier (%)")):
            ax.plot(self.k1, values.tolist(), marker="o")
            ax.set_xscale("symlog", linthresh=max(1, min([k for k in self.k1 if k > 0], default=1)))
            ax.axhline(0.0, color="gray", linewidth=0.8)
            ax.set(xlabel="k1 (spawn step)", ylabel=label, title=f"{label.split(' (')[0]} after k2 = {self.k2} steps")
            ax.grid(alpha=0.3)
        return save_figure(figure, path)


def _check_k1(k1_values: Sequence[int]) -> list[int]:
    values = list(k1_values)
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in values):
        raise ValueError(f"k1_values must be a non-empty sequence of integers >= 0, got {k1_values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"k1_values must not repeat, got {values}")
    return sorted(values)


def _check_count(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _stack_states(states: list[Any]) -> Any:
    """Concatenate same-shaped state trees along dim 0 (tensors); other leaves are taken from the first."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states)
    if isinstance(first, dict):
        return {k: _stack_states([s[k] for s in states]) for k in first}
    return first


def _run_steps(step: TrainStep, loader: DeviceLoader, count: int, report: Callable[[Tensor], None]) -> None:
    per_member = loader.num_members is not None
    for _ in range(count):
        x, y = loader.next_batch()
        report(step(x, y, per_member=per_member))


def _reporter(on_step: StepCallback | None, phase: str, total: int) -> Callable[[Tensor], None]:
    done = 0

    def report(losses: Tensor) -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(phase, done, total, losses)

    return report


def _train_trunk(
    step: TrainStep, loader: DeviceLoader, k1: list[int], run_dir: Path | None, on_step: StepCallback | None
) -> list[dict[str, Any]]:
    """Train the trunk to ``max(k1)``; the population and optimizer state at every k1 (saved to ``run_dir``)."""
    report = _reporter(on_step, "trunk", k1[-1])
    snapshots, done = [], 0
    for k in k1:
        _run_steps(step, loader, k - done, report)
        done = k
        snapshot = copy.deepcopy({"population": step.population.state_dict(), "optimizer": step.optimizer.state_dict()})
        snapshots.append(snapshot)
        if run_dir is not None:
            save_checkpoint(run_dir / f"trunk_k1_{k}.pt", {"k1": k, **snapshot})
    return snapshots


def instability(
    model_fn: Callable[[], nn.Module],
    optimizer_fn: Callable[[Population], optim.PopulationOptimizer],
    data: TensorSplit | tuple[Tensor, Tensor],
    k1_values: Sequence[int],
    k2: int,
    copies: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    run_dir: str | Path | None = None,
    eval_data: Any = None,
    alphas: int | Sequence[float] | Tensor = 25,
    loss_fn: LossFn = F.cross_entropy,
    bn: BNMode = "auto",
    copy_seeds: Sequence[int] | None = None,
    pair_chunk_size: int = 8,
    on_step: StepCallback | None = None,
) -> InstabilityResult:
    """Instability analysis (Frankle et al. 2020): how the barrier between spawned copies depends on k1.

    One trunk (``torch.manual_seed(seed); model_fn()``, optimizer ``optimizer_fn(population)``, a
    popvec optimizer) trains on ``data`` (the training split) to ``max(k1_values)`` steps, its
    weights and optimizer state kept at every k1 (and saved as ``run_dir/trunk_k1_<k1>.pt``). Then
    ``copies`` copies of every snapshot, ``len(k1_values) * copies`` members in one stack, train
    ``k2`` steps together; copy c draws its batches in the order of seed ``copy_seeds[c]`` (default
    ``seed + 1 + c``) and its own dropout masks. Barriers between the copies of each k1 are
    measured on ``eval_data`` (default: ``data``); see :func:`interpolate` for ``alphas``/``bn``
    (BatchNorm statistics are recomputed over ``data``). ``on_step(phase, done, total, losses)``
    is called after each step of phase ``"trunk"`` and ``"branches"``.
    """
    k1 = _check_k1(k1_values)
    _check_count("k2", k2, 0)
    _check_count("copies", copies, 2)
    seeds = [seed + 1 + c for c in range(copies)] if copy_seeds is None else list(copy_seeds)
    if len(seeds) != copies:
        raise ValueError(f"copy_seeds must have one seed per copy ({copies}), got {len(seeds)}")
    train = data if isinstance(data, TensorSplit) else TensorSplit(*data)
    device = torch.device(device) if device is not None else train.x.device
    train = train.to(device)
    folder = Path(run_dir) if run_dir is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        population = Population.from_factory(model_fn, 1, seed, device)
        optimizer = optimizer_fn(population)
        if not isinstance(optimizer, optim.PopulationOptimizer) or optimizer.population is not population:
            raise TypeError("optimizer_fn must return a popvec optimizer (e.g. popvec.optim.SGD) built on the population it is given")
        spec = _evaluation(population.skeleton, train if eval_data is None else eval_data, loss_fn, bn, train, 1024, None)
        step = TrainStep(population, optimizer, loss_fn)
        snapshots = _train_trunk(step, DeviceLoader(train, batch_size, seed=seed), k1, folder, on_step)
        spawn = torch.arange(len(k1)).repeat_interleave(copies)
        population.load_state_dict(_stack_states([s["population"] for s in snapshots])).select(spawn)
        optimizer.load_state_dict(_stack_states([s["optimizer"] for s in snapshots])).select(spawn)
        loader = DeviceLoader(train, batch_size, num_members=population.n, seed=seeds[0])
        loader.reseed(list(range(population.n)), seeds * len(k1))
        _run_steps(step, loader, k2, _reporter(on_step, "branches", k2))
    return _instability_result(population, k1, k2, copies, as_alphas(alphas), spec, pair_chunk_size)


def _instability_result(
    population: Population, k1: list[int], k2: int, copies: int, alphas: Tensor, spec: _Evaluation, pair_chunk_size: int
) -> InstabilityResult:
    """Barriers between the copies of each k1 group (members ``g * copies + c``), averaged per group."""
    groups = len(k1)
    c_first, c_second = torch.triu_indices(copies, copies, offset=1)
    base = (torch.arange(groups) * copies).repeat_interleave(c_first.numel())
    first, second = base + c_first.repeat(groups), base + c_second.repeat(groups)
    loss_barrier, error_barrier, l2 = (
        v.view(groups, -1).mean(1) for v in _pair_barriers(population, first, second, alphas, spec, pair_chunk_size)
    )
    error = 1.0 - evaluate(population, spec.data, spec.loss_fn, spec.batch_size)["accuracy"].cpu()
    return InstabilityResult(k1, k2, copies, loss_barrier, error_barrier, l2, error.view(groups, copies).mean(1), population)
