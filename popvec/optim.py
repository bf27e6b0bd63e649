"""Vectorized optimizers over a population's stacked parameters.

Every hyperparameter is a float (shared) or one value per member (a length-N sequence or tensor),
stored as an ``[N]`` tensor in ``optimizer.hparams`` and broadcast as ``[N, 1, ...]``. State tensors
are stacked ``[N, ...]`` like the parameters, so ``select`` slices them with the same indices.
Each update is a handful of whole-stack tensor ops per parameter tensor: there is no loop over
members. The math matches ``torch.optim`` (SGD, Adam, AdamW) member by member.

``from_torch`` adapts an element-wise ``torch.optim`` factory instead: the stacked leaves are then
the optimizer's parameters, which is exact for optimizers whose update never mixes entries of a
tensor.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from popvec import checks
from popvec.population import IndexLike, Population, as_index, as_mask
from popvec.schedules import Schedule

__all__ = [
    "Optimizer",
    "PopulationOptimizer",
    "SGD",
    "Adam",
    "AdamW",
    "TorchOptimizer",
    "from_torch",
    "ELEMENTWISE_TORCH_OPTIMIZERS",
    "clip_grad_norm",
    "grad_norm",
    "build",
    "make",
    "OPTIMIZERS",
    "OPTIMIZER_HPARAMS",
]

HParam = float | Sequence[float] | Tensor


#: A float or one value per member as a fresh ``[n]`` float32 tensor (``checks.member_values``).
as_member_values = checks.member_values

#: ``max_grad_norm``'s range: > 0; ``inf`` clips nothing but still returns each member's norm.
_MAX_GRAD_NORM: dict[str, Any] = {"low": 0.0, "low_open": True, "allow_inf": True}
_NONNEGATIVE: dict[str, Any] = {"low": 0.0}
_BETA: dict[str, Any] = {"low": 0.0, "high": 1.0, "high_open": True}


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    """View ``[N]`` values as ``[N, 1, ..., 1]`` to broadcast against ``like`` (``[N, ...]``)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def grad_norm(grads: Iterable[Tensor]) -> Tensor:
    """Per-member L2 norm over all of a member's gradients: ``[N]``."""
    per_tensor = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)


def clip_grad_norm(grads: Sequence[Tensor], max_norm: Tensor) -> Tensor:
    """Scale each member's gradients in place so its total norm is at most ``max_norm[i]``.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` applied to each member alone (each member's norm
    covers only its own parameters). Returns the norms before clipping, ``[N]``.
    """
    norms = grad_norm(grads)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(_bcast(coef, g))
    return norms


