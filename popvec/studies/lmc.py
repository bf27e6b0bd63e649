"""Linear mode connectivity: loss and error along the straight line between two networks.

The public face of the studies: :func:`interpolate` evaluates one path's curve and barriers,
:func:`barrier_matrix` the barriers between every pair of a population's members, and
:func:`instability` runs the spawning analysis of Frankle et al. (2020). The work is done in
:mod:`~popvec.studies.paths` (path stacks, BatchNorm recomputation, barriers, one vmapped pass per
chunk of paths), :mod:`~popvec.studies.shortcut` (the first layer run twice instead of K times)
and :mod:`~popvec.studies.instability`; their public names are re-exported here.

>>> res = popvec.studies.lmc.interpolate(model_a, model_b, data=(x, y), alphas=25)
>>> res.loss_barrier, res.error_barrier, res.l2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popvec import memory
from popvec.engine import LossFn
from popvec.plots import new_figure, save_figure
from popvec.population import Population, architecture_mismatch, as_index
from popvec.studies.instability import InstabilityResult, StepCallback, instability
from popvec.studies.paths import (
    BN_MODES,
    BNMode,
    PathEvaluation,
    alpha_grid,
    as_alphas,
    barrier,
    evaluate_paths,
    interpolate_stacks,
    interpolation_gap,
    l2_distance,
    members_at_once,
    pair_barriers,
    path_evaluation,
    recompute_batchnorm,
)

__all__ = [
    "BN_MODES",
    "BNMode",
    "BarrierMatrix",
    "InstabilityResult",
    "InterpolationResult",
    "StepCallback",
    "as_alphas",
    "barrier",
    "barrier_matrix",
    "check_interpolation",
    "instability",
    "interpolate",
    "interpolate_stacks",
    "interpolation_gap",
    "l2_distance",
    "recompute_batchnorm",
]

Endpoint = nn.Module | tuple[Population, int]


@dataclass(frozen=True)
class InterpolationResult:
    """One path ``w(alpha) = (1 - alpha) * w_a + alpha * w_b`` evaluated at K alphas.

    ``alphas``, ``loss``, ``error`` (1 - accuracy), ``loss_gap`` and ``error_gap`` are ``[K]`` CPU
    tensors. A gap is ``curve - [(1 - alpha) * curve(0) + alpha * curve(1)]``; a barrier is the
    maximum gap over the interior alphas (negative where the path is convex; see :func:`barrier`).
    ``l2 = ||w_a - w_b||`` over parameters (not buffers). ``bn`` is how BatchNorm statistics were
    treated (recompute or keep).
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


def check_interpolation(
    a: Endpoint,
    b: Endpoint,
    data: Any,
    alphas: int | Sequence[float] | Tensor = 25,
    bn: BNMode = "auto",
    bn_data: Any = None,
    batch_size: int = 1024,
    member_chunk_size: int | None = None,
    what: str | None = None,
    chunk_flag: str | None = "member_chunk_size",
) -> memory.MemoryEstimate | None:
    """Raise :class:`~popvec.memory.PopulationTooLarge` when :func:`interpolate` with these arguments
    would not fit in memory (it calls this first); ``what`` names the size in the message
    (default ``alphas=K``), ``chunk_flag`` the chunking option to suggest (None: none)."""
    pa, pb = _as_member(a, "a"), _as_member(b, "b")
    spec = path_evaluation(pa.skeleton, data, F.cross_entropy, bn, bn_data, batch_size, member_chunk_size)
    k = alpha_grid(as_alphas(alphas))[0].numel()
    return _preflight(pa, pb, k, spec, what or f"alphas={k}", chunk_flag)


def _preflight(
    pa: Population, pb: Population, k: int, spec: PathEvaluation, what: str, chunk_flag: str | None
) -> memory.MemoryEstimate | None:
    if not memory.checks_enabled():
        return None
    x = _first_inputs(spec.data, spec.batch_size)
    running = members_at_once(pa, pb, k, spec, x)
    return memory.preflight_paths(pa.member(0), k, pa.device, x, running, what, chunk_flag)


def _first_inputs(data: Any, batch_size: int) -> Tensor | None:
    """The first evaluation batch's inputs of ``data`` when it is tensors (an ``(x, y)`` pair or a
    split); None for a loader, which is not drawn from twice."""
    x = getattr(data, "x", None)
    if x is None and isinstance(data, tuple) and len(data) == 2:
        x = data[0]
    return x[:batch_size] if isinstance(x, Tensor) else None


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
    memory_check: bool = True,
    precision: str = "fp32",
) -> InterpolationResult:
    """Loss and error along ``w(alpha) = (1 - alpha) * w_a + alpha * w_b``, all alphas in one vmapped pass.

    ``a``/``b``: ``nn.Module``s or ``(population, index)`` members of one architecture. ``data``:
    ``(x, y)``, a ``TensorSplit`` or an iterable of ``(x, y)`` batches (any split). ``alphas``: an
    int K (equally spaced, both ends) or a strictly increasing 1-D sequence in [0, 1]; the ends are
    evaluated too when missing (the gap needs them). ``bn``: ``"recompute"`` (the default, via
    ``"auto"``, when the model has BatchNorm running statistics) recomputes every alpha's
    statistics over ``bn_data`` (training batches; see :func:`recompute_batchnorm`);
    ``"keep"`` evaluates with interpolated statistics. ``member_chunk_size`` bounds how many of
    the K networks run at once (their activations; all K are built). With ``memory_check``, K
    networks that cannot fit are refused first (:class:`~popvec.memory.PopulationTooLarge`).
    ``precision``: ``"bf16"``/``"fp16"`` evaluate (and recompute statistics) under autocast
    (see :mod:`popvec.precision`).
    """
    pa, pb = _as_member(a, "a"), _as_member(b, "b")
    problem = architecture_mismatch(pa.skeleton, pb.skeleton)
    if problem:
        raise ValueError(f"b must have the same architecture as a: {problem}")
    if pa.device != pb.device:
        raise ValueError(f"b must be on the same device as a: {pb.device} vs {pa.device}")
    requested = as_alphas(alphas)
    spec = path_evaluation(pa.skeleton, data, loss_fn, bn, bn_data, batch_size, member_chunk_size, precision)
    full, keep = alpha_grid(requested)
    if memory_check:
        _preflight(pa, pb, full.numel(), spec, f"alphas={full.numel()}", "member_chunk_size")
    loss, error, shortcut = evaluate_paths(pa, pb, full, spec)
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
        bn=spec.bn,
        shortcut=shortcut,
    )


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
    precision: str = "fp32",
) -> BarrierMatrix:
    """Loss/error barriers between all N(N-1)/2 pairs of members, as ``[N, N]`` matrices.

    Each chunk of ``pair_chunk_size`` pairs is one population of pairs x alphas evaluated in one
    vmapped pass (so memory is bounded by ``pair_chunk_size * K`` networks). Arguments as in
    :func:`interpolate`; entry ``(i, j)`` equals ``interpolate((population, i), (population, j), ...)``'s barriers.
    """
    if population.n < 2:
        raise ValueError(f"population must have at least 2 members, got {population.n}")
    requested = as_alphas(alphas)
    spec = path_evaluation(population.skeleton, data, loss_fn, bn, bn_data, batch_size, member_chunk_size, precision)
    first, second = torch.triu_indices(population.n, population.n, offset=1)
    barriers = pair_barriers(population, first, second, requested, spec, pair_chunk_size)
    loss, error, l2 = (_symmetric(population.n, first, second, v) for v in barriers)
    return BarrierMatrix(population.ids.clone(), requested, loss, error, l2, spec.bn)
