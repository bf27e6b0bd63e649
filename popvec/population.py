"""A population: N members of one architecture, stacked along a leading dimension.

Parameters and buffers live in dicts of ``[N, ...]`` tensors next to a skeleton module on the
``meta`` device. Every operation on members (train, evaluate, eliminate, copy) is an operation on
those stacks; :meth:`Population.member` turns one slice back into a plain ``nn.Module``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from popvec import checks, diagnose, memory

__all__ = ["Population", "as_index", "as_mask", "finite_members", "member_seeds"]

IndexLike = Tensor | Sequence[int]


def finite_members(stacks: Mapping[str, Tensor]) -> Tensor:
    """``[N]`` bools: which members have every floating value of ``stacks`` (name -> ``[N, ...]``) finite.

    One ``isfinite`` reduction per stack.
    """
    flags = [t.isfinite().flatten(1).all(1) for t in stacks.values() if t.is_floating_point()]
    if not flags:
        raise ValueError("no floating-point tensors to check")
    return torch.stack(flags).all(0)


def member_seeds(seed: int, n: int) -> list[int]:
    """The seed of each member of ``Population.from_factory(model_fn, n, seed)``: ``seed + i``."""
    return [seed + i for i in range(n)]


def as_index(indices: IndexLike, n: int, device: torch.device | str | None = None) -> Tensor:
    """Validate ``indices`` (ints in ``[0, n)``, at least one; no bools or floats) as an int64 tensor."""
    return checks.positions("indices", indices, n, device)


def as_mask(mask: Tensor | Sequence[bool], n: int, device: torch.device | str | None = None) -> Tensor:
    """Validate a per-member step mask (``[n]`` bools) and return it as a bool tensor on ``device``."""
    values = mask if isinstance(mask, Tensor) else torch.as_tensor(list(mask))
    if values.dtype != torch.bool:
        raise TypeError(f"mask must hold bools (one per member), got dtype {values.dtype}")
    if values.shape != (n,):
        raise ValueError(f"mask must have one entry per member (shape ({n},)), got shape {tuple(values.shape)}")
    return values.to(device)


def _named_tensors(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return dict(module.named_parameters()), dict(module.named_buffers())


def tie_groups(module: nn.Module) -> list[tuple[str, ...]]:
    """Names that share one tensor (tied weights such as ``head.weight = emb.weight``), first name first.

    ``named_parameters()`` lists a tied tensor once, under its first name; the population stacks it
    once under that name and keeps the tie in its skeleton and in exported members, so both uses
    train the one tensor exactly as in the torch model.
    """
    groups: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def retie(module: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Make every name of each group in ``groups`` refer to its first name's tensor again (in place).

    ``Module.to``/``to_empty`` convert each occurrence of a tied tensor separately and so untie it.
    """
    for first, *others in groups:
        shared = _get_tensor(module, first)
        for name in others:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr in owner._parameters:
                owner._parameters[attr] = shared  # type: ignore[assignment]
            else:
                owner._buffers[attr] = shared
    return module


def _signature(module: nn.Module) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
    params, buffers = _named_tensors(module)
    sig = [("param", k, tuple(v.shape), v.dtype) for k, v in params.items()]
    sig += [("buffer", k, tuple(v.shape), v.dtype) for k, v in buffers.items()]
    sig += [("tie", " = ".join(group), (), torch.bool) for group in tie_groups(module)]
    return sig


def architecture_mismatch(a: nn.Module, b: nn.Module) -> str | None:
    """Describe how two modules differ in architecture (class, names, shapes, dtypes), or None."""
    if type(a) is not type(b):
        return f"classes differ: {type(a).__name__} vs {type(b).__name__}"
    sa, sb = _signature(a), _signature(b)
    if sa == sb:
        return None
    for ea, eb in zip(sa, sb):
        if ea != eb:
            return f"{ea[0]} {ea[1]!r} {ea[2]} {ea[3]} vs {eb[0]} {eb[1]!r} {eb[2]} {eb[3]}"
    return f"{len(sa)} vs {len(sb)} parameters and buffers"


