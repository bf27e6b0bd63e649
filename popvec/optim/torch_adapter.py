"""``torch.optim`` optimizers on a population's stacked leaves, for element-wise update rules.

The stacked ``[N, ...]`` leaves are the optimizer's parameters, which is exact for optimizers
whose update never mixes entries of a tensor; ``build`` turns a user's optimizer factory into the
vectorized popvec optimizer with the same rule where there is one.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from popvec import checks
from popvec.optim.base import _MAX_GRAD_NORM, HParam, PopulationOptimizer, _bcast, clip_grad_norm
from popvec.optim.rules import SGD, Adam, AdamW
from popvec.population import IndexLike, Population, as_index, as_mask

__all__ = ["ELEMENTWISE_TORCH_OPTIMIZERS", "TorchOptimizer", "build", "from_torch"]


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

    def mask_problem(self) -> str | None:
        """Why a masked step of this optimizer would not be exact per member (it then raises), or None."""
        return _mask_problem(self.optimizer)

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
        problem = self.mask_problem()
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
