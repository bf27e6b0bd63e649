"""Mixed precision: autocast inside the vmapped step, and per-member dynamic loss scaling for fp16.

``precision`` is ``"fp32"`` (the default: no autocast context is entered at all), ``"bf16"`` or
``"fp16"``. Under ``bf16``/``fp16`` each member's forward and loss run under
``torch.autocast(device_type, dtype)``; parameters, gradients, optimizer state and BatchNorm
statistics stay float32 (the stacks are never cast). ``fp16`` adds a :class:`LossScaler`: one
dynamic scale per member (``[N]``), so an overflow skips only that member's update and halves only
its scale (``torch.amp.GradScaler``'s rule, applied to each member alone).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from popvec import checks
from popvec.population import IndexLike, as_index

__all__ = ["PRECISIONS", "LossScaler", "autocast", "autocast_dtype", "check_precision", "norms_need_float32", "under_autocast"]

#: The precisions every trainer, ``evaluate`` and ``--precision`` accept.
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Normalization layers whose backward under vmap(grad) can fail on a half-precision input with float32
# weights (pytorch/pytorch#184890: "expected scalar type Half but found Float"); see norms_need_float32.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

F = TypeVar("F", bound=Callable[..., Any])


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError`` naming the allowed values."""
    return checks.choice("precision", precision, PRECISIONS)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    return _DTYPES.get(check_precision(precision))


def _upcast_norm_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not isinstance(module, _NORMS):
        return None
    return tuple(a.float() if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a for a in args)


