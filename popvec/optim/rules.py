"""The vectorized update rules (SGD, Adam, AdamW) and their registry.

Each update is a handful of whole-stack tensor ops per parameter tensor: there is no loop over
members. The math matches ``torch.optim`` member by member.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from popvec import checks
from popvec.optim.base import _BETA, _NONNEGATIVE, HParam, PopulationOptimizer, _bcast
from popvec.population import Population
from popvec.schedules import Schedule

__all__ = ["SGD", "Adam", "AdamW", "OPTIMIZERS", "OPTIMIZER_HPARAMS", "make"]


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
