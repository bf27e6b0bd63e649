"""Training batch sources for the trainer: a cycling ``DataLoader`` or a :class:`DeviceLoader`.

A source hands out the next training batch, follows member selection (per-member orders), and
saves/restores its position so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from popvec.data import DeviceLoader

__all__ = ["BatchSource", "LoaderSource", "DeviceSource", "as_source"]


class BatchSource(Protocol):
    per_member: bool
    steps_per_epoch: int

    def next_batch(self) -> tuple[Tensor, Tensor]: ...

    def select(self, index: Tensor) -> None: ...

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

    def select(self, index: Tensor) -> None:
        if self.per_member:
            self.loader.select(index.cpu())

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

    def select(self, index: Tensor) -> None:
        """Shared batches: nothing depends on the members."""

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
