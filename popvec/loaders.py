"""Batch sampling for populations: device-resident orders, per-member orders, and batch sources.

A :class:`DeviceLoader` samples from a device-resident :class:`~popvec.data.TensorSplit`: a batch
is an index gather, so a training step makes no host-to-device copy. In per-member mode every
member draws its own seeded sample order and ``next_batch`` returns all members' batches stacked
as ``[N, B, ...]`` for a vmapped step. A *batch source* (:func:`as_source`) is what the trainer
draws from: it hands out the next batch, follows member selection (per-member orders), and
saves/restores its position so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from popvec import checks
from popvec.augment import Augment
from popvec.data import TensorSplit

__all__ = ["DeviceLoader", "iterate_batches", "BatchSource", "LoaderSource", "DeviceSource", "as_source"]


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> Tensor:
    """CPU ``[M]`` sample order for one (seed, epoch): a seeded permutation or ``arange``."""
    if not shuffle:
        return torch.arange(num_samples)
    # numpy's permutation is ~10x faster than torch.randperm on the CPU.
    rng = np.random.default_rng([seed % 2**64, epoch])
    return torch.from_numpy(rng.permutation(num_samples))


class DeviceLoader:
    """Endless batch sampler over a device-resident :class:`TensorSplit`.

    Shared mode (``num_members=None``): one order for everyone; ``next_batch()``
    returns ``x [B, ...], y [B]``. Per-member mode (``num_members=N``): member
    ``j`` has seed ``member_seeds[j]`` (initially ``seed + j``) and its order in
    epoch ``e`` is the permutation drawn by ``np.random.default_rng([seed_j, e])``,
    so it depends only on ``(member_seeds[j], e)``;
    ``next_batch()`` returns ``xs [N, B, ...], ys [N, B]``. Shared mode with seed
    ``s`` sees the same order as a member with seed ``s``. With ``shared_order=True``
    (needs ``num_members``) every member draws its samples from the one order of
    ``seed`` but batches are still per member, ``[N, B, ...]``: what per-member
    augmentation of a shared order needs.

    ``augment`` (an :class:`~popvec.augment.Augment`) augments every batch on the
    device. Each member has its own stream of draws, keyed like its order by its
    seed: in epoch ``e`` member ``j`` draws ``augment.draw(member_seeds[j], e, M)``,
    one row per sample slot of the epoch, so a member's augmentation depends only
    on ``(member_seeds[j], e)`` and follows the member through :meth:`select` (a
    copied member sees the same views as its source until one is reseeded) and
    :meth:`reseed`; a resumed loader recomputes it from the saved seeds and epoch.
    In shared mode the stream is that of ``seed``.

    The orders of the current epoch live on the split's device (``[M]`` or
    ``[N, M]`` int64); they are generated on the CPU and moved once per epoch,
    so a step is a pure on-device gather. After the last batch of an epoch the
    loader rolls into the next one (``epoch += 1``, ``position = 0``).
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        num_members: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        augment: Augment | None = None,
        shared_order: bool = False,
    ) -> None:
        num_samples = len(split)
        if num_samples < 1:
            raise ValueError("split must hold at least one sample")
        checks.integer("batch_size", batch_size)
        if drop_last and batch_size > num_samples:
            raise ValueError(f"batch_size must be <= len(split) = {num_samples} with drop_last; got {batch_size}")
        checks.optional_integer("num_members", num_members)
        if shared_order and num_members is None:
            raise ValueError("shared_order=True needs num_members=N (per-member batches of one shared order)")
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"augment must be a popvec.augment.Augment or None, got {type(augment).__name__}")
        if augment is not None and split.x.dim() != 4:
            raise ValueError(f"augment needs image samples [C, H, W]; this split's samples are {tuple(split.x.shape[1:])}")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.shared_order = shared_order
        self.steps_per_epoch = num_samples // batch_size if drop_last else -(-num_samples // batch_size)
        self.member_seeds: Tensor | None = None if num_members is None else seed + torch.arange(num_members, dtype=torch.int64)
        self.epoch = 0
        self.position = 0
        self._order = self._make_order(self.epoch)
        self._draws = self._make_draws(self.epoch)

    # -- properties --------------------------------------------------------- #
    @property
    def num_members(self) -> int | None:
        """Population size N in per-member mode, ``None`` in shared mode."""
        return None if self.member_seeds is None else self.member_seeds.numel()

    @property
    def num_samples(self) -> int:
        """Number of samples M in the split."""
        return len(self.split)

    @property
    def device(self) -> torch.device:
        """Device of the split, its orders and every batch."""
        return self.split.x.device

    @property
    def order(self) -> Tensor:
        """Current epoch's sample order: ``[M]`` (shared, or ``shared_order``) or ``[N, M]`` (per member)."""
        return self._order

    @property
    def draws(self) -> Tensor | None:
        """Current epoch's augmentation draws ``[M, 3]`` or ``[N, M, 3]`` (``int16``, on the device), or None."""
        return self._draws

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- sampling ----------------------------------------------------------- #
    def _make_order(self, epoch: int) -> Tensor:
        """Orders of ``epoch`` for the current seeds, on the device."""
        m, shuffle = self.num_samples, self.shuffle
        if self.member_seeds is None or self.shared_order:
            order = _epoch_order(m, self.seed, epoch, shuffle)
        else:
            seeds = self.member_seeds.tolist()
            order = torch.stack([_epoch_order(m, s, epoch, shuffle) for s in seeds])
        return order.to(self.device)

    def _make_draws(self, epoch: int) -> Tensor | None:
        """Augmentation draws of ``epoch`` for the current seeds, on the device (None without ``augment``)."""
        if self.augment is None:
            return None
        m = self.num_samples
        if self.member_seeds is None:
            return self.augment.draw(self.seed, epoch, m).to(self.device)
        return torch.stack([self.augment.draw(s, epoch, m) for s in self.member_seeds.tolist()]).to(self.device)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Next batch: ``(x [B, ...], y [B])`` or ``(xs [N, B, ...], ys [N, B])``.

        With ``drop_last=False`` the last batch of an epoch may be smaller.
        """
        start = self.position * self.batch_size
        idx = self._order[..., start : start + self.batch_size]
        flat = idx.reshape(-1)
        x = self.split.x.index_select(0, flat).view(*idx.shape, *self.split.x.shape[1:])
        y = self.split.y.index_select(0, flat).view(idx.shape)
        if self.augment is not None:
            assert self._draws is not None
            x = self.augment.apply(x, self._draws[..., start : start + idx.shape[-1], :])
        if self.shared_order:
            n = self.num_members
            assert n is not None
            if x.dim() == self.split.x.dim():  # not augmented: every member sees the same view
                x = x.expand(n, *x.shape)
            y = y.expand(n, -1)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._make_order(self.epoch)
            self._draws = self._make_draws(self.epoch)
        return x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the remaining batches of the current epoch (all of them at position 0)."""
        for _ in range(self.steps_per_epoch - self.position):
            yield self.next_batch()

    # -- population edits --------------------------------------------------- #
    def _member_positions(self, values: Tensor | Sequence[int], arg: str, method: str) -> Tensor:
        """``values`` as validated member positions (1-D int64 CPU tensor)."""
        if self.member_seeds is None:
            raise ValueError(f"{method}() needs per-member mode (num_members=N)")
        return checks.positions(arg, values, self.member_seeds.numel(), "cpu", allow_empty=True)

    def select(self, indices: Tensor | Sequence[int]) -> None:
        """Keep members ``indices`` in that order (new member ``i`` = old ``indices[i]``).

        Members may be dropped, reordered or repeated: seeds and current-epoch
        orders are copied, so a repeated member keeps seeing exactly the same
        batches as its source until one of them is :meth:`reseed`-ed.
        """
        idx = self._member_positions(indices, "indices", "select")
        if idx.numel() == 0:
            raise ValueError("indices must select at least one member")
        assert self.member_seeds is not None  # _member_positions refuses shared mode
        self.member_seeds = self.member_seeds.index_select(0, idx)
        if not self.shared_order:
            self._order = self._order.index_select(0, idx.to(self.device))
        if self._draws is not None:
            self._draws = self._draws.index_select(0, idx.to(self.device))

    def reseed(self, positions: Tensor | Sequence[int], seeds: Tensor | Sequence[int]) -> None:
        """Give members at ``positions`` the new ``seeds``, effective immediately.

        For each listed member the samples already drawn this epoch stay as they
        were; the samples it has not seen yet this epoch are reordered in the
        order they take in the new seed's permutation for this epoch. So each
        member still sees every sample once per epoch, at ``position == 0`` the
        member's order is exactly the new seed's, and from the next epoch on
        its order depends only on (new seed, epoch). Other members are untouched.
        With ``shared_order`` the order is everyone's and stays; with ``augment``
        the listed members draw the new seed's augmentation of this epoch from
        the next batch on.
        """
        pos = self._member_positions(positions, "positions", "reseed")
        new_seeds = checks.integers("seeds", seeds)
        if new_seeds.numel() != pos.numel():
            raise ValueError(f"seeds must have one entry per position; got {new_seeds.numel()} for {pos.numel()}")
        if pos.unique().numel() != pos.numel():
            raise ValueError(f"positions must not repeat; got {pos.tolist()}")
        if not self.shared_order:
            seen = self.position * self.batch_size
            order = self._order.to("cpu", copy=True)
            for p, s in zip(pos.tolist(), new_seeds.tolist()):
                fresh = _epoch_order(self.num_samples, s, self.epoch, self.shuffle)
                unseen = torch.ones(self.num_samples, dtype=torch.bool)
                unseen[order[p, :seen]] = False
                order[p, seen:] = fresh[unseen[fresh]]
            self._order = order.to(self.device)
        assert self.member_seeds is not None  # _member_positions refuses shared mode
        self.member_seeds = self.member_seeds.clone()
        self.member_seeds[pos] = new_seeds
        self._draws = self._make_draws(self.epoch)

    # -- checkpointing ------------------------------------------------------ #
    def state_dict(self) -> dict[str, Any]:
        """Sampling state as plain ints, bools and CPU tensors (``weights_only``-loadable)."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "shared_order": self.shared_order,
            "augment": None if self.augment is None else self.augment.config(),
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "member_seeds": None if self.member_seeds is None else self.member_seeds.clone(),
            "order": self._order.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next batches equal the saved loader's.

        The split, batch size, shuffle, drop_last, shared_order and augment settings and
        the mode (shared / per member) must match; the number of members comes from
        ``state``. Augmentation draws are recomputed from the restored seeds and epoch.
        """
        mine_now = {"shared_order": self.shared_order, "augment": None if self.augment is None else self.augment.config()}
        for key in ("num_samples", "batch_size", "shuffle", "drop_last", "shared_order", "augment"):
            theirs = state.get(key, {"shared_order": False, "augment": None}.get(key))
            mine = mine_now[key] if key in mine_now else getattr(self, key)
            if theirs != mine:
                raise ValueError(f"state {key}={theirs} does not match this loader's {mine}")
        if (state["member_seeds"] is None) != (self.member_seeds is None):
            raise ValueError("state and loader differ in mode (shared vs. per-member)")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        seeds = state["member_seeds"]
        self.member_seeds = None if seeds is None else seeds.clone().long()
        self._order = state["order"].to(self.device, torch.int64)
        self._draws = self._make_draws(self.epoch)


