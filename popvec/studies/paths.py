"""Interpolation paths between networks, and their evaluation as one population.

The K networks ``w(alpha) = (1 - alpha) * w_a + alpha * w_b`` on a path *are* a population of K
members: :func:`interpolate_stacks` builds their ``[K, ...]`` stacks (P paths at once:
``[P * K, ...]``) in one broadcast op, :func:`evaluate_paths` runs them all in one vmapped pass
(BatchNorm statistics recomputed per alpha when asked, :func:`recompute_batchnorm`), and
:func:`interpolation_gap` / :func:`barrier` turn the curves into barriers. :func:`pair_barriers`
does it for chosen pairs of a population's members, a chunk of pairs at a time.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from popvec import checks
from popvec.engine import LossFn, accumulate_metrics, evaluate
from popvec.loaders import iterate_batches
from popvec.population import Population, finite_members
from popvec.precision import check_precision, under_autocast
from popvec.studies.shortcut import chunks_itself, evaluate_shortcut

__all__ = [
    "BN_MODES",
    "BNMode",
    "PathEvaluation",
    "alpha_grid",
    "as_alphas",
    "barrier",
    "evaluate_paths",
    "interpolate_stacks",
    "interpolation_gap",
    "l2_distance",
    "members_at_once",
    "pair_barriers",
    "path_evaluation",
    "recompute_batchnorm",
]

BNMode = Literal["auto", "recompute", "keep"]
BN_MODES: tuple[str, ...] = ("auto", "recompute", "keep")


# --------------------------------------------------------------------------- pure tensor core
def interpolate_stacks(stacks_a: dict[str, Tensor], stacks_b: dict[str, Tensor], alphas: Tensor) -> dict[str, Tensor]:
    """Members ``(1 - alpha) * a + alpha * b`` of P paths: stacks ``[P, ...]``, alphas ``[K]`` -> ``[P * K, ...]``.

    Member ``p * K + k`` is path ``p`` at ``alphas[k]``, built for all of them in one broadcast
    ``torch.lerp`` (exact at alpha 0 and 1, even when the other end is not finite, and exactly ``a``
    wherever ``a == b``). Non-floating
    tensors (BatchNorm's ``num_batches_tracked``) are not interpolated: every member takes ``a``'s.
    """
    k = alphas.numel()
    out = {}
    for name, a in stacks_a.items():
        a1, b1 = a.unsqueeze(1), stacks_b[name].unsqueeze(1)  # [P, 1, ...]
        if a.is_floating_point():
            weight = alphas.to(a).view(1, k, *[1] * (a.dim() - 1))
            path = torch.lerp(a1, b1, weight)
            # lerp(a, NaN, 0) is NaN: the ends are taken as they are, so a finite end stays finite.
            path = torch.where(weight == 0, a1, torch.where(weight == 1, b1, path))
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
    A curve with any NaN (a non-finite network on the path, see :func:`evaluate_paths`) has barrier NaN.
    """
    interior = gap[..., 1:-1]
    value = interior.amax(dim=-1) if interior.shape[-1] else torch.zeros(gap.shape[:-1], dtype=gap.dtype, device=gap.device)
    return torch.where(gap.isnan().any(dim=-1), torch.full_like(value, float("nan")), value)


def l2_distance(stacks_a: dict[str, Tensor], stacks_b: dict[str, Tensor]) -> Tensor:
    """``||a_p - b_p||`` over all given tensors for each of P pairs: stacks ``[P, ...]`` -> ``[P]`` float64."""
    squares = [(a.double() - stacks_b[name].double()).pow(2).flatten(1).sum(1) for name, a in stacks_a.items()]
    return torch.stack(squares).sum(0).sqrt()


def as_alphas(alphas: int | Sequence[float] | Tensor) -> Tensor:
    """``alphas`` as a strictly increasing 1-D float32 CPU tensor ``[K]`` in [0, 1].

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


def alpha_grid(alphas: Tensor) -> tuple[Tensor, Tensor]:
    """The alphas to evaluate (``alphas`` ``[K]`` plus both ends, sorted: ``[K']``) and where each of ``alphas`` sits in them ``[K]``.

    The gap needs the curve at 0 and 1, so they are evaluated even when not requested.
    """
    full = torch.cat([alphas, torch.tensor([0.0, 1.0])]).unique()
    return full, torch.searchsorted(full, alphas)


# --------------------------------------------------------------------------- BatchNorm
def _running_norms(module: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


class _Members:
    """The N members of stacks ``[N, ...]`` as plain ``(params, buffers)`` views, run one at a time
    through ``model``; inputs in channels_last when the model accepts it (probed once)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        self.model = model
        n = next(iter(params.values())).shape[0]
        self.members = [({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}) for i in range(n)]
        self.channels_last: bool | None = None

    def layout(self, x: Tensor) -> Tensor:
        """``x`` in the layout the members run in (decided on the first batch)."""
        if self.channels_last is None:
            self.channels_last = x.dim() == 4 and _accepts_channels_last(self.model, *self.members[0], x[:2])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def one(self, i: int, x: Tensor) -> Tensor:
        """Member ``i``'s outputs on its own copy of ``x`` (as in Population.forward: a forward that
        modifies its input in place changes no other member's)."""
        return functional_call(self.model, self.members[i], (self.layout(x).clone(),))

    def __call__(self, x: Tensor) -> Tensor:
        """Outputs ``[N, B, ...]`` of every member on the shared batch ``x`` ``[B, ...]``."""
        return torch.stack([self.one(i, x) for i in range(len(self.members))])


def _accepts_channels_last(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> bool:
    """Whether ``model`` (in eval mode) gives the same outputs on ``x`` in channels_last as in the default
    layout (a ``.view`` of activations, say, fails on channels_last: then the default layout is kept)."""
    probe = copy.deepcopy(model).eval()
    state = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in buffers.items()})
    try:
        expected = functional_call(probe, state, (x.clone(),))
        got = functional_call(probe, state, (x.clone(memory_format=torch.channels_last),))
    except Exception:  # noqa: BLE001 - any failure in channels_last: the default layout
        return False
    same = isinstance(got, Tensor) and got.shape == expected.shape
    return same and bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True))


