"""The optimizer seam: the ``Optimizer`` protocol, the base of the vectorized optimizers, and clipping.

Every hyperparameter is a float (shared) or one value per member (a length-N sequence or tensor),
stored as an ``[N]`` tensor in ``optimizer.hparams`` and broadcast as ``[N, 1, ...]``. State tensors
are stacked ``[N, ...]`` like the parameters, so ``select`` slices them with the same indices.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from popvec import checks
from popvec.population import IndexLike, Population, as_index, as_mask
from popvec.schedules import Schedule

__all__ = ["HParam", "Optimizer", "PopulationOptimizer", "as_member_values", "clip_grad_norm", "grad_norm"]

HParam = float | Sequence[float] | Tensor


#: A float or one value per member as a fresh ``[n]`` float32 tensor (``checks.member_values``).
as_member_values = checks.member_values

#: ``max_grad_norm``'s range: > 0; ``inf`` clips nothing but still returns each member's norm.
_MAX_GRAD_NORM: dict[str, Any] = {"low": 0.0, "low_open": True, "allow_inf": True}
_NONNEGATIVE: dict[str, Any] = {"low": 0.0}
_BETA: dict[str, Any] = {"low": 0.0, "high": 1.0, "high_open": True}


def _fused_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_sgd_")


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
