"""The population state: everything with a member dimension, kept in step in one place.

A :class:`PopulationState` owns the stacked parameters and buffers and the member ids (the
:class:`~popvec.population.Population`), the optimizer's state, step counts, per-member
hyperparameters and schedules (the optimizer), the per-member loss hyperparameters, which members
are active (the step mask), the fp16 loss scales, and the data order (a per-member batch source). ``select`` (in place)
and ``take`` (a new state) apply one index to all of it, and ``state_dict`` saves all of it, so a
new per-member field is added here once and no caller can forget to slice it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from popvec.loaders import BatchSource
from popvec.losses import LOSS_HPARAM_RANGES
from popvec.optim import HParam, Optimizer, as_member_values
from popvec.population import IndexLike, Population, as_index, as_mask
from popvec.precision import LossScaler

__all__ = ["PopulationState"]


class PopulationState:
    """Population, optimizer, loss hyperparameters, active mask and data order of N members.

    ``loss_hparams`` maps names to ``[N]`` tensors passed to the loss function per member (e.g.
    label smoothing). ``active`` is ``None`` (every member trains) or an ``[N]`` bool tensor:
    members marked False keep their parameters, buffers and optimizer state at every step. The
    batch ``source`` is attached when training starts (:meth:`attach_source`); a state restored
    from a checkpoint before that keeps the source's saved position until then. ``loss_scaler``
    (fp16 only): each member's dynamic loss scale (:class:`~popvec.precision.LossScaler`).
    """

    def __init__(
        self,
        population: Population,
        optimizer: Optimizer,
        loss_hparams: Mapping[str, HParam] | None = None,
        active: Tensor | None = None,
        loss_scaler: LossScaler | None = None,
    ) -> None:
        if optimizer.population is not population:
            raise ValueError("optimizer must be built on the same population the state holds")
        if loss_scaler is not None and loss_scaler.n != population.n:
            raise ValueError(f"loss_scaler must have one scale per member ({population.n}), got {loss_scaler.n}")
        self.loss_scaler = loss_scaler
        self.population = population
        self.optimizer = optimizer
        self.loss_hparams: dict[str, Tensor] = {
            name: as_member_values(name, values, population.n, population.device, **LOSS_HPARAM_RANGES.get(name, {}))
            for name, values in (loss_hparams or {}).items()
        }
        self.active = None if active is None else as_mask(active, population.n, population.device)
        self.source: BatchSource | None = None
        self._pending_source: dict[str, Any] | None = None

    # ------------------------------------------------------------------ facts
    @property
    def n(self) -> int:
        return self.population.n

    @property
    def ids(self) -> Tensor:
        return self.population.ids

    @property
    def device(self) -> torch.device:
        return self.population.device

    # ------------------------------------------------------------------ hyperparameters
    def hparams(self) -> dict[str, Tensor]:
        """Every per-member hyperparameter by name: the optimizer's and the loss function's (``[N]`` each)."""
        return {**self.optimizer.hparams, **self.loss_hparams}

    def set_hparam(self, name: str, values: HParam) -> None:
        """Replace hyperparameter ``name`` (a float or one value per member) of the optimizer or the loss."""
        if name in self.loss_hparams:
            self.loss_hparams[name] = as_member_values(name, values, self.n, self.device, **LOSS_HPARAM_RANGES.get(name, {}))
        elif name in self.optimizer.hparams:
            self.optimizer.set_hparam(name, values)
        else:
            raise ValueError(f"name must be one of {sorted(self.hparams())}, got {name!r}")

    # ------------------------------------------------------------------ the data order
    def attach_source(self, source: BatchSource) -> None:
        """Train from ``source`` from now on; a restored position (from :meth:`load_state_dict`) is applied to it."""
        if self._pending_source is not None:
            # Restore first: a resumed per-member loader takes its member count from the checkpoint.
            source.load_state_dict(self._pending_source)
            self._pending_source = None
        members = source.num_members
        if source.per_member and members != self.n:
            raise ValueError(f"a per-member DeviceLoader must have num_members equal to the population size {self.n}, got {members}")
        self.source = source

    # ------------------------------------------------------------------ selection
    def select(self, indices: IndexLike) -> PopulationState:
        """Keep, reorder or copy members in place: every per-member field follows. Returns ``self``."""
        index = as_index(indices, self.n, self.device)
        self.population.select(index)
        self.optimizer.select(index)
        self.loss_hparams = {name: values.index_select(0, index) for name, values in self.loss_hparams.items()}
        if self.active is not None:
            self.active = self.active.index_select(0, index)
        if self.loss_scaler is not None:
            self.loss_scaler.select(index)
        if self.source is not None:
            self.source.select(index)
        return self

    def take(self, indices: IndexLike) -> PopulationState:
        """A new state of members ``indices``; this one is left as it is (its tensors are not shared)."""
        index = as_index(indices, self.n, self.device)
        population = self.population.take(index)
        scaler = self.loss_scaler.take(index) if self.loss_scaler is not None else None
        taken = PopulationState(population, self.optimizer.take(index, population), loss_scaler=scaler)
        taken.loss_hparams = {name: values.index_select(0, index) for name, values in self.loss_hparams.items()}
        taken.active = None if self.active is None else self.active.index_select(0, index)
        if self.source is not None:
            taken.source = copy.copy(self.source).take(index)
        return taken

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and containers only (``torch.load(weights_only=True)`` reads it back)."""
        source = self.source.state_dict() if self.source is not None else self._pending_source
        return {
            "population": self.population.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_hparams": dict(self.loss_hparams),
            "active": self.active,
            "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            "source": source,
        }

    def load_state_dict(self, state: dict[str, Any]) -> PopulationState:
        """Restore every per-member field (N may differ from the current one)."""
        self.population.load_state_dict(state["population"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_hparams = {name: values.to(self.device) for name, values in state.get("loss_hparams", {}).items()}
        active = state.get("active")
        self.active = None if active is None else active.to(self.device)
        if self.loss_scaler is not None:  # fp16: the saved scales, or fresh ones for a state saved without
            saved = state.get("loss_scaler")
            if saved is not None:
                self.loss_scaler.load_state_dict(saved)
            else:
                self.loss_scaler.reset(self.n)
        if state.get("source") is not None:
            if self.source is not None:
                self.source.load_state_dict(state["source"])
            else:
                self._pending_source = state["source"]
        return self