@torch.no_grad()
def recompute_batchnorm(
    population: Population, data: Any, batch_size: int = 1024, member_chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Every member's buffers with its BatchNorm running statistics recomputed over ``data``: ``[N, ...]``.

    Each layer's running mean and variance become the average over the batches of ``data`` of its
    batch statistics (the network in eval mode except BatchNorm, so dropout is off) and
    ``num_batches_tracked`` the number of batches. That is exactly PyTorch's cumulative averaging
    (``reset_running_stats()`` then ``momentum=None``): independent of the batch order, unlike the
    default momentum. BatchNorm momentum 1 makes each batch's statistics land in the buffers; they
    are summed outside. All members run in one vmapped forward per batch (``member_chunk_size`` at
    a time), or, on a CPU without ``member_chunk_size``, one at a time when the first batch shows
    that to be faster (see :func:`_members_one_at_a_time`).
    """
    return _recompute(population, data, batch_size, member_chunk_size)[0]


def _recompute(population: Population, data: Any, batch_size: int, member_chunk_size: int | None) -> tuple[dict[str, Tensor], bool]:
    """:func:`recompute_batchnorm`'s buffers, and whether the members ran one at a time."""
    model = copy.deepcopy(population.skeleton).eval()
    norms = _running_norms(model)
    for m in norms.values():
        m.train()
        m.momentum = 1.0
    buffers = {k: v.clone(memory_format=torch.contiguous_format) for k, v in population.buffers.items()}  # own storage per member
    stats = [f"{name}.{kind}" for name in norms for kind in ("running_mean", "running_var")]
    for key in [*stats, *(f"{name}.num_batches_tracked" for name in norms)]:
        buffers[key].zero_()  # (momentum 1 keeps 0 x the old value: NaN would stay)
    totals = {k: torch.zeros_like(buffers[k]) for k in stats}
    stack = Population(model, population.params, buffers)
    members = _Members(model, population.params, buffers)
    plain: bool | None = None if population.device.type == "cpu" and member_chunk_size is None else False
    count = 0
    for x, _ in iterate_batches(data, batch_size):
        x = x.to(population.device)
        if plain is None:
            plain = _members_one_at_a_time(stack, members, x)
        elif plain:
            members(x)
        else:
            stack.forward(x, member_chunk_size=member_chunk_size)
        for k, total in totals.items():
            total += buffers[k]
        count += 1
    if count == 0:
        raise ValueError("bn_data must hold at least one batch")
    return {**buffers, **{k: v / count for k, v in totals.items()}}, bool(plain)


def _members_one_at_a_time(stack: Population, members: _Members, x: Tensor) -> bool:
    """Runs the first batch ``x`` through all members in one vmapped pass (their statistics land in the
    buffers) and says whether one member at a time would have been faster (timed on member 0).

    On a CPU a vmapped pass over K networks turns every convolution into a grouped one over
    ``[B, K*C, H, W]`` activations: a few big kernels, which won on 2 threads of a heavily loaded
    machine (ResNet-20, batch 32, load average ~10: 6.6x the per-alpha loop, one at a time 1.7x)
    and lost on a quieter one (load ~3: 0.42x, one at a time 0.62x), where those activations fall
    out of the cache. Which one wins depends on the model, the batch and the machine's load, so it
    is measured here, on the first batch, at the cost of two single-network forwards.
    """
    start = time.perf_counter()
    stack.forward(x)
    vmapped = time.perf_counter() - start
    members.layout(x)  # (the channels_last probe, not timed)
    saved = {k: v.clone() for k, v in members.members[0][1].items()}
    single = float("inf")
    for _ in range(2):  # the first call may set up kernels
        start = time.perf_counter()
        members.one(0, x)
        single = min(single, time.perf_counter() - start)
    for k, v in members.members[0][1].items():
        v.copy_(saved[k])  # member 0's statistics of this batch, as the vmapped pass recorded them
    return single * len(members.members) < vmapped


def _evaluate_one_at_a_time(population: Population, data: Any, loss_fn: LossFn, batch_size: int) -> dict[str, Tensor]:
    """:func:`popvec.engine.evaluate` with the members run one at a time as plain modules:
    ``{"loss": [N], "accuracy": [N]}``."""
    members = _Members(copy.deepcopy(population.skeleton).eval(), population.params, population.buffers)
    metrics = accumulate_metrics(iterate_batches(data, batch_size), members, vmap(loss_fn, in_dims=(0, None)), population.device)
    loss = metrics["loss"]
    accuracy = torch.where(torch.isfinite(loss), metrics["accuracy"], torch.full_like(loss, float("nan")))
    return {"loss": loss.float(), "accuracy": accuracy.float()}


# --------------------------------------------------------------------------- evaluating paths
@dataclass(frozen=True)
class PathEvaluation:
    """How every network on a path is evaluated: on ``data`` with ``loss_fn``, BatchNorm statistics
    recomputed over ``bn_data`` or not, in batches of ``batch_size``, ``member_chunk_size`` networks at once,
    in ``precision`` (``"bf16"``/``"fp16"``: under autocast, statistics recomputed likewise)."""

    data: Any
    loss_fn: LossFn
    recompute: bool
    bn_data: Any
    batch_size: int
    member_chunk_size: int | None
    precision: str = "fp32"

    @property
    def bn(self) -> str:
        """How BatchNorm statistics are treated, as results report it: ``"recompute"`` or ``"keep"``."""
        return "recompute" if self.recompute else "keep"


def path_evaluation(
    skeleton: nn.Module,
    data: Any,
    loss_fn: LossFn,
    bn: str,
    bn_data: Any,
    batch_size: int,
    member_chunk_size: int | None,
    precision: str = "fp32",
) -> PathEvaluation:
    """The checked :class:`PathEvaluation` for a model like ``skeleton``: ``bn`` (one of :data:`BN_MODES`)
    resolved to recompute or keep (``"auto"`` recomputes when the model has BatchNorm running statistics)."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    recompute = bn != "keep" and bool(_running_norms(skeleton))
    if recompute and bn_data is None:
        raise ValueError(
            "bn_data (training batches) is required to recompute BatchNorm running statistics "
            "(bn='recompute', the default for BatchNorm models); pass bn_data=... or bn='keep'"
        )
    return PathEvaluation(data, loss_fn, recompute, bn_data, batch_size, member_chunk_size, check_precision(precision))


def evaluate_paths(
    a: Population, b: Population, alphas: Tensor, spec: PathEvaluation, shortcut: bool = True
) -> tuple[Tensor, Tensor, bool]:
    """Loss and error ``[P, K]`` (CPU) along the P paths ``a[p] -> b[p]`` at ``alphas`` ``[K]``: one population of P * K.

    A single path (P = 1) is evaluated through the first-layer shortcut where it applies (see
    :mod:`popvec.studies.shortcut`; ``shortcut=False`` never, nor in bf16/fp16): the third value says whether it was.
    A network on a path whose parameters (or buffers) are not finite, or whose loss is not finite,
    gets loss and error NaN at that alpha (never an error computed from NaN outputs), with a
    warning naming the paths and alphas.
    """
    grid = alphas.to(a.device)
    path = Population(a.skeleton, interpolate_stacks(a.params, b.params, grid), interpolate_stacks(a.buffers, b.buffers, grid))
    metrics, data, used, chunk = None, spec.data, False, spec.member_chunk_size
    if spec.recompute:
        if spec.precision == "fp32":
            path.buffers, plain = _recompute(path, spec.bn_data, spec.batch_size, spec.member_chunk_size)
            if plain:  # the first batch timed one network at a time faster: so it evaluates too
                metrics = _evaluate_one_at_a_time(path, data, spec.loss_fn, spec.batch_size)
            elif chunk is None and path.device.type == "cpu":
                chunk = path.n  # it timed the whole vmapped pass faster: so it evaluates too (not in cache-sized chunks)
        else:  # under autocast: the vmapped recompute, every network at once
            recompute = under_autocast(recompute_batchnorm, path.device.type, spec.precision)
            path.buffers = recompute(path, spec.bn_data, spec.batch_size, spec.member_chunk_size)
    fp32 = spec.precision == "fp32"
    if metrics is None and shortcut and fp32 and a.n == 1 and all(bool(finite_members({**e.params, **e.buffers}).all()) for e in (a, b)):
        # (not with a non-finite end: the shortcut mixes both ends' activations, NaN at every alpha)
        metrics, data = evaluate_shortcut(path, a, b, grid, spec.data, spec.loss_fn, spec.batch_size, chunk)
        used = metrics is not None
    if metrics is None:
        metrics = evaluate(path, data, spec.loss_fn, spec.batch_size, chunk, spec.precision)
    shape = (a.n, alphas.numel())
    loss, error = metrics["loss"].cpu().view(shape), (1.0 - metrics["accuracy"]).cpu().view(shape)
    bad = ~finite_members({**path.params, **path.buffers}).cpu().view(shape) | ~torch.isfinite(loss)
    if bool(bad.any()):
        nan = torch.tensor(float("nan"), dtype=loss.dtype)
        loss, error = torch.where(bad, nan, loss), torch.where(bad, nan, error)
        _warn_non_finite(a, b, bad, alphas)
    return loss, error, used


def members_at_once(a: Population, b: Population, k: int, spec: PathEvaluation, x: Tensor | None) -> int:
    """How many of the ``P * k`` networks of the paths ``a[p] -> b[p]`` hold evaluation activations at
    once in :func:`evaluate_paths`: ``member_chunk_size`` when set, one when a single finite path on
    a CPU goes through the shortcut (it chunks itself, probed on the inputs ``x``), else all of them."""
    total = a.n * k
    if spec.member_chunk_size is not None:
        return min(total, spec.member_chunk_size)
    if spec.recompute or x is None or a.n != 1:
        return total
    finite = all(bool(finite_members({**e.params, **e.buffers}).all()) for e in (a, b))
    return 1 if finite and chunks_itself(a, x) else total


def _warn_non_finite(a: Population, b: Population, bad: Tensor, alphas: Tensor) -> None:
    """Warn which endpoints are not finite and at which alphas the paths' networks are (``bad`` ``[P, K]``)."""
    ends = []
    for name, end in (("a", a), ("b", b)):
        finite = finite_members({**end.params, **end.buffers}).cpu()
        if not bool(finite.all()):
            ends.append(name if end.n == 1 else f"{name} (paths {(~finite).nonzero().flatten().tolist()})")
    where = [round(float(alphas[k]), 4) for k in bad.any(dim=0).nonzero().flatten().tolist()]
    endpoint = f"endpoint{'s' if len(ends) > 1 else ''} {' and '.join(ends)} {'have' if len(ends) > 1 else 'has'} non-finite parameters; "
    endpoint = endpoint if ends else ""
    warnings.warn(
        f"{endpoint}networks not finite (parameters or loss) at alphas {where}: their loss and error are NaN, and so are the barriers",
        RuntimeWarning,
        stacklevel=3,
    )


def pair_barriers(
    population: Population, first: Tensor, second: Tensor, alphas: Tensor, spec: PathEvaluation, pair_chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss barrier, error barrier and L2 distance ``[P]`` between members ``first[p]`` and ``second[p]`` (``[P]`` positions).

    Pairs are evaluated ``pair_chunk_size`` at a time, each chunk one population of pairs x alphas
    (``alphas`` ``[K]``; both ends are added where missing).
    """
    checks.integer("pair_chunk_size", pair_chunk_size, 1)
    full = alpha_grid(alphas)[0]
    rows = []
    for i, j in zip(first.split(pair_chunk_size), second.split(pair_chunk_size)):
        a, b = population.take(i), population.take(j)
        loss, error, _ = evaluate_paths(a, b, full, spec)
        barriers = [barrier(interpolation_gap(curve, full)) for curve in (loss, error)]
        rows.append(torch.stack([*barriers, l2_distance(a.params, b.params).float().cpu()], dim=1))
    loss_barrier, error_barrier, l2 = torch.cat(rows).unbind(1)
    return loss_barrier, error_barrier, l2
