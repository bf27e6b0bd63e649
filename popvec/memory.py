"""Memory estimates for a population, checked before it is built.

One member is built and run once (:func:`probe_member`); everything per member then scales with N:
parameters, gradients, optimizer state and the update's workspace stay resident for every member,
while activations (saved for backward at the training batch size, or the widest layer of an
evaluation batch) are only held for the members that run at once, so ``member_chunk_size``
divides them. :func:`check_fits` compares ``estimate.total(n, chunk)`` with
:data:`SAFETY_FRACTION` of what the device has free (:func:`available_bytes`) and raises
:class:`PopulationTooLarge` (a ``MemoryError``) with one line: the estimate, the limit, the N
that fits and the chunk size that fits. Set ``POPVEC_MEMORY_CHECK=0`` to skip every check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ENV_SWITCH",
    "PATH_WORKSPACE",
    "SAFETY_FRACTION",
    "TORCH_OPTIMIZER_SLOTS",
    "MemoryEstimate",
    "PopulationTooLarge",
    "available_bytes",
    "check_fits",
    "checks_enabled",
    "format_bytes",
    "host_build_check",
    "optimizer_slots",
    "preflight_paths",
    "preflight_training",
    "probe_member",
    "tensor_bytes",
]

#: A population may use at most this fraction of the free memory: the rest is left for the
#: allocator's fragmentation, the framework's own buffers and the temporaries the estimate leaves
#: out (on a CPU, peak RSS measured 12-19% above the estimate for LeNet-5 and an MLP at N = 400).
SAFETY_FRACTION = 0.8
#: Optimizer state slots (tensors like the parameters) assumed for a ``torch.optim`` adapter, whose
#: state only exists after its first step: 2, as Adam/AdamW/Adamax/NAdam/RAdam keep (SGD, RMSprop and
#: Adagrad keep 1, so this over-counts them).
TORCH_OPTIMIZER_SLOTS = 2
#: The environment variable that turns every check off when set to ``0``.
ENV_SWITCH = "POPVEC_MEMORY_CHECK"


class PopulationTooLarge(MemoryError):
    """A population whose estimated memory exceeds what the device has free (message: one line)."""


def checks_enabled() -> bool:
    """False when ``POPVEC_MEMORY_CHECK=0``: experts who know better skip every preflight."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the storages of ``tensors`` (an iterable), each storage counted once (views share one)."""
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB, MiB or KiB (one decimal)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per member, by kind. ``activations`` is per member that runs at once (at the batch size
    probed; ``member_chunk_size`` bounds how many do); ``eval_activations`` is per member of an
    evaluation that runs every member at once (the trainers'), which does not overlap the training
    step's. The other kinds are resident for every member; ``fixed`` is shared by the whole run."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    buffers: int = 0
    workspace: int = 0
    activations: int = 0
    eval_activations: int = 0
    fixed: int = 0

    @property
    def resident_bytes(self) -> int:
        """Per member, whatever chunking: parameters, gradients, optimizer state, buffers, workspace."""
        return self.params + self.grads + self.optimizer + self.buffers + self.workspace

    @property
    def per_member_bytes(self) -> int:
        """Per member when every member runs at once."""
        return self.resident_bytes + max(self.activations, self.eval_activations)

    def total(self, n: int, member_chunk_size: int | None = None) -> int:
        """Bytes for ``n`` members, ``member_chunk_size`` of them running at once (default: all)."""
        running = n if member_chunk_size is None else min(n, member_chunk_size)
        return self.fixed + n * self.resident_bytes + max(running * self.activations, n * self.eval_activations)

    def max_members(self, limit: int, member_chunk_size: int | None = None) -> int:
        """The largest N with ``total(N, member_chunk_size) <= limit`` (0 when not even one fits)."""
        if self.total(1, member_chunk_size) > limit:
            return 0
        low, high = 1, 2
        while self.total(high, member_chunk_size) <= limit:
            low, high = high, 2 * high
            if high > 2**62:
                return low
        while high - low > 1:  # total(low) fits, total(high) does not
            mid = (low + high) // 2
            low, high = (mid, high) if self.total(mid, member_chunk_size) <= limit else (low, mid)
        return low

    def max_chunk(self, limit: int, n: int) -> int:
        """The largest ``member_chunk_size`` (<= n) with ``total(n, it) <= limit``; 0 when none does
        (what every member holds whatever the chunking is over the limit on its own)."""
        if self.total(n, 0) > limit:
            return 0
        if self.activations == 0:
            return n
        return min(n, (limit - self.fixed - n * self.resident_bytes) // self.activations)

    def describe(self, n: int = 1, member_chunk_size: int | None = None) -> str:
        """One line: the total for ``n`` members, ``member_chunk_size`` at once, and its parts."""
        kinds = ("params", "grads", "optimizer", "buffers", "workspace")
        parts = ", ".join(f"{k} {format_bytes(getattr(self, k))}" for k in kinds if getattr(self, k))
        terms = [f"{n} x {format_bytes(self.resident_bytes)} resident ({parts})"]
        running = n if member_chunk_size is None else min(n, member_chunk_size)
        training, evaluation = running * self.activations, n * self.eval_activations
        if self.activations and training >= evaluation:
            terms.append(f"{running} x {format_bytes(self.activations)} activations at once")
        elif self.eval_activations:
            terms.append(f"{n} x {format_bytes(self.eval_activations)} evaluation activations")
        if self.fixed:
            terms.append(f"{format_bytes(self.fixed)} shared")
        return f"about {format_bytes(self.total(n, member_chunk_size))} = {' + '.join(terms)}"


# --------------------------------------------------------------------------- what the device has
def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now, or None when unknown (then nothing is checked).

    CUDA: free device memory plus what this process's allocator has cached but not used; CPU:
    ``MemAvailable`` of ``/proc/meminfo`` (Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _meminfo_available()
    return None


# --------------------------------------------------------------------------- the check
def check_fits(
    estimate: MemoryEstimate,
    n: int,
    device: torch.device | str,
    member_chunk_size: int | None = None,
    what: str = "n",
    chunk_flag: str | None = "member_chunk_size",
    limit: int | None = None,
) -> None:
    """Raise :class:`PopulationTooLarge` when ``n`` members need more than :data:`SAFETY_FRACTION` of
    the free memory of ``device`` (or of ``limit`` bytes when given).

    ``what`` names the size the user chose (``"--num-models 100000"``); ``chunk_flag`` names the
    chunking option to suggest (None: the caller has none). Nothing is checked when the free memory
    is unknown or ``POPVEC_MEMORY_CHECK=0``.
    """
    if not checks_enabled():
        return
    free = available_bytes(device) if limit is None else limit
    if free is None:
        return
    budget = int(free * SAFETY_FRACTION)
    if estimate.total(n, member_chunk_size) <= budget:
        return
    advice = [f"at most {estimate.max_members(budget, member_chunk_size)} fit"]
    chunk = estimate.max_chunk(budget, n)
    if chunk_flag is not None and chunk > 0 and (member_chunk_size is None or chunk < member_chunk_size):
        advice.append(f"or keep {n} with {chunk_flag} {chunk}")
    raise PopulationTooLarge(
        f"{what}: needs {estimate.describe(n, member_chunk_size)} but {torch.device(device)} has "
        f"{format_bytes(free)} free ({int(SAFETY_FRACTION * 100)}% usable); {' '.join(advice)} "
        f"(set {ENV_SWITCH}=0 to skip this check)"
    )


# --------------------------------------------------------------------------- probing one member
def _activation_bytes(model: nn.Module, x: Tensor, y: Tensor | None, loss_fn: Callable[..., Tensor] | None) -> int:
    """Bytes autograd saves for backward in one training forward (and the loss), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = loss_fn(out, y) if loss_fn is not None and y is not None else out.float().sum()
    del loss
    return tensor_bytes([*saved, out])


@torch.no_grad()
def _eval_peak_bytes(model: nn.Module, x: Tensor) -> int:
    """Twice the widest leaf module's output in an evaluation forward: its input and output live at once."""
    widest = [x.numel() * x.element_size()]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            widest.append(output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    return 2 * max(widest)


def probe_member(
    model: nn.Module,
    x: Tensor | None = None,
    y: Tensor | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    optimizer_slots: float = 0,
    train: bool = True,
    x_eval: Tensor | None = None,
    workspace_params: float | None = None,
) -> MemoryEstimate:
    """The memory one member of ``model``'s population needs (``model`` is one member, left as found).

    ``x``/``y``: one member's training batch ``[B, ...]`` (no activations counted without ``x``);
    ``x_eval``: a batch of an evaluation that runs every member at once (its widest layer, twice).
    ``optimizer_slots``: optimizer state tensors per parameter (SGD 1, Adam 2, see ``state_names``).
    ``train=False``: evaluation only (no gradients, state or update workspace; ``x`` is then an
    evaluation batch run by chunks, and ``workspace_params`` counts that many copies of the
    parameters, e.g. :data:`PATH_WORKSPACE` for an interpolation). Random draws in the forward (dropout) are undone: the
    caller's RNG is untouched.
    """
    x, x_eval = (t.clone() if t is not None else None for t in (x, x_eval))  # a forward may modify its input in place
    named = dict(model.named_parameters())
    params = tensor_bytes(named.values())
    trainable = tensor_bytes(p for p in named.values() if p.requires_grad)
    buffers = tensor_bytes(model.buffers())
    activations = eval_activations = 0
    was_training = model.training
    devices = [x.device] if x is not None and x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            if x is not None and train:
                model.train()
                activations = _activation_bytes(model, x, y, loss_fn)
            elif x is not None:
                activations = _eval_peak_bytes(model, x)
            if x_eval is not None:
                eval_activations = _eval_peak_bytes(model, x_eval)
        finally:
            model.train(was_training)
    if not train:
        workspace = math.ceil((workspace_params or 0) * params)
        return MemoryEstimate(
            params=params, buffers=buffers, workspace=workspace, activations=activations, eval_activations=eval_activations
        )
    return MemoryEstimate(
        params=params,
        grads=trainable,
        optimizer=math.ceil(optimizer_slots * trainable),
        buffers=buffers,
        workspace=trainable,  # the update's directions (one tensor like the parameters)
        activations=activations,
        eval_activations=eval_activations,
    )


def optimizer_slots(optimizer: Any) -> float:
    """State tensors per parameter of ``optimizer``: a registered name (``"adam"``), a popvec optimizer
    (``len(state_names)``: SGD 1, Adam/AdamW 2) or a ``torch.optim`` adapter (:data:`TORCH_OPTIMIZER_SLOTS`)."""
    if isinstance(optimizer, str):
        from popvec.optim import OPTIMIZERS

        return float(len(OPTIMIZERS[optimizer].state_names))
    names = getattr(optimizer, "state_names", None)
    return float(len(names)) if names is not None else float(TORCH_OPTIMIZER_SLOTS)


def host_build_check(member: nn.Module, n: int, device: torch.device | str, what: str) -> None:
    """Refuse ``n`` members like ``member`` before they are built: building holds the N modules and
    their stacks on the CPU at once (2x parameters and buffers), and the stacks then go to ``device``."""
    one = probe_member(member, train=False)
    building = MemoryEstimate(params=2 * one.params, buffers=2 * one.buffers)
    check_fits(building, n, "cpu", what=f"{what} (building on the cpu: modules and stacks, 2x)", chunk_flag=None)
    if torch.device(device).type != "cpu":
        check_fits(one, n, device, what=what, chunk_flag=None)


def preflight_training(
    model_fn: Callable[[], nn.Module],
    n: int,
    device: torch.device | str,
    optimizer: Any,
    x: Tensor | None,
    y: Tensor | None,
    loss_fn: Callable[..., Tensor] | None = None,
    member_chunk_size: int | str | None = None,
    what: str = "n",
    chunk_flag: str | None = "member_chunk_size",
    x_eval: Tensor | None = None,
) -> MemoryEstimate | None:
    """Build one member of ``model_fn`` (under a forked RNG), probe it on ``x``/``y`` (one member's
    training batch) and raise :class:`PopulationTooLarge` when ``n`` members do not fit on ``device``
    (or their build on the CPU does not). ``optimizer``: see :func:`optimizer_slots`.
    ``member_chunk_size="auto"`` is checked as chunks of one (what "auto" can go down to). Returns
    the estimate (None when checks are off)."""
    if not checks_enabled():
        return None
    if member_chunk_size == "auto":
        member_chunk_size = 1
    assert member_chunk_size is None or isinstance(member_chunk_size, int)
    with torch.random.fork_rng(devices=[]):
        member = model_fn()
    x, y, x_eval = (t.to(device) if t is not None else None for t in (x, y, x_eval))
    estimate = probe_member(member.to(device), x, y, loss_fn, optimizer_slots(optimizer), x_eval=x_eval)
    check_fits(estimate, n, device, member_chunk_size, what, chunk_flag)
    host_build_check(member, n, device, what)
    return estimate


#: Copies of the parameters an interpolation holds per alpha besides the path itself: building it
#: holds three of the tensor being built (``torch.lerp`` and two ``torch.where`` in
#: :func:`popvec.studies.paths.interpolate_stacks`), and evaluating it through the CPU shortcut was
#: measured to hold about 2.6 (LeNet-5 on digits, K = 1500: peak 1.32 GiB above the baseline).
PATH_WORKSPACE = 3


def preflight_paths(
    member: nn.Module,
    k: int,
    device: torch.device | str,
    x: Tensor | None = None,
    member_chunk_size: int | None = None,
    what: str = "alphas",
    chunk_flag: str | None = "member_chunk_size",
) -> MemoryEstimate | None:
    """Refuse an interpolation of ``k`` networks like ``member`` (on ``device``) that cannot fit:
    ``k`` copies of its parameters and buffers, the path's build workspace, and the evaluation
    activations of ``x`` (one evaluation batch) for ``member_chunk_size`` networks at once.
    Returns the estimate (None when checks are off)."""
    if not checks_enabled():
        return None
    estimate = probe_member(member, x, train=False, workspace_params=PATH_WORKSPACE)
    check_fits(estimate, k, device, member_chunk_size, what, chunk_flag)
    return estimate