class Population:
    """N members of one architecture with stacked parameters and buffers.

    ``params[name]`` and ``buffers[name]`` are ``[N, *shape]`` tensors, contiguous with the member
    dimension first. ``ids`` are stable member ids: they survive reordering and a copy keeps its
    source's id (copies are told apart by position). The population is the stateful edge of the
    library; training math lives in pure functions (see :mod:`popvec.engine`).
    """

    def __init__(
        self,
        skeleton: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        ids: IndexLike | None = None,
        trainable: Sequence[str] | None = None,
    ) -> None:
        if not params:
            raise ValueError("params must hold at least one stacked parameter")
        sizes = {t.shape[0] for t in [*params.values(), *buffers.values()]}
        if len(sizes) != 1:
            raise ValueError(f"every stacked tensor must have the same leading size N, got sizes {sorted(sizes)}")
        self.skeleton = skeleton
        self.params = params
        self.buffers = buffers
        n = sizes.pop()
        self.ids = torch.arange(n) if ids is None else torch.as_tensor(ids, dtype=torch.long).clone()
        if self.ids.shape != (n,):
            raise ValueError(f"ids must have one entry per member ({n}), got shape {tuple(self.ids.shape)}")
        self.trainable = tuple(params if trainable is None else trainable)
        unknown = set(self.trainable) - set(params)
        if unknown:
            raise ValueError(f"trainable names unknown parameters: {sorted(unknown)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module]) -> Population:
        """Stack ``modules`` (same class, same parameter/buffer names, shapes and dtypes, same ties).

        Tied tensors (one tensor under several names, e.g. ``head.weight = emb.weight``) are stacked
        once, under their first name; the skeleton keeps the tie, so ``functional_call`` passes the
        one stacked tensor to every use and their gradients add up as in the torch model, and
        :meth:`member` exports the tie.
        """
        modules = list(modules)
        if not modules:
            raise ValueError("modules must hold at least one nn.Module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
            problem = architecture_mismatch(modules[0], m)
            if problem:
                raise ValueError(f"modules must share one architecture; modules[0] and modules[{i}] differ: {problem}")
        first_params, first_buffers = _named_tensors(modules[0])
        named = [_named_tensors(m) for m in modules]
        params = {k: torch.stack([p[k].detach() for p, _ in named]) for k in first_params}
        buffers = {k: torch.stack([b[k].detach() for _, b in named]) for k in first_buffers}
        trainable = [k for k, v in first_params.items() if v.requires_grad]
        ties = tie_groups(modules[0])
        param_names = {name for name, _ in modules[0].named_parameters(remove_duplicate=False)}
        mixed = [group for group in ties if len({name in param_names for name in group}) > 1]
        if mixed:
            raise ValueError(f"a tensor is both a parameter and a buffer (names {list(mixed[0])}): popvec cannot stack that tie")
        skeleton = retie(copy.deepcopy(modules[0]).to("meta"), ties)
        skeleton.train(modules[0].training)
        return cls(skeleton, params, buffers, trainable=trainable)

    @classmethod
    def from_factory(
        cls,
        model_fn: Callable[[], nn.Module],
        n: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        memory_check: bool = True,
    ) -> Population:
        """Build ``n`` members; member i is exactly ``torch.manual_seed(seed + i); model_fn()``.

        The global RNG is left as it was, so building a population does not disturb the caller's
        random stream. With ``memory_check`` (see :mod:`popvec.memory`), ``n`` is refused with a
        :class:`~popvec.memory.PopulationTooLarge` right after the first member is built when the
        members' parameters and buffers cannot fit (on the CPU while stacking, then on ``device``).
        """
        model_fn = checks.model_fn("model_fn", model_fn)
        n = checks.integer("n", n)
        seed = checks.seed("seed", seed, n)
        if device is not None:
            device = checks.device("device", device)
        modules = []
        with torch.random.fork_rng(devices=[]):
            for member_seed in member_seeds(seed, n):
                torch.manual_seed(member_seed)
                module = model_fn()
                if not isinstance(module, nn.Module):
                    raise checks.CheckTypeError(f"model_fn must return a new nn.Module, returned {type(module).__name__}")
                modules.append(module)
                if memory_check and len(modules) == 1:
                    memory.host_build_check(modules[0], n, device if device is not None else "cpu", what=f"n={n}")
        pop = cls.from_modules(modules)
        return pop.to(device) if device is not None else pop

    # ------------------------------------------------------------------ basic facts
    @property
    def n(self) -> int:
        """Number of members N."""
        return int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def training(self) -> bool:
        return self.skeleton.training

    def train(self, mode: bool = True) -> Population:
        """Set train/eval mode (dropout, BatchNorm) for every member."""
        self.skeleton.train(mode)
        return self

    def eval(self) -> Population:
        return self.train(False)

    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.skeleton.modules())

    def __repr__(self) -> str:
        count = sum(p[0].numel() for p in self.params.values())
        return f"Population({type(self.skeleton).__name__}, n={self.n}, params_per_member={count}, device={self.device})"

    # ------------------------------------------------------------------ selection
    def take(self, indices: IndexLike) -> Population:
        """A new population of members ``indices`` (keep/reorder/copy); this one is left as it is.

        The new population shares the skeleton and owns fresh ``[len(indices), ...]`` stacks.
        """
        index = as_index(indices, self.n, self.device)
        return Population(
            self.skeleton,
            {k: v.index_select(0, index) for k, v in self.params.items()},
            {k: v.index_select(0, index) for k, v in self.buffers.items()},
            ids=self.ids.index_select(0, index.cpu()),
            trainable=self.trainable,
        )

    def select(self, indices: IndexLike) -> Population:
        """Keep, reorder or copy members in place: member j becomes old member ``indices[j]``.

        Repeated indices copy a member (its id is repeated too). Returns ``self``.
        """
        taken = self.take(indices)
        self.params, self.buffers, self.ids = taken.params, taken.buffers, taken.ids
        return self

    def spawn(self, indices: IndexLike, copies: int = 2) -> Population:
        """Replace the population by ``copies`` consecutive copies of each member in ``indices``.

        ``[a, b]`` with ``copies=2`` gives ``[a, a, b, b]``. The copies then go their own way
        (their own data order, dropout masks, hyperparameters). With a trainer use
        ``trainer.select(spawn_indices(indices, copies, n))`` so optimizer state follows. Returns ``self``.
        """
        return self.select(spawn_indices(indices, copies, self.n))

    def repeat(self, copies: int) -> Population:
        """Every member ``copies`` times in a row (``spawn`` of all members). Returns ``self``."""
        return self.spawn(range(self.n), copies)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Population:
        """Move every stack to ``device`` and floating-point stacks to ``dtype``, in place."""

        if device is not None:
            device = checks.device("device", device)

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        self.params = {k: move(v) for k, v in self.params.items()}
        self.buffers = {k: move(v) for k, v in self.buffers.items()}
        return self

    # ------------------------------------------------------------------ members as modules
    def member(self, i: int) -> nn.Module:
        """Member ``i`` (a position) as a standalone ``nn.Module`` holding copies of its tensors."""
        (index,) = as_index([i], self.n).tolist()
        module = copy.deepcopy(self.skeleton)
        stacks = [*self.params.items(), *self.buffers.items()]
        for name, stack in stacks:  # the skeleton keeps its build dtype; stacks may since have moved (to(dtype=...))
            target = _get_tensor(module, name)
            if target.dtype != stack.dtype:
                target.data = target.data.to(stack.dtype)
        module = retie(module.to_empty(device=self.device), tie_groups(self.skeleton))
        with torch.no_grad():
            for name, stack in stacks:
                _get_tensor(module, name).copy_(stack[index])
        for name, param in module.named_parameters():
            param.requires_grad_(name in self.trainable)
        return module

    def members(self) -> list[nn.Module]:
        return [self.member(i) for i in range(self.n)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors only, so ``torch.load(weights_only=True)`` reads it back."""
        return {
            "params": dict(self.params),
            "buffers": dict(self.buffers),
            "ids": self.ids.clone(),
            "trainable": list(self.trainable),
            "training": self.training,
        }

    def load_state_dict(self, state: dict[str, Any]) -> Population:
        """Replace the stacks with ``state``'s (N may differ); names and per-member shapes must match."""
        keys = ("params", "buffers", "ids", "trainable", "training")
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise checks.InvalidArgument(f"state must be a Population.state_dict() with keys {', '.join(keys)}; got {got}")
        for kind in ("params", "buffers"):
            mine, theirs = getattr(self, kind), state[kind]
            if set(mine) != set(theirs):
                raise ValueError(f"state {kind} names differ: {sorted(set(mine) ^ set(theirs))}")
            for k, v in theirs.items():
                if v.shape[1:] != mine[k].shape[1:]:
                    raise ValueError(f"state {kind} {k!r} has member shape {tuple(v.shape[1:])}, expected {tuple(mine[k].shape[1:])}")
        device = self.device
        self.params = {k: v.to(device) for k, v in state["params"].items()}
        self.buffers = {k: v.to(device) for k, v in state["buffers"].items()}
        self.ids = state["ids"].clone().cpu()
        self.trainable = tuple(state["trainable"])
        self.train(state["training"])
        return self

    # ------------------------------------------------------------------ forward
    def functional(self) -> Callable[..., Any]:
        """``f(params, buffers, *args)``: one member's forward, for composing with vmap/grad."""
        skeleton = self.skeleton

        def forward(params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Any) -> Any:
            return functional_call(skeleton, (params, buffers), args)

        return forward

    def forward(
        self,
        x: Tensor,
        per_member: bool = False,
        member_chunk_size: int | None = None,
        *,
        chunk_size: int | None = None,
        randomness: str = "different",
    ) -> Tensor:
        """Outputs of every member: ``[N, B, ...]``.

        ``x`` is one shared batch ``[B, ...]`` (``per_member=False``) or one batch per member
        ``[N, B, ...]`` (``per_member=True``). In train mode BatchNorm running statistics of every
        member are updated in place; dropout draws an independent mask per member
        (``randomness="different"``) or one mask shared by all (``"same"``).
        ``member_chunk_size`` bounds how many members run at once (memory); ``chunk_size`` is its
        earlier name. Each member runs on its own copy of ``x``, so a forward that modifies its
        input in place neither changes ``x`` nor depends on the chunking. What vmap cannot batch
        raises a RuntimeError naming the module, the operation and a known fix.
        """
        check_batch(x, self.n, per_member, "x")
        check_placement(x, self, "x")
        chunk = member_chunk_size if member_chunk_size is not None else chunk_size
        fn = vmap(
            copying_inputs(self.functional()),
            in_dims=(0, 0, 0 if per_member else None),
            randomness=diagnose.check_randomness(randomness),
            chunk_size=chunk,
        )
        try:
            return fn(self.params, self.buffers, x)
        except (RuntimeError, NotImplementedError) as error:
            self.probe_member(x[0] if per_member else x)  # the input's fault, not vmap's: say so
            raise self._explained(error, "forward") from error

    def probe_member(self, x: Tensor, samples: int = 2) -> Tensor:
        """Member 0 alone (no vmap) on at most ``samples`` samples of ``x`` ``[B, ...]``; its outputs.

        Nothing is changed (buffers are copies, no autograd, the global RNG is restored). A failure
        here is the input's, not vmap's: raises :class:`popvec.checks.InvalidArgument` naming ``x``,
        its shape and dtype, and the model's error.
        """
        params = {k: v[0] for k, v in self.params.items()}
        buffers = {k: v[0].clone() for k, v in self.buffers.items()}
        devices = [x.device] if x.is_cuda else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                out: Tensor = functional_call(self.skeleton, (params, buffers), (x[:samples].clone(),))
                return out
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            raise checks.InvalidArgument(
                f"x of shape {tuple(x.shape)} and dtype {x.dtype} on {x.device} does not fit the model "
                f"({type(self.skeleton).__name__}, one member on one batch): {type(error).__name__}: {' '.join(str(error).split())}"
            ) from error

    def _explained(self, error: BaseException, stage: str) -> BaseException:
        """A RuntimeError for a vmap failure in ``stage``: the module that was running, the operation, a fix."""
        if isinstance(error, diagnose.VmapError):
            return error
        return diagnose.VmapError(diagnose.explain(error, diagnose.innermost_module(error, self.skeleton), stage))

    __call__ = forward

    # ------------------------------------------------------------------ shrink and perturb
    @torch.no_grad()
    def shrink_perturb(
        self,
        lam: float | Sequence[float] | Tensor,
        sigma: float | Sequence[float] | Tensor,
        seed: int | None = None,
        model_fn: Callable[[], nn.Module] | None = None,
    ) -> Population:
        """Shrink and perturb (Ash & Adams 2020) in place: ``w <- lam[i] * w + sigma[i] * noise_i``.

        ``lam`` and ``sigma`` are floats or one value per member (>= 0), so a lam x sigma sweep is
        one stack. ``noise_i`` is a fresh initialization of the same architecture: with
        ``model_fn`` it is exactly ``torch.manual_seed(seed + i); model_fn()`` (the parameters
        member i of ``Population.from_factory(model_fn, n, seed)`` would start from); without it,
        every submodule's ``reset_parameters()`` is run, in module order, on a materialized copy of
        the skeleton under ``torch.manual_seed(seed + i)`` (same distribution as a fresh build,
        and for the standard layers the same values; a parameter no ``reset_parameters`` covers
        raises, pass ``model_fn`` then). ``seed=None`` draws a seed from the global torch RNG.
        Only trainable parameters change; buffers (BatchNorm statistics) and frozen parameters are
        kept. One broadcasted in-place update per stacked tensor; the global RNG is restored.
        Returns ``self``.
        """
        n = self.n
        lam_v, sigma_v = checks.member_values("lam", lam, n, low=0.0), checks.member_values("sigma", sigma, n, low=0.0)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()))
        noise = self._fresh_init(seed, model_fn)
        for name in self.trainable:
            w = self.params[name]
            shape = (n, *([1] * (w.dim() - 1)))
            lam_b = lam_v.to(w.device, w.dtype).view(shape)
            sigma_b = sigma_v.to(w.device, w.dtype).view(shape)
            w.mul_(lam_b).addcmul_(noise[name].to(w.device, w.dtype), sigma_b)
        return self

    def _fresh_init(self, seed: int, model_fn: Callable[[], nn.Module] | None) -> dict[str, Tensor]:
        """Stacked trainable parameters of a fresh initialization: member i seeded with ``seed + i``."""
        if model_fn is not None:
            fresh = Population.from_factory(model_fn, self.n, seed)
            problem = architecture_mismatch(self.skeleton, fresh.skeleton)
            if problem:
                raise ValueError(f"model_fn must build the population's architecture: {problem}")
            return {k: fresh.params[k] for k in self.trainable}
        # Left untied on purpose: each layer's reset then draws what it drew when the model was built
        # (a tied model's constructor initializes both layers before tying them).
        module = copy.deepcopy(self.skeleton).to_empty(device="cpu")
        resets = [m for m in module.modules() if callable(getattr(m, "reset_parameters", None))]
        covered = {id(p) for m in resets for p in m.parameters(recurse=False)}
        missing = [k for k, p in module.named_parameters() if k in self.trainable and id(p) not in covered]
        if missing:
            raise ValueError(f"no reset_parameters() initializes {missing}: pass model_fn to shrink_perturb for the noise initialization")
        stacks: dict[str, list[Tensor]] = {k: [] for k in self.trainable}
        with torch.random.fork_rng(devices=[]):
            for member_seed in member_seeds(seed, self.n):
                torch.manual_seed(member_seed)
                for m in resets:
                    m.reset_parameters()  # type: ignore[operator]
                named = dict(module.named_parameters())
                for k in self.trainable:
                    stacks[k].append(named[k].detach().clone())
        return {k: torch.stack(v) for k, v in stacks.items()}