# --------------------------------------------------------------------------- #
# Evaluation batches
# --------------------------------------------------------------------------- #
def iterate_batches(
    data: TensorSplit | tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    batch_size: int = 1024,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Evaluation batches ``(x [b, ...], y [b])`` in order, last partial batch included.

    ``data`` is a :class:`TensorSplit`, an ``(x, y)`` tuple of tensors (sliced
    into views of ``batch_size``) or any iterable of ``(x, y)`` batches such as
    a ``DataLoader`` (passed through unchanged).
    """
    checks.integer("batch_size", batch_size)
    if isinstance(data, TensorSplit):
        data = (data.x, data.y)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
        x, y = data[0], data[1]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        return zip(x.split(batch_size), y.split(batch_size))
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a TensorSplit, an (x, y) tuple of tensors or an iterable of (x, y) batches; got {type(data).__name__}"
        )
    return iter(data)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Batch sources (what the trainer draws from)
# --------------------------------------------------------------------------- #
class BatchSource(Protocol):
    """Where the trainer's batches come from: shared batches, or one batch per member (``[N, B, ...]``)."""

    per_member: bool
    steps_per_epoch: int

    @property
    def num_members(self) -> int | None:
        """N for per-member batches, None for shared ones."""
        ...

    def next_batch(self) -> tuple[Tensor, Tensor]: ...

    def select(self, index: Tensor) -> None:
        """Follow a member selection in place (per-member orders are kept, reordered or copied)."""
        ...

    def take(self, index: Tensor) -> BatchSource:
        """Called on a shallow copy of the source: follow ``index`` without touching the original."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DeviceSource:
    """A :class:`DeviceLoader`: shared batches, or per-member batches when it has members."""

    def __init__(self, loader: DeviceLoader) -> None:
        self.loader = loader
        self.per_member = loader.num_members is not None
        self.steps_per_epoch = loader.steps_per_epoch

    def next_batch(self) -> tuple[Tensor, Tensor]:
        return self.loader.next_batch()

    @property
    def num_members(self) -> int | None:
        return self.loader.num_members

    def select(self, index: Tensor) -> None:
        if self.per_member:
            self.loader.select(index.cpu())

    def take(self, index: Tensor) -> DeviceSource:
        self.loader = copy.copy(self.loader)  # DeviceLoader.select replaces its tensors: the original keeps its own
        self.select(index)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class LoaderSource:
    """Any re-iterable of shared ``(x, y)`` batches (e.g. a ``DataLoader``), cycled epoch after epoch.

    To resume mid-epoch exactly, the global torch RNG state at the start of the epoch is kept (a
    shuffling ``DataLoader`` draws its order from it when the epoch's iterator is created); resuming
    recreates that iterator and skips the batches already used.
    """

    per_member = False

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.steps_per_epoch = len(loader)  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ValueError("train_loader must yield at least one batch per epoch")
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator[tuple[Tensor, Tensor]] | None = None
        self._epoch_rng: Tensor | None = None

    def _start_epoch(self) -> None:
        self._epoch_rng = torch.get_rng_state()
        self._iterator = iter(self.loader)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._iterator is None:
            self._start_epoch()
        assert self._iterator is not None
        try:
            x, y = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            x, y = next(self._iterator)
        self.position += 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    num_members = None

    def select(self, index: Tensor) -> None:
        """Shared batches: nothing depends on the members."""

    def take(self, index: Tensor) -> LoaderSource:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._epoch_rng, self._iterator = state["epoch_rng"], None
        if self._epoch_rng is None:
            return
        # A shuffling DataLoader draws its base seed when the iterator is made and its sampler's
        # seed at the first batch, both from the global RNG: replay both under the epoch's state.
        current = torch.get_rng_state()
        torch.set_rng_state(self._epoch_rng)
        try:
            self._iterator = iter(self.loader)
            for _ in range(self.position):
                next(self._iterator)
        finally:
            torch.set_rng_state(current)


def as_source(train_data: Any, device: torch.device) -> BatchSource:
    """Wrap ``train_data`` (a :class:`DeviceLoader` or an iterable of batches with ``len``)."""
    if isinstance(train_data, DeviceLoader):
        return DeviceSource(train_data)
    if isinstance(train_data, Iterable) and hasattr(train_data, "__len__"):
        return LoaderSource(train_data, device)
    raise TypeError(
        f"train data must be a popvec.data.DeviceLoader or a DataLoader-like iterable with len(), got {type(train_data).__name__}"
    )
