"""Ensembles of a population's members, and joint training of members as experts with a fusion head.

Combining (no training): :func:`member_outputs` runs any subset of members in one vmapped pass;
:func:`combine` merges their outputs by mean of probabilities, mean of logits or majority vote;
:func:`predict` and :func:`evaluate_ensemble` do both, for a whole population, a subset of member
positions (e.g. the survivors of an elimination run) or a list of plain modules.

Co-training: :class:`JointTrainer` trains the N members and a fusion head together on

    loss = loss_fn(fusion(z_1..z_N), y) + member_weight * sum_i loss_fn(out_i, y)
           [+ distill_weight * T^2 * sum_i KL(ensemble_T || softmax(out_i / T))]

where ``z_i`` is member i's output or penultimate feature vector and all members run in one
vmapped forward. The members update with a popvec optimizer (per-member learning rates and
schedules), the head with any ``torch.optim`` optimizer and scheduler: two parameter groups, each
with its own clipping. Members and head export as plain ``state_dict``\\ s.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from popvec import checks
from popvec.engine import accumulate_metrics
from popvec.loaders import iterate_batches
from popvec.population import IndexLike, Population, as_index

__all__ = [
    "COMBINE_METHODS",
    "FUSIONS",
    "ConcatFusion",
    "JointLoss",
    "JointTrainer",
    "MeanFusion",
    "ProductFusion",
    "combine",
    "ensemble_loss",
    "evaluate_ensemble",
    "make_fusion",
    "member_outputs",
    "predict",
]

COMBINE_METHODS: tuple[str, ...] = ("mean_prob", "mean_logit", "vote")

Members = Population | Sequence[nn.Module]


# --------------------------------------------------------------------------- combining
def _as_population(population: Members) -> Population:
    if isinstance(population, Population):
        return population
    if isinstance(population, nn.Module) or not isinstance(population, Sequence):
        raise TypeError(f"population must be a Population or a sequence of nn.Modules, got {type(population).__name__}")
    if len(population) == 0:
        raise ValueError("population must hold at least one member, got an empty sequence")
    return Population.from_modules(population)


def _check_method(method: str) -> None:
    checks.choice("method", method, COMBINE_METHODS)


def _subset_index(population: Population, members: IndexLike | None) -> Tensor | None:
    if members is None:
        return None
    try:
        return as_index(members, population.n, population.device)
    except (ValueError, TypeError) as err:
        raise type(err)(f"members: {err}") from None


@torch.no_grad()
def member_outputs(population: Members, x: Tensor, members: IndexLike | None = None, chunk_size: int | None = None) -> Tensor:
    """Outputs ``[K, B, ...]`` of the members at positions ``members`` (default all) on a shared batch.

    Runs in eval mode (BatchNorm running statistics, no dropout); the population's mode is restored.
    """
    pop = _as_population(population)
    index = _subset_index(pop, members)
    params, buffers = pop.params, pop.buffers
    if index is not None:
        params = {k: v.index_select(0, index) for k, v in params.items()}
        buffers = {k: v.index_select(0, index) for k, v in buffers.items()}
    was_training = pop.training
    pop.eval()
    try:
        fn = vmap(pop.functional(), in_dims=(0, 0, None), randomness="different", chunk_size=chunk_size)
        return fn(params, buffers, x.to(pop.device))
    finally:
        pop.train(was_training)


def combine(outputs: Tensor, method: str = "mean_prob") -> Tensor:
    """Merge members' logits ``[K, B, C]`` into one prediction ``[B, C]``.

    ``mean_prob``: mean of the softmax probabilities; ``mean_logit``: mean of the logits;
    ``vote``: fraction of members voting for each class (argmax of a tie is the lowest class index).
    """
    _check_method(method)
    if outputs.dim() != 3 or outputs.shape[0] == 0:
        raise ValueError(f"outputs must be [K, B, C] logits with K >= 1, got shape {tuple(outputs.shape)}")
    if method == "mean_prob":
        return outputs.softmax(dim=-1).mean(dim=0)
    if method == "mean_logit":
        return outputs.mean(dim=0)
    votes = F.one_hot(outputs.argmax(dim=-1), outputs.shape[-1]).to(outputs.dtype)
    return votes.mean(dim=0)


def ensemble_loss(combined: Tensor, y: Tensor, method: str = "mean_prob") -> Tensor:
    """Negative log-likelihood of ``y`` under a combined prediction (mean over the batch).

    ``mean_prob``: ``-log p_y`` of the mean probabilities; ``mean_logit``: cross-entropy of the
    mean logits; ``vote``: a vote is not a probability model, the loss is NaN.
    """
    _check_method(method)
    if method == "mean_prob":
        return F.nll_loss(combined.clamp_min(torch.finfo(combined.dtype).tiny).log(), y)
    if method == "mean_logit":
        return F.cross_entropy(combined, y)
    return torch.full((), math.nan, device=combined.device)


def predict(population: Members, x: Tensor, method: str = "mean_prob", members: IndexLike | None = None) -> Tensor:
    """The combined prediction ``[B, C]`` of ``members`` (default all) on ``x`` (see :func:`combine`)."""
    _check_method(method)
    return combine(member_outputs(population, x, members), method)


@torch.no_grad()
def evaluate_ensemble(
    population: Members,
    data: Any,
    method: str = "mean_prob",
    members: IndexLike | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Ensemble ``{"loss", "accuracy"}`` over ``(x, y)``, a ``TensorSplit`` or a DataLoader."""
    _check_method(method)
    pop = _as_population(population)
    _subset_index(pop, members)
    return _combined_metrics(
        data, batch_size, pop.device, lambda x: predict(pop, x, method, members), lambda out, y: ensemble_loss(out, y, method)
    )