@runtime_checkable
class Optimizer(Protocol):
    """What the engine and the state need of an optimizer; both families (:class:`PopulationOptimizer`,
    :class:`TorchOptimizer`) implement it.

    ``hparams`` holds the per-member hyperparameters (``[N]`` tensors) by name. ``cuda_graph_capable``
    says whether a step can be recorded as a CUDA graph (then ``graph_key``, ``tick``, ``host_state``
    and ``restore_host_state`` are meaningful).
    """

    population: Population
    hparams: dict[str, Tensor]
    cuda_graph_capable: bool

    @property
    def n(self) -> int: ...

    def step(self, grads: dict[str, Tensor], mask: Tensor | Sequence[bool] | None = None) -> Tensor | None:
        """Update the population in place from ``grads`` (``[N, ...]`` by trainable name); grad norms ``[N]`` if clipping."""
        ...

    def current_lr(self) -> Tensor: ...

    def set_hparam(self, name: str, values: HParam) -> None: ...

    def select(self, indices: IndexLike) -> Optimizer:
        """Keep, reorder or copy members' state in place (after ``population.select`` with the same indices)."""
        ...

    def take(self, indices: IndexLike, population: Population) -> Optimizer:
        """A new optimizer of members ``indices`` bound to ``population`` (their ``take``); this one is untouched."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Optimizer: ...

    def graph_key(self) -> tuple[Any, ...]: ...

    def tick(self) -> None: ...

    def host_state(self) -> Any: ...

    def restore_host_state(self, state: Any) -> None: ...


class PopulationOptimizer:
    """Base of the vectorized optimizers: hyperparameters ``[N]``, stacked state, selection.

    An update is split in two, as in optax: a *direction* (the optimizer's rule at learning rate 1)
    and its application ``p += lr[i] * direction`` with each member's own (scheduled) learning rate.
    When the rule's other hyperparameters are shared by all members, the direction comes from
    PyTorch's fused multi-tensor kernel (one pass over memory); otherwise from the general
    per-member formula. Subclasses declare ``state_names`` and implement both.
    """

    state_names: tuple[str, ...] = ()
    #: each hyperparameter's allowed interval (``checks.member_values`` keywords); the constructor
    #: and ``set_hparam`` both check it. A name not listed may take any finite value.
    hparam_ranges: ClassVar[dict[str, dict[str, Any]]] = {"lr": _NONNEGATIVE, "max_grad_norm": _MAX_GRAD_NORM}
    #: hyperparameters the fused kernel needs shared by all members
    shared_for_fused: tuple[str, ...] = ()
    cuda_graph_capable = True

    def __init__(
        self,
        population: Population,
        hparams: dict[str, HParam],
        max_grad_norm: HParam | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.population = population
        n, device = population.n, population.device
        self.hparams: dict[str, Tensor] = {k: self._hparam_values(k, v, n, device) for k, v in hparams.items()}
        if max_grad_norm is not None:
            self.hparams["max_grad_norm"] = self._hparam_values("max_grad_norm", max_grad_norm, n, device)
        self._check_together(self.hparams)
        self.schedule = schedule.to(device) if schedule is not None else None
        self.steps = torch.zeros(n, dtype=torch.float32, device=device)
        # The shared step count, known on the host while every member has taken the same number of
        # steps (always, unless a loaded state says otherwise); lets the fused path run sync-free.
        self._shared_step: int | None = 0
        self.state: dict[str, dict[str, Tensor]] = {
            s: {k: torch.zeros_like(population.params[k]) for k in population.trainable} for s in self.state_names
        }
        self.use_fused = _fused_supported(device)
        self.hparams_changed()

    @property
    def n(self) -> int:
        return int(self.steps.shape[0])

    def set_hparam(self, name: str, values: HParam) -> None:
        """Replace hyperparameter ``name`` (a float or one value per member), e.g. for PBT's explore."""
        checks.choice("name", name, sorted(self.hparams))
        new = self._hparam_values(name, values, self.n, self.steps.device)
        self._check_together({**self.hparams, name: new})
        self.hparams[name] = new
        self.hparams_changed()

    def _hparam_values(self, name: str, values: HParam, n: int, device: torch.device) -> Tensor:
        """``values`` as ``[n]`` on ``device``, checked against ``hparam_ranges[name]``."""
        return checks.member_values(name, values, n, device, **self.hparam_ranges.get(name, {}))

    def _check_together(self, hparams: dict[str, Tensor]) -> None:
        """Raise if hyperparameters are valid alone but not together (e.g. SGD's nesterov)."""

    def hparams_changed(self) -> None:
        """Recompute host-side facts about ``hparams``; call after editing them in place."""
        self._shared = {k: float(self.hparams[k][0]) for k in self.shared_for_fused if bool((self.hparams[k] == self.hparams[k][0]).all())}
        self._any_weight_decay = bool((self.hparams.get("weight_decay", torch.zeros(1)) != 0).any())

    def current_lr(self) -> Tensor:
        """The learning rate each member uses at its next update: ``[N]``."""
        lr = self.hparams["lr"]
        return lr * self.schedule(self.steps) if self.schedule is not None else lr

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], mask: Tensor | Sequence[bool] | None = None) -> Tensor | None:
        """Apply one update to the population's parameters in place; returns grad norms if clipping.

        ``mask`` (``[N]`` bools): members with False are left exactly as they were (parameters,
        state, step count); see :meth:`masked_step`.
        """
        if mask is not None:
            return self.masked_step(grads, mask)
        names = self.population.trainable
        params = [self.population.params[k] for k in names]
        # The fused kernels read a gradient with its parameter's layout: match strides (autograd through
        # vmap can return transposed gradients).
        grad_list = [grads[k] if grads[k].stride() == p.stride() else torch.empty_like(p).copy_(grads[k]) for k, p in zip(names, params)]
        norms = None
        if "max_grad_norm" in self.hparams:
            grad_list = [g.clone() for g in grad_list]
            norms = clip_grad_norm(grad_list, self.hparams["max_grad_norm"])
        lr = self.current_lr()
        states = {s: [self.state[s][k] for k in names] for s in self.state_names}
        self.steps += 1
        self.tick()
        if self.fused_now():
            directions = [torch.zeros_like(p) for p in params]
            self._fused_direction(directions, grad_list, params, states)
            self._apply(params, directions, lr)
        else:
            self._update(params, grad_list, states, lr)
        return norms

    @torch.no_grad()
    def masked_step(self, grads: dict[str, Tensor], mask: Tensor | Sequence[bool]) -> Tensor | None:
        """Update only the members whose ``mask`` entry is True; the others stay bit-identical.

        The update runs for the whole stack and the masked members' parameters, state and step
        counts are then restored with ``torch.where`` (one snapshot of those tensors per call).
        Step counts may differ between members from then on, so the general per-member path is
        used (``_shared_step`` becomes unknown until the counts agree again, e.g. ``reset_state``).
        """
        mask = as_mask(mask, self.n, self.steps.device)
        tensors = [
            *(self.population.params[k] for k in self.population.trainable),
            *(t for d in self.state.values() for t in d.values()),
            self.steps,
        ]
        saved = [t.clone() for t in tensors]
        self._shared_step = None
        norms = self.step(grads)
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(_bcast(mask, t), t, old))
        return norms

    @torch.no_grad()
    def reset_state(self, indices: IndexLike) -> PopulationOptimizer:
        """Zero the state and step count of members ``indices`` (positions): they restart as new.

        Hyperparameters are kept; their schedules restart at step 0.
        """
        index = as_index(indices, self.n, self.steps.device)
        for d in self.state.values():
            for t in d.values():
                t.index_fill_(0, index, 0.0)
        self.steps.index_fill_(0, index, 0.0)
        self._shared_step = int(self.steps[0]) if bool((self.steps == self.steps[0]).all()) else None
        return self

    def tick(self) -> None:
        """Host-side bookkeeping of one step (the device-side count is ``steps``)."""
        if self._shared_step is not None:
            self._shared_step += 1

    def host_state(self) -> Any:
        """Host-side bookkeeping that a CUDA-graph recording runs once without training (the shared step count)."""
        return self._shared_step

    def restore_host_state(self, state: Any) -> None:
        self._shared_step = state

    def fused_now(self) -> bool:
        return self.use_fused and self._shared_step is not None and len(self._shared) == len(self.shared_for_fused)

    def graph_key(self) -> tuple[Any, ...]:
        """Everything on the host that shapes the kernels of the next step (for CUDA-graph reuse)."""
        tensors = [*self.hparams.values(), self.steps, *(t for d in self.state.values() for t in d.values())]
        first = self._shared_step == 0
        return (
            self.fused_now(),
            tuple(sorted(self._shared.items())),
            self._any_weight_decay,
            first,
            id(self.schedule),
            tuple((t.data_ptr(), tuple(t.shape)) for t in tensors),
        )

    def _apply(self, params: list[Tensor], directions: list[Tensor], lr: Tensor) -> None:
        for p, d in zip(params, directions):
            p.addcmul_(d, _bcast(lr, p))

    def _fused_direction(self, out: list[Tensor], grads: list[Tensor], params: list[Tensor], states: dict[str, list[Tensor]]) -> None:
        raise NotImplementedError

    def _update(self, params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]], lr: Tensor) -> None:
        raise NotImplementedError

    def _l2_grads(self, grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        if not self._any_weight_decay:
            return grads
        return [torch.addcmul(g, p, _bcast(self.hparams["weight_decay"], p)) for g, p in zip(grads, params)]

    def select(self, indices: IndexLike) -> PopulationOptimizer:
        """Keep, reorder or copy members' state and hyperparameters, like ``Population.select``."""
        index = as_index(indices, self.n, self.steps.device)
        self.hparams = {k: v.index_select(0, index) for k, v in self.hparams.items()}
        self.state = {s: {k: v.index_select(0, index) for k, v in d.items()} for s, d in self.state.items()}
        self.steps = self.steps.index_select(0, index)
        if self.schedule is not None:
            self.schedule = self.schedule.select(index)
        self.hparams_changed()
        return self

    def take(self, indices: IndexLike, population: Population) -> PopulationOptimizer:
        """A new optimizer of members ``indices`` over ``population`` (``select`` replaces, never mutates, tensors)."""
        taken = copy.copy(self)
        taken.population = population
        return taken.select(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"hparams": dict(self.hparams), "state": {s: dict(d) for s, d in self.state.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> PopulationOptimizer:
        device = self.steps.device
        self.hparams = {k: v.to(device) for k, v in state["hparams"].items()}
        self.state = {s: {k: v.to(device) for k, v in d.items()} for s, d in state["state"].items()}
        self.steps = state["steps"].to(device)
        self._shared_step = int(self.steps[0]) if bool((self.steps == self.steps[0]).all()) else None
        self.hparams_changed()
        return self


def _fused_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_sgd_")


class SGD(PopulationOptimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay (``torch.optim.SGD``'s rule)."""

    state_names = ("momentum_buffer",)
    shared_for_fused = ("momentum", "dampening")
    hparam_ranges: ClassVar[dict[str, dict[str, Any]]] = {
        **PopulationOptimizer.hparam_ranges,
        "momentum": _NONNEGATIVE,
        "dampening": _NONNEGATIVE,
        "weight_decay": _NONNEGATIVE,
    }

    def __init__(
        self,
        population: Population,
        lr: HParam = 1e-3,
        momentum: HParam = 0.0,
        dampening: HParam = 0.0,
        nesterov: bool = False,
        weight_decay: HParam = 0.0,
        max_grad_norm: HParam | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.nesterov = nesterov
        super().__init__(
            population,
            {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay},
            max_grad_norm,
            schedule,
        )

    def _check_together(self, hparams: dict[str, Tensor]) -> None:
        if self.nesterov and bool(((hparams["momentum"] <= 0) | (hparams["dampening"] != 0)).any()):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0 for every member")

    def _fused_direction(self, out, grads, params, states):  # noqa: D102 - see class docstring
        momentum = self._shared["momentum"]
        torch._fused_sgd_(
            out,
            self._l2_grads(grads, params),
            states["momentum_buffer"] if momentum != 0 else [],
            weight_decay=0.0,
            momentum=momentum,
            lr=1.0,
            dampening=self._shared["dampening"],
            nesterov=self.nesterov,
            maximize=False,
            is_first_step=self._shared_step == 1,
        )

    def _update(self, params, grads, states, lr):  # noqa: D102 - see class docstring
        hp = self.hparams
        first = self.steps == 1
        # torch.optim.SGD ignores dampening when momentum is 0 (it keeps no buffer at all).
        dampening = torch.where(hp["momentum"] == 0, torch.zeros_like(hp["dampening"]), hp["dampening"])
        for p, g, buf in zip(params, self._l2_grads(grads, params), states["momentum_buffer"]):
            # First step: buffer = d_p (no dampening); later: momentum * buffer + (1 - dampening) * d_p.
            new_buf = _bcast(hp["momentum"], p) * buf + _bcast(1 - dampening, p) * g
            buf.copy_(torch.where(_bcast(first, p), g, new_buf))
            d_p = g + _bcast(hp["momentum"], p) * buf if self.nesterov else buf
            p.sub_(_bcast(lr, p) * d_p)


class Adam(PopulationOptimizer):
    """Adam (Kingma & Ba 2015) with L2 ``weight_decay`` added to the gradient (``torch.optim.Adam``)."""

    state_names = ("exp_avg", "exp_avg_sq")
    shared_for_fused = ("beta1", "beta2", "eps")
    hparam_ranges: ClassVar[dict[str, dict[str, Any]]] = {
        **PopulationOptimizer.hparam_ranges,
        "beta1": _BETA,
        "beta2": _BETA,
        "eps": _NONNEGATIVE,
        "weight_decay": _NONNEGATIVE,
    }
    decoupled_weight_decay = False

    def __init__(
        self,
        population: Population,
        lr: HParam = 1e-3,
        betas: tuple[HParam, HParam] = (0.9, 0.999),
        eps: HParam = 1e-8,
        weight_decay: HParam = 0.0,
        max_grad_norm: HParam | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(
            population,
            {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay},
            max_grad_norm,
            schedule,
        )

    def _fused_direction(self, out, grads, params, states):  # noqa: D102 - see class docstring
        step = self.steps[:1].reshape(())
        torch._fused_adam_(
            out,
            grads if self.decoupled_weight_decay else self._l2_grads(grads, params),
            states["exp_avg"],
            states["exp_avg_sq"],
            [],
            [step] * len(out),
            lr=1.0,
            beta1=self._shared["beta1"],
            beta2=self._shared["beta2"],
            weight_decay=0.0,
            eps=self._shared["eps"],
            amsgrad=False,
            maximize=False,
        )

    def _apply(self, params, directions, lr):  # noqa: D102 - decoupled decay first, as AdamW does
        if self.decoupled_weight_decay and self._any_weight_decay:
            for p in params:
                p.mul_(1 - _bcast(lr * self.hparams["weight_decay"], p))
        super()._apply(params, directions, lr)

    def _update(self, params, grads, states, lr):  # noqa: D102 - see class docstring
        hp = self.hparams
        beta1, beta2 = hp["beta1"], hp["beta2"]
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = torch.sqrt(1 - beta2**self.steps)
        step_size = lr / bias_correction1
        if not self.decoupled_weight_decay:
            grads = self._l2_grads(grads, params)
        for p, g, m, v in zip(params, grads, states["exp_avg"], states["exp_avg_sq"]):
            if self.decoupled_weight_decay:
                p.mul_(1 - _bcast(lr * hp["weight_decay"], p))
            m.lerp_(g, _bcast(1 - beta1, p))
            v.mul_(_bcast(beta2, p)).addcmul_(g, g * _bcast(1 - beta2, p))
            denom = v.sqrt().div_(_bcast(bias_correction2_sqrt, p)).add_(_bcast(hp["eps"], p))
            p.addcdiv_(m * _bcast(step_size, p), denom, value=-1.0)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay ``p *= 1 - lr * wd`` (``torch.optim.AdamW``)."""

    decoupled_weight_decay = True

    def __init__(
        self,
        population: Population,
        lr: HParam = 1e-3,
        betas: tuple[HParam, HParam] = (0.9, 0.999),
        eps: HParam = 1e-8,
        weight_decay: HParam = 1e-2,
        max_grad_norm: HParam | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(population, lr, betas, eps, weight_decay, max_grad_norm, schedule)


#: The vectorized optimizers by name: the one registry that commands, search spaces and studies use.
OPTIMIZERS: dict[str, type[PopulationOptimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
#: The per-member hyperparameters each registered optimizer takes, by flat name (``beta1``/``beta2``, not ``betas``).
OPTIMIZER_HPARAMS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "max_grad_norm"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"),
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"),
}


def make(
    name: str, population: Population, schedule: Schedule | None = None, nesterov: bool = False, **hparams: HParam
) -> PopulationOptimizer:
    """Registered optimizer ``name`` over ``population``, hyperparameters by flat name (floats or ``[N]``).

    ``make("sgd", pop, lr=0.05, momentum=0.9)``; ``make("adam", pop, lr=[...], beta2=0.99)``. A name
    the optimizer does not take is refused, naming what it takes.
    """
    checks.choice("optimizer", name, OPTIMIZERS)
    known = OPTIMIZER_HPARAMS[name]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"hyperparameter {unknown[0]!r} does not apply to {name} (it takes {', '.join(known)})")
    kwargs: dict[str, Any] = dict(hparams)
    if name == "sgd":
        kwargs["nesterov"] = nesterov
    elif nesterov:
        raise ValueError(f"nesterov applies to sgd only, not {name}")
    if "beta1" in kwargs or "beta2" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    return OPTIMIZERS[name](population, schedule=schedule, **kwargs)


ELEMENTWISE_TORCH_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


class TorchOptimizer:
    """A ``torch.optim`` optimizer whose parameters are the population's stacked leaves.

    Exact per member for element-wise optimizers (each entry's update depends on that entry
    alone). Learning rates are shared by all members; clipping is still per member.
    """

    cuda_graph_capable = False

    def __init__(
        self,
        population: Population,
        optimizer_fn: Callable[[list[Tensor]], torch.optim.Optimizer],
        max_grad_norm: HParam | None = None,
    ) -> None:
        self.population = population
        self.optimizer = optimizer_fn([population.params[k] for k in population.trainable])
        if type(self.optimizer) not in ELEMENTWISE_TORCH_OPTIMIZERS:
            allowed = ", ".join(c.__name__ for c in ELEMENTWISE_TORCH_OPTIMIZERS)
            raise TypeError(
                f"optimizer_fn returned {type(self.optimizer).__name__}, which popvec cannot run on stacked "
                f"members: its update is not known to be element-wise, so it may mix members that share one "
                f"stacked tensor (norms, factored statistics). Allowed: {allowed}; or use popvec.optim.SGD/Adam/AdamW."
            )
        self.hparams: dict[str, Tensor] = {}
        if max_grad_norm is not None:
            self.hparams["max_grad_norm"] = checks.member_values(
                "max_grad_norm", max_grad_norm, population.n, population.device, **_MAX_GRAD_NORM
            )

    @property
    def n(self) -> int:
        return self.population.n

    def set_hparam(self, name: str, values: HParam) -> None:
        """Only ``max_grad_norm`` is per member here (a ``torch.optim`` learning rate is shared by all members)."""
        checks.choice("name", name, sorted(self.hparams))
        self.hparams[name] = checks.member_values(name, values, self.n, self.population.device, **_MAX_GRAD_NORM)

    def graph_key(self) -> tuple[Any, ...]:
        return ()

    def tick(self) -> None:
        """Nothing on the host to count (``torch.optim`` keeps its own step counts)."""

    def host_state(self) -> Any:
        return None

    def restore_host_state(self, state: Any) -> None:
        """Nothing to restore."""

    def current_lr(self) -> Tensor:
        lr = float(self.optimizer.param_groups[0]["lr"])
        return torch.full((self.n,), lr, device=self.population.device)

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], mask: Tensor | Sequence[bool] | None = None) -> Tensor | None:
        """One update of every member (or, with ``mask``, of the members marked True)."""
        if mask is not None:
            return self.masked_step(grads, mask)
        params = self._params()
        grad_list = [grads[k] for k in self.population.trainable]
        norms = None
        if "max_grad_norm" in self.hparams:
            grad_list = [g.clone() for g in grad_list]
            norms = clip_grad_norm(grad_list, self.hparams["max_grad_norm"])
        for p, g in zip(params, grad_list):
            p.grad = g
        self.optimizer.step()
        for p in params:
            p.grad = None
        return norms

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def masked_step(self, grads: dict[str, Tensor], mask: Tensor | Sequence[bool]) -> Tensor | None:
        """Update only the members marked True in ``mask``; the others stay bit-identical.

        A ``torch.optim`` optimizer keeps one step count per stacked tensor, shared by all
        members, so masking is exact only for rules that never read it: SGD (dampening 0),
        RMSprop, and Adagrad without ``lr_decay``. Others raise; use ``popvec.optim.Adam``/``AdamW``
        (per-member step counts) instead.
        """
        problem = _mask_problem(self.optimizer)
        if problem:
            raise ValueError(f"mask: {problem}")
        mask = as_mask(mask, self.n, self.population.device)
        params = self._params()
        n = self.n
        # State created by this step (torch.optim builds it lazily) starts at zero for every rule
        # allowed here, so a masked member's new state is restored to zeros.
        before = {id(p): {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items() if _per_member(v, n)} for p in params}
        saved = [p.clone() for p in params]
        norms = self.step(grads)
        for p, old in zip(params, saved):
            p.copy_(torch.where(_bcast(mask, p), p, old))
            for k, v in self.optimizer.state.get(p, {}).items():
                if _per_member(v, n):
                    prev = before[id(p)].get(k)
                    v.copy_(torch.where(_bcast(mask, v), v, prev if prev is not None else torch.zeros_like(v)))
        return norms

    def select(self, indices: IndexLike) -> TorchOptimizer:
        """Slice the per-parameter state and rebind the optimizer to the population's current stacks.

        Call after ``population.select`` with the same indices.
        """
        index: Tensor | None = None
        new_params = iter(self.population.params[k] for k in self.population.trainable)
        for group in self.optimizer.param_groups:
            rebound = []
            for old in group["params"]:
                new = next(new_params)
                state = self.optimizer.state.pop(old, None)
                if state is not None:
                    if index is None:
                        index = as_index(indices, old.shape[0], old.device)
                    self.optimizer.state[new] = {
                        k: v.index_select(0, index) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[:1] == old.shape[:1] else v
                        for k, v in state.items()
                    }
                rebound.append(new)
            group["params"] = rebound
        if "max_grad_norm" in self.hparams:
            self.hparams["max_grad_norm"] = self.hparams["max_grad_norm"].index_select(
                0, as_index(indices, self.hparams["max_grad_norm"].shape[0], self.population.device)
            )
        return self

    def take(self, indices: IndexLike, population: Population) -> TorchOptimizer:
        """A new optimizer of members ``indices`` over ``population``; the torch state dicts are copied first."""
        taken = copy.copy(self)
        taken.population = population
        taken.hparams = dict(self.hparams)
        inner = copy.copy(self.optimizer)
        inner.state = defaultdict(dict, {p: dict(v) for p, v in self.optimizer.state.items()})
        inner.param_groups = [dict(group) for group in self.optimizer.param_groups]
        taken.optimizer = inner
        return taken.select(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": self.optimizer.state_dict(), "hparams": dict(self.hparams)}

    def load_state_dict(self, state: dict[str, Any]) -> TorchOptimizer:
        self.optimizer.load_state_dict(state["torch"])
        self.hparams = {k: v.to(self.population.device) for k, v in state["hparams"].items()}
        return self


def _per_member(value: Any, n: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n


def _mask_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why masked steps of ``optimizer`` would not be exact per member, or None."""
    kind = type(optimizer)
    groups = optimizer.param_groups
    if kind is torch.optim.SGD and all(g["momentum"] == 0 or g["dampening"] == 0 for g in groups):
        return None
    if kind is torch.optim.RMSprop:
        return None
    if kind is torch.optim.Adagrad and all(g["lr_decay"] == 0 for g in groups):
        return None
    return (
        f"torch.optim.{kind.__name__} (as configured) depends on a step count or first-step rule shared by all "
        f"members of a stacked tensor, so skipping some members would change the others' updates; use "
        f"popvec.optim.SGD/Adam/AdamW (per-member step counts) for masked steps"
    )


def from_torch(
    population: Population,
    optimizer_fn: Callable[[list[Tensor]], torch.optim.Optimizer],
    max_grad_norm: HParam | None = None,
) -> TorchOptimizer:
    """Adapt ``optimizer_fn`` (e.g. ``lambda params: torch.optim.Adam(params, lr=1e-3)``) to a population."""
    return TorchOptimizer(population, optimizer_fn, max_grad_norm)


def _native_equivalent(population: Population, optimizer: torch.optim.Optimizer) -> PopulationOptimizer | None:
    """The vectorized popvec optimizer that runs the same rule as ``optimizer``, if there is one."""
    if len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if group.get("maximize") or group.get("differentiable") or isinstance(group["lr"], Tensor):
        return None
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return SGD(population, group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])
    if kind in (torch.optim.Adam, torch.optim.AdamW) and not group.get("amsgrad"):
        decoupled = kind is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        cls = AdamW if decoupled else Adam
        return cls(population, group["lr"], group["betas"], group["eps"], group["weight_decay"])
    return None


def build(population: Population, optimizer_fn: Callable[..., Any]) -> PopulationOptimizer | TorchOptimizer:
    """Turn a user's optimizer factory into a population optimizer.

    ``optimizer_fn`` is either a popvec optimizer class (or a ``functools.partial`` of one), called
    with the population, or a ``torch.optim`` factory called with the stacked parameters. A torch
    SGD/Adam/AdamW becomes the equivalent vectorized popvec optimizer (same rule, faster); other
    element-wise torch optimizers run through :class:`TorchOptimizer`.
    """
    target = getattr(optimizer_fn, "func", optimizer_fn)
    if isinstance(target, type) and issubclass(target, PopulationOptimizer):
        return optimizer_fn(population)
    adapter = TorchOptimizer(population, optimizer_fn)
    return _native_equivalent(population, adapter.optimizer) or adapter
