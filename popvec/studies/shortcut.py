"""The first-layer shortcut for evaluating one interpolation path.

A path ``w(alpha)`` is linear in alpha up to its first nonlinearity: when the network's first
computation is an affine layer (Linear/Conv) applied to the raw input (or a flatten/reshape view
of it), its output for every alpha is ``lerp(f1(x; w_a), f1(x; w_b), alpha)``. Two evaluations of
that layer per batch replace K; the rest of the network runs vmapped over the K alphas. Where the
shortcut does not apply, :func:`evaluate_shortcut` says so and hands back the data untouched.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from popvec import checks
from popvec.engine import LossFn, accumulate_metrics
from popvec.loaders import iterate_batches
from popvec.population import Population

__all__ = ["chunks_itself", "evaluate_shortcut"]

_AFFINE_FIRST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# On a CPU the shortcut runs fastest when one vmapped pass's first-layer activations (members x
# samples x the layer's output per sample) stay near this many floats (~4 MB, cache-sized):
# measured on 2 cores for LeNet-5 (a few hundred samples, one member at a time) and the
# 784-256-256-10 MLP (1000 samples, 4 members at a time).
_CPU_WORKING_SET = 1 << 20


class _Unsupported(Exception):
    """The shortcut does not apply; the caller falls back to the general path."""


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
        assert self.ends is not None and self.alpha is not None  # set together with self.inp
        y_a, y_b = self.ends
        alpha = self.alpha  # a vmapped scalar; (1 - alpha) * a + alpha * b is exact at both ends
        return torch.addcmul(y_a * (1 - alpha), y_b, alpha)


def chunks_itself(a: Population, x: Tensor) -> bool:
    """Whether a path from ``a`` (one member) through the shortcut runs its K networks in cache-sized
    chunks of members and samples on its own: on a CPU, when the shortcut applies (probed on ``x``)."""
    return a.device.type == "cpu" and _first_affine(a.skeleton, a.params, a.buffers, x[:2].to(a.device)) is not None


@torch.no_grad()
def evaluate_shortcut(
    path: Population,
    a: Population,
    b: Population,
    alphas: Tensor,
    data: Any,
    loss_fn: LossFn,
    batch_size: int,
    member_chunk_size: int | None,
) -> tuple[dict[str, Tensor] | None, Any]:
    """:func:`popvec.engine.evaluate` of the single path ``path`` from ``a`` to ``b`` (one member
    each; ``path`` has K members, at ``alphas`` ``[K]``) through the shortcut.

    Returns ``(metrics, None)`` with ``{"loss": [K], "accuracy": [K]}``, or ``(None, rest)`` when
    the shortcut does not apply (probed on the first batch), ``rest`` being all of ``data`` still
    to evaluate the general way: a one-shot iterator loses nothing.
    """
    batches = iter(iterate_batches(data, batch_size))
    first = next(batches, None)
    if first is None:
        return None, batches  # no data: the general path reports it
    x, y = (t.to(path.device, non_blocking=True) for t in checks.xy_batch("data", first))
    forward = _path_forward(path, a, b, alphas, x, batch_size, member_chunk_size)
    if forward is None:
        return None, itertools.chain([(x, y)], batches)
    started = False

    def outputs(inputs: Tensor) -> Tensor:
        nonlocal started
        out = forward(inputs)
        started = True
        return out

    try:
        metrics = accumulate_metrics(itertools.chain([(x, y)], batches), outputs, vmap(loss_fn, in_dims=(0, None)), path.device)
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
    ends = [{k[len(prefix) :]: v[0] for k, v in end.params.items() if k.startswith(prefix)} for end in (a, b)]
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


def _first_affine(skeleton: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> str | None:
    """The name of the model's first layer when the shortcut applies to it, else None.

    One eval-mode forward of member 0 on ``x`` (a couple of samples) with hooks on every leaf
    module: the first leaf called must be exactly a Linear/Conv1d/2d/3d without hooks of its own,
    called once, its parameters used by no other module, and its input the model input itself or a
    reshape/flatten view of it (same storage, same number of elements, contiguous), which the forward leaves unmodified.
    """
    model = copy.deepcopy(skeleton).eval()
    leaves = {name: m for name, m in model.named_modules() if not list(m.children())}
    calls: list[tuple[str, Tensor | None]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0] if args else None)))
        for name, m in leaves.items()
    ]
    member = {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()}
    x = x.clone()  # (the probe must not touch the caller's data)
    version = x._version
    try:
        with torch.no_grad():
            functional_call(model, member, (x,))
    except Exception:  # noqa: BLE001 - any failure on the probe batch (e.g. a fixed batch size): the general path
        return None
    finally:
        for h in handles:
            h.remove()
    if not calls or x._version != version:
        return None  # (a model that modifies its input in place: the general path gives each member its own copy)
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
    if any(
        p is q for n, p in skeleton.named_parameters(remove_duplicate=False) if not n.startswith(f"{name}.") for q in original.parameters()
    ):
        return None  # tied weights
    if not isinstance(inp, Tensor) or not (
        inp is x or (inp.data_ptr() == x.data_ptr() and inp.numel() == x.numel() and inp.is_contiguous() and x.is_contiguous())
    ):
        return None
    return name


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


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
    fn: Callable[..., Tensor],
    model: nn.Module,
    interp: _Interpolated,
    original: nn.Module,
    ends: list[dict[str, Tensor]],
    rest_a: dict[str, Tensor],
    bufs_a: dict[str, Tensor],
    rest: dict[str, Tensor],
    buffers: dict[str, Tensor],
    alphas: Tensor,
    x: Tensor,
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