def copying_inputs(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` run on copies of its tensor arguments after the parameters and buffers.

    Under vmap with ``member_chunk_size`` a shared batch is passed to every chunk: a forward that
    modifies its input in place (``x.add_(1)``) would otherwise see the previous chunks' changes.
    """

    def run(params: dict[str, Tensor], buffers: dict[str, Tensor], *args: Any) -> Any:
        return forward(params, buffers, *(a.clone() if isinstance(a, Tensor) else a for a in args))

    return run


def spawn_indices(indices: IndexLike, copies: int, n: int) -> Tensor:
    """Positions selecting ``copies`` consecutive copies of each of ``indices`` (members of ``n``)."""
    copies = checks.integer("copies", copies)
    return as_index(list(indices) if not isinstance(indices, Tensor) else indices, n).repeat_interleave(copies)


def check_batch(x: Tensor, n: int, per_member: bool, name: str) -> None:
    """Raise if a per-member batch's leading dimension is not N, or the batch holds no sample."""
    if per_member and (x.dim() == 0 or x.shape[0] != n):
        raise ValueError(f"{name} must have leading dimension N={n} when per_member=True, got shape {tuple(x.shape)}")
    samples = 1 if per_member else 0
    if x.dim() <= samples or x.shape[samples] == 0:
        raise ValueError(f"{name} must hold at least one sample (shape [B, ...], or [N, B, ...] per member), got shape {tuple(x.shape)}")


def check_placement(x: Tensor, population: Population, name: str) -> None:
    """Raise if ``x`` is on another device than the population (metadata only: no host sync). A dtype
    the model cannot take is left to the forward, whose failure :meth:`Population.probe_member` names."""
    device = population.device
    if x.device != device:
        raise checks.InvalidArgument(
            f"{name} must be on the population's device {device}, got {x.device}; move it with {name}.to({str(device)!r})"
        )


def _get_tensor(module: nn.Module, name: str) -> Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return getattr(owner, attr)