@contextlib.contextmanager
def autocast(device_type: str, precision: str, float32_norms: bool = False) -> Iterator[None]:
    """``torch.autocast(device_type, dtype)`` for ``bf16``/``fp16`` (nothing at all for ``fp32``).

    The weight-cast cache is off: it would outlive a CUDA-graph capture, and under vmap/grad the
    members' weights are not the leaves it caches. ``float32_norms``: normalization layers get
    float32 inputs (what their mixed-dtype kernels compute in anyway; see :func:`norms_need_float32`).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    hook = _upcast_norm_inputs if float32_norms else None
    handle = nn.modules.module.register_module_forward_pre_hook(hook) if hook is not None else None  # type: ignore[arg-type]
    try:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            yield
    finally:
        if handle is not None:
            handle.remove()


class _NormProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norms = nn.ModuleList([nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)])

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return sum((norm(h).float().sum() for norm in self.norms), torch.zeros((), device=x.device))


@functools.cache
def norms_need_float32(device_type: str, precision: str) -> bool:
    """Whether the training step must give normalization layers float32 inputs under autocast.

    ``vmap(grad)`` of BatchNorm/LayerNorm/GroupNorm with a half-precision input and float32 weights
    fails in some torch builds (pytorch/pytorch#184890; the CPU of torch 2.14 among them). One tiny
    probe per device type and precision (once per process; the global RNG is left as it was) says
    whether it does here; where it does, those layers' inputs are upcast (their outputs are then
    float32, and the next layer casts them back).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return False
    device = torch.device(device_type)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = _NormProbe().to(device)
        params = {k: v.detach().unsqueeze(0) for k, v in probe.named_parameters()}
        buffers = {k: v.unsqueeze(0).clone() for k, v in probe.named_buffers()}
        x = torch.randn(3, 4, device=device)

        def loss(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
            with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
                return functional_call(probe, (p, b), (x,))  # type: ignore[no-any-return]

        try:
            vmap(grad(loss))(params, buffers)
        except RuntimeError:
            return True
    return False


def under_autocast(fn: F, device_type: str, precision: str) -> F:
    """``fn`` run under :func:`autocast`; ``fn`` itself for fp32 (the float32 path is untouched)."""
    if check_precision(precision) == "fp32":
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast(device_type, precision):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


class LossScaler:
    """Per-member dynamic loss scaling: ``scale`` ``[N]`` and ``growth_tracker`` ``[N]``.

    Member i's loss is multiplied by ``scale[i]`` before the gradient and its gradients by
    ``1 / scale[i]`` after. A member whose gradients hold inf or NaN skips its update and its scale
    is multiplied by ``backoff_factor``; after ``growth_interval`` consecutive good steps it is
    multiplied by ``growth_factor`` (if that stays finite). Defaults are ``torch.amp.GradScaler``'s,
    and a member's scale follows exactly the sequence a GradScaler of that member alone would.
    The scales are per-member state: they follow ``select``/``take`` and are saved in checkpoints.
    """

    def __init__(
        self,
        n: int,
        device: torch.device | str | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        n = checks.integer("n", n)
        self.init_scale = checks.number("init_scale", init_scale, low=0.0, low_open=True)
        self.growth_factor = checks.number("growth_factor", growth_factor, low=1.0, low_open=True)
        self.backoff_factor = checks.number("backoff_factor", backoff_factor, low=0.0, high=1.0, low_open=True, high_open=True)
        self.growth_interval = checks.integer("growth_interval", growth_interval)
        self.scale = torch.full((n,), self.init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(n, dtype=torch.int32, device=device)

    @property
    def n(self) -> int:
        return int(self.scale.shape[0])

    @torch.no_grad()
    def unscale(self, grads: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """The gradients divided by each member's scale, and which members' gradients are all finite ``[N]``.

        As GradScaler: finiteness is checked on the scaled gradients, and the division is a
        multiplication by the float32 reciprocal (exact for the power-of-two scales).
        """
        n = self.n
        finite = torch.ones(n, dtype=torch.bool, device=self.scale.device)
        for g in grads.values():
            finite &= torch.isfinite(g.reshape(n, -1)).all(dim=1)
        inv = self.scale.double().reciprocal().float()
        return {k: g * _bcast(inv, g).to(g.dtype) for k, g in grads.items()}, finite

    @torch.no_grad()
    def update(self, finite: Tensor, mask: Tensor | None = None) -> None:
        """After a step: back off the scales of members whose gradients overflowed, grow the others'
        after ``growth_interval`` good steps. Members with ``mask`` False (not trained) are untouched."""
        tracker = torch.where(finite, self.growth_tracker + 1, torch.zeros_like(self.growth_tracker))
        grown = self.scale * self.growth_factor
        grow = finite & (tracker == self.growth_interval)
        scale = torch.where(finite, self.scale, self.scale * self.backoff_factor)
        scale = torch.where(grow & torch.isfinite(grown), grown, scale)
        tracker = torch.where(grow, torch.zeros_like(tracker), tracker)
        if mask is not None:
            scale = torch.where(mask, scale, self.scale)
            tracker = torch.where(mask, tracker, self.growth_tracker)
        self.scale, self.growth_tracker = scale, tracker

    def set_scale(self, values: float | Sequence[float] | Tensor, members: IndexLike | None = None) -> None:
        """Set the scale of ``members`` (positions; default all), e.g. to restart after a change of learning rate."""
        index = as_index(range(self.n) if members is None else members, self.n, self.scale.device)
        new = checks.member_values("scale", values, index.shape[0], self.scale.device, low=0.0, low_open=True)
        self.scale = self.scale.index_copy(0, index, new)

    # ------------------------------------------------------------------ per-member state
    def select(self, indices: IndexLike) -> LossScaler:
        """Keep, reorder or copy members' scales in place (with the population's ``select``). Returns ``self``."""
        index = as_index(indices, self.n, self.scale.device)
        self.scale = self.scale.index_select(0, index)
        self.growth_tracker = self.growth_tracker.index_select(0, index)
        return self

    def take(self, indices: IndexLike) -> LossScaler:
        """A new scaler of members ``indices``; this one is left as it is."""
        taken = LossScaler.__new__(LossScaler)
        taken.__dict__.update(self.__dict__)
        return taken.select(indices)

    def reset(self, n: int) -> LossScaler:
        """Every one of ``n`` members back at ``init_scale`` (for a state restored without scales). Returns ``self``."""
        self.scale = torch.full((n,), self.init_scale, dtype=torch.float32, device=self.scale.device)
        self.growth_tracker = torch.zeros(n, dtype=torch.int32, device=self.scale.device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "init_scale": self.init_scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> LossScaler:
        device = self.scale.device
        self.scale = state["scale"].to(device=device, dtype=torch.float32)
        self.growth_tracker = state["growth_tracker"].to(device=device, dtype=torch.int32)
        for name in ("init_scale", "growth_factor", "backoff_factor"):
            setattr(self, name, float(state[name]))
        self.growth_interval = int(state["growth_interval"])
        return self