def _combined_metrics(
    data: Any, batch_size: int, device: torch.device, predict_fn: Callable[[Tensor], Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of one combined prediction ``predict_fn(x) -> [B, C]`` over ``data``.

    The prediction is a population of one for :func:`popvec.engine.accumulate_metrics` (outputs
    ``[1, B, C]``, loss ``[1]``): the same float64 sums as every other evaluation.
    """
    metrics = accumulate_metrics(
        iterate_batches(data, batch_size), lambda x: predict_fn(x).unsqueeze(0), lambda out, y: loss_fn(out[0], y).reshape(1), device
    )
    return {name: float(value[0]) for name, value in metrics.items()}


# --------------------------------------------------------------------------- fusion heads
class MeanFusion(nn.Module):
    """Mean over members ``[N, B, D] -> [B, D]``, then ``Linear(D, num_classes)`` when both sizes are given.

    On the members' outputs with no sizes it has no parameters: the fused prediction is the mean
    of the logits.
    """

    def __init__(self, in_features: int | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, num_classes) if in_features is not None and num_classes is not None else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        return self.head(z.mean(dim=0))


class ConcatFusion(nn.Module):
    """Concatenate the members' vectors ``[N, B, D] -> [B, N * D]``, then an MLP with one hidden layer."""

    def __init__(self, num_members: int, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_members * in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(z.permute(1, 0, 2).flatten(1))


class ProductFusion(nn.Module):
    """Element-wise product over members ``[N, B, D] -> [B, D]``, LayerNorm, then ``Linear(D, num_classes)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.norm(z.prod(dim=0)))


FUSIONS: tuple[str, ...] = ("mean", "concat", "product")


def make_fusion(name: str, num_members: int, in_features: int, num_classes: int, hidden: int = 128) -> nn.Module:
    """A fusion head by name: ``mean`` (plain mean when ``in_features == num_classes``), ``concat``, ``product``."""
    checks.choice("fusion", name, FUSIONS)
    if name == "mean":
        return MeanFusion() if in_features == num_classes else MeanFusion(in_features, num_classes)
    if name == "concat":
        return ConcatFusion(num_members, in_features, num_classes, hidden)
    return ProductFusion(in_features, num_classes)


# --------------------------------------------------------------------------- joint training
FeaturesFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


class _WithFeatures(nn.Module):
    """Wraps a model so that ``forward(x)`` returns ``features_fn(model, x)`` under functional_call."""

    def __init__(self, model: nn.Module, features_fn: FeaturesFn) -> None:
        super().__init__()
        self.model = model
        self.features_fn = features_fn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.features_fn(self.model, x)


def _last_linear(module: nn.Module) -> str:
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("features='penultimate' needs a model with an nn.Linear (its last one is the output layer)")
    return names[-1]


@dataclass
class JointLoss:
    """The parts of one joint objective (detached): total, fused, per member ``[N]``, distillation."""

    total: Tensor
    fused: Tensor
    members: Tensor
    distill: Tensor


class JointTrainer:
    """Train a population's members as experts together with a fusion head.

    ``features``: ``"outputs"`` (fuse the members' outputs), ``"penultimate"`` (fuse the input of
    the model's last ``nn.Linear``; the model must end with it), the name of any submodule (fuse
    that submodule's input), or a callable ``features_fn(model, x) -> (outputs, features)`` run
    on each member. ``fusion`` maps ``[N, B, D] -> [B, C]`` (see :func:`make_fusion`).

    ``member_optimizer`` is a popvec optimizer built on ``population`` (per-member learning rates,
    schedules and optional per-member clipping); ``head_optimizer`` a ``torch.optim`` optimizer
    over ``fusion.parameters()`` (None when the head has no parameters), ``head_scheduler`` an
    optional torch LR scheduler stepped after each head update. ``member_max_grad_norm`` and
    ``head_max_grad_norm`` clip each group's total gradient norm (``clip_grad_norm_`` over the
    group, as a plain module with two parameter groups would). With ``accumulation_steps=k`` each
    :meth:`step` adds ``1/k`` of its gradients and every k-th one updates (the mean over k batches).

    ``distill_weight > 0`` adds co-distillation: each member matches the detached ensemble
    prediction ``mean_i softmax(out_i / temperature)`` through ``T^2 * KL(ensemble || member)``.
    """

    def __init__(
        self,
        population: Population,
        fusion: nn.Module,
        member_optimizer: Any,
        head_optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        member_weight: float = 1.0,
        features: str | FeaturesFn = "outputs",
        distill_weight: float = 0.0,
        temperature: float = 1.0,
        accumulation_steps: int = 1,
        member_max_grad_norm: float | None = None,
        head_max_grad_norm: float | None = None,
        head_scheduler: Any | None = None,
    ) -> None:
        if not isinstance(fusion, nn.Module):
            raise TypeError(f"fusion must be an nn.Module (see make_fusion), got {type(fusion).__name__}")
        if getattr(member_optimizer, "population", None) is not population:
            raise ValueError("member_optimizer must be built on the population being trained")
        for name, value in (("member_weight", member_weight), ("distill_weight", distill_weight)):
            checks.number(name, value, 0.0)
        checks.number("temperature", temperature, 0.0, low_open=True)
        checks.integer("accumulation_steps", accumulation_steps)
        for name, norm in (("member_max_grad_norm", member_max_grad_norm), ("head_max_grad_norm", head_max_grad_norm)):
            checks.optional_number(name, norm, 0.0, low_open=True, allow_inf=True)
        head_params = [p for p in fusion.parameters() if p.requires_grad]
        if head_params and head_optimizer is None:
            raise ValueError("head_optimizer is required: the fusion head has trainable parameters")
        self.population = population
        self.fusion = fusion.to(population.device)
        self.member_optimizer = member_optimizer
        self.head_optimizer = head_optimizer
        self.head_scheduler = head_scheduler
        self.loss_fn = loss_fn
        self.member_weight = float(member_weight)
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.accumulation_steps = accumulation_steps
        self.member_max_grad_norm = member_max_grad_norm
        self.head_max_grad_norm = head_max_grad_norm
        self.features = features
        self._forward = self._build_forward(features)
        self._member_acc: dict[str, Tensor] | None = None
        self._head_acc: list[Tensor] | None = None
        self._micro = 0
        self.updates = 0

    # ------------------------------------------------------------------ forward
    def _build_forward(self, features: str | FeaturesFn) -> Callable[..., tuple[Tensor, Tensor]]:
        pop = self.population
        if callable(features):
            wrapper = _WithFeatures(pop.skeleton, features)

            def member(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
                prefixed = {f"model.{k}": v for k, v in {**params, **buffers}.items()}
                return functional_call(wrapper, prefixed, (x,))

            return member
        if not isinstance(features, str):
            raise TypeError(f"features must be 'outputs', 'penultimate', a submodule name or a callable; got {type(features).__name__}")
        if features == "outputs":
            fn = pop.functional()

            def member_out(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
                out = fn(params, buffers, x)
                return out, out

            return member_out
        skeleton = copy.deepcopy(pop.skeleton)  # our own copy: the hook must not touch the population's
        name = _last_linear(skeleton) if features == "penultimate" else features
        try:
            target = skeleton.get_submodule(name)
        except AttributeError:
            raise ValueError(f"features must be 'outputs', 'penultimate' or a submodule name of the model; got {features!r}") from None
        captured: list[Tensor] = []
        target.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

        def member_feat(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
            skeleton.train(pop.training)
            captured.clear()
            out = functional_call(skeleton, (params, buffers), (x,))
            return out, captured.pop()

        return member_feat

    def _member_pass(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        pop = self.population
        frozen = {k: v for k, v in pop.params.items() if k not in params}
        fn = vmap(self._forward, in_dims=(0, 0, None), randomness="different")
        return fn({**params, **frozen}, pop.buffers, x)

    def objective(self, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None) -> tuple[Tensor, JointLoss]:
        """The joint loss (a differentiable scalar) for one batch, and its detached parts.

        ``params`` are the members' trainable stacks to differentiate (default: the population's).
        """
        pop = self.population
        if params is None:
            params = {k: pop.params[k] for k in pop.trainable}
        x, y = x.to(pop.device), y.to(pop.device)
        outputs, feats = self._member_pass(params, x)
        member_losses = vmap(self.loss_fn, in_dims=(0, None))(outputs, y)
        fused_loss = self.loss_fn(self.fusion(feats), y)
        total = fused_loss + self.member_weight * member_losses.sum()
        distill = torch.zeros((), device=pop.device)
        if self.distill_weight > 0:
            t = self.temperature
            log_p = F.log_softmax(outputs / t, dim=-1)  # [N, B, C]
            target = F.softmax(outputs.detach() / t, dim=-1).mean(dim=0)  # [B, C]
            kl = (torch.xlogy(target, target) - target * log_p).sum(dim=-1).mean(dim=-1)  # [N]
            distill = kl.sum() * t * t
            total = total + self.distill_weight * distill
        parts = JointLoss(total.detach(), fused_loss.detach(), member_losses.detach(), distill.detach())
        return total, parts

    def gradients(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], list[Tensor], JointLoss]:
        """Gradients of the joint loss: members ``{name: [N, ...]}``, head (one per parameter), loss parts.

        Runs in train mode (BatchNorm statistics of every member update, as in a training step).
        """
        pop = self.population
        pop.train()
        self.fusion.train()
        params = {k: pop.params[k].detach().requires_grad_(True) for k in pop.trainable}
        head = [p for p in self.fusion.parameters() if p.requires_grad]
        with torch.enable_grad():
            total, parts = self.objective(x, y, params)
            grads = torch.autograd.grad(total, [*params.values(), *head], allow_unused=True)
        member_grads = {k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(params, grads)}
        head_grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(head, grads[len(params) :])]
        return member_grads, head_grads, parts

    # ------------------------------------------------------------------ training
    def step(self, x: Tensor, y: Tensor) -> JointLoss:
        """Add this batch's gradients; every ``accumulation_steps``-th call updates both groups."""
        member_grads, head_grads, parts = self.gradients(x, y)
        scale = 1.0 / self.accumulation_steps
        if self._member_acc is None:
            self._member_acc = {k: g * scale for k, g in member_grads.items()}
            self._head_acc = [g * scale for g in head_grads]
        else:
            for k, g in member_grads.items():
                self._member_acc[k].add_(g, alpha=scale)
            for acc, g in zip(self._head_acc or [], head_grads):
                acc.add_(g, alpha=scale)
        self._micro += 1
        if self._micro == self.accumulation_steps:
            self._apply()
        return parts

    @torch.no_grad()
    def _apply(self) -> None:
        member_grads, head_grads = self._member_acc or {}, self._head_acc or []
        self._member_acc, self._head_acc, self._micro = None, None, 0
        if self.member_max_grad_norm is not None:
            _clip_group(list(member_grads.values()), self.member_max_grad_norm)
        self.member_optimizer.step(member_grads)
        head = [p for p in self.fusion.parameters() if p.requires_grad]
        if head and self.head_optimizer is not None:
            for p, g in zip(head, head_grads):
                p.grad = g
            if self.head_max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(head, self.head_max_grad_norm)
            self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
            if self.head_scheduler is not None:
                self.head_scheduler.step()
        self.updates += 1

    # ------------------------------------------------------------------ inference and export
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The fused prediction ``[B, C]`` in eval mode (modes restored)."""
        pop = self.population
        was_pop, was_head = pop.training, self.fusion.training
        pop.eval()
        self.fusion.eval()
        try:
            params = {k: pop.params[k] for k in pop.trainable}
            _, feats = self._member_pass(params, x.to(pop.device))
            return self.fusion(feats)
        finally:
            pop.train(was_pop)
            self.fusion.train(was_head)

    @torch.no_grad()
    def evaluate(self, data: Any, batch_size: int = 1024) -> dict[str, float]:
        """Fused ``{"loss", "accuracy"}`` over ``(x, y)``, a ``TensorSplit`` or a DataLoader."""
        return _combined_metrics(data, batch_size, self.population.device, self.predict, self.loss_fn)

    def member_state_dicts(self) -> list[dict[str, Tensor]]:
        """Each member as a plain ``state_dict`` of the model class."""
        return [m.state_dict() for m in self.population.members()]

    def head_state_dict(self) -> dict[str, Tensor]:
        """The fusion head's plain ``state_dict``."""
        return {k: v.detach().clone() for k, v in self.fusion.state_dict().items()}


def _clip_group(grads: Iterable[Tensor], max_norm: float) -> Tensor:
    """``clip_grad_norm_`` over a whole group of gradients (all members together), in place."""
    grads = list(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return norm
