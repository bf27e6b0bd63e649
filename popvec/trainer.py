"""Trainers: the loop around the pure step, with evaluation cadence, selection, history, checkpoints.

``PopulationTrainer`` trains a population and applies any :class:`~popvec.selection.SelectionPolicy`;
``MultipleInitializationsTrainer`` is the seed-compatible progressive elimination of N random
initializations built on it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from popvec import checks, memory, optim
from popvec.callbacks import Callback, ConsoleReporter
from popvec.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from popvec.engine import LossFn, TrainStep, evaluate
from popvec.loaders import DeviceLoader, as_source
from popvec.population import IndexLike, Population, as_index, as_mask, finite_members
from popvec.precision import LossScaler, check_precision
from popvec.selection import Decision, MetricsTable, SelectionPolicy, SuccessiveHalving, as_decision, check_reduce_factor
from popvec.state import PopulationState

__all__ = ["PopulationTrainer", "MultipleInitializationsTrainer", "CHECKPOINT_NAME", "AllDiverged", "finite_members", "divergence_of"]

CHECKPOINT_NAME = "checkpoint.pt"


class AllDiverged(RuntimeError):
    """No member of a run stayed finite: there is no winner to return or save.

    ``diverged``: ``{member_id: {"step": S, "reason": "loss nan"}}`` as recorded by the trainer;
    ``total``: how many members the run started with.
    """

    def __init__(self, diverged: Mapping[int, Mapping[str, Any]], total: int) -> None:
        self.diverged = {int(k): dict(v) for k, v in diverged.items()}
        self.total = total
        first = min(self.diverged.values(), key=lambda d: d["step"], default=None)
        where = f" (first at step {first['step']}: {first['reason']})" if first is not None else ""
        n = len(self.diverged)
        count = f"all {total} diverged" if n >= total else f"{n} of {total} diverged, the rest were eliminated"
        super().__init__(f"no member stayed finite: {count}{where}")


def divergence_of(history: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The diverged members of a trainer's (or a search's) ``history``: ``{id: {"step", "reason"}}``.

    Read from ``history["diverged"]`` when present, else from the ``diverged`` round rows.
    """
    if history.get("diverged"):
        return {int(k): dict(v) for k, v in history["diverged"].items()}
    found: dict[int, dict[str, Any]] = {}
    for record in history.get("rounds", []):
        for row in record.get("members", []):
            if row.get("diverged") and int(row["id"]) not in found:
                found[int(row["id"])] = {"step": row.get("diverged_step", record.get("step")), "reason": row.get("diverged_reason", "")}
    return found


class PopulationTrainer:
    """Trains a population with one vmapped step per batch and applies selection decisions.

    Everything per member lives in one :class:`~popvec.state.PopulationState` (``trainer.state``):
    parameters, buffers, optimizer state, hyperparameters, the active mask and the data order; a
    selection slices all of it at once. ``history`` holds one record per decision round (per member
    id: train loss, validation loss and accuracy, kept or not) and the cost of the run (member-steps
    spent vs training every initial member for the whole budget). The loop prints nothing: progress
    and tables come from ``callbacks`` (default: one :class:`~popvec.callbacks.ConsoleReporter` on
    ``console``, its live bar shown when ``progress``). ``randomness`` is vmap's (``"different"``:
    independent dropout masks per member; ``"same"``: shared masks, needed by in-place random draws
    such as stochastic depth); the first step of each batch shape is preflighted for a clear error.
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) applies to training and evaluation (see
    :mod:`popvec.precision`); with fp16 each member's loss scale is part of the state
    (``trainer.state.loss_scaler``), and a step it skipped on overflow is not a divergence.
    """

    def __init__(
        self,
        population: Population,
        optimizer: optim.Optimizer,
        loss_fn: LossFn = F.cross_entropy,
        compile: bool = False,
        eval_batch_size: int = 1024,
        console: Console | None = None,
        progress: bool = True,
        cuda_graph: bool | None = None,
        member_chunk_size: int | str | None = None,
        loss_hparams: Mapping[str, optim.HParam] | None = None,
        callbacks: Sequence[Callback] | None = None,
        randomness: str = "different",
        precision: str = "fp32",
    ) -> None:
        self.precision = check_precision(precision)
        scaler = LossScaler(population.n, population.device) if self.precision == "fp16" else None
        self.state = PopulationState(population, optimizer, loss_hparams, loss_scaler=scaler)
        self.loss_fn = loss_fn
        self.eval_batch_size = checks.integer("eval_batch_size", eval_batch_size)
        self.console = console or Console()
        self.callbacks: list[Callback] = list(callbacks) if callbacks is not None else [ConsoleReporter(self.console, progress)]
        self._train_step = TrainStep(
            population, optimizer, loss_fn, compile, cuda_graph, member_chunk_size, randomness, self.precision, scaler
        )
        self.global_step = 0
        self.member_steps = 0
        self.samples_seen = 0
        self.wall_time = 0.0
        self.initial_n = population.n
        self.history: dict[str, Any] = {"rounds": [], "cost": {}, "diverged": {}}
        # Training loss summed since the last decision (saved in checkpoints, so a resumed round reports the same).
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        # Each position's first step with a non-finite training loss since the last decision (-1: none); kept
        # on the device and updated without a host sync, read at decisions.
        self._bad_step: Tensor | None = None
        self._bad_loss: Tensor | None = None
        self._policy: SelectionPolicy | None = None
        self._fit_callbacks: list[Callback] = []
        self._pending_extra: dict[str, Any] = {}

    # ------------------------------------------------------------------ the state's parts
    @property
    def population(self) -> Population:
        return self.state.population

    @property
    def optimizer(self) -> optim.Optimizer:
        return self.state.optimizer

    @property
    def loss_hparams(self) -> dict[str, Tensor]:
        """Per-member loss hyperparameters (``[N]`` tensors), passed to ``loss_fn`` as keywords."""
        return self.state.loss_hparams

    @property
    def last_grad_norm(self) -> Tensor | None:
        """Each member's gradient norm at the last step (``[N]``) when the optimizer clips, else None."""
        return self._train_step.last_grad_norm

    def hparams(self) -> dict[str, Tensor]:
        """Every per-member hyperparameter by name: the optimizer's and the loss function's (``[N]`` each)."""
        return self.state.hparams()

    def set_hparam(self, name: str, values: optim.HParam) -> None:
        """Replace hyperparameter ``name`` (a float or one value per member) of the optimizer or the loss."""
        self.state.set_hparam(name, values)

    # ------------------------------------------------------------------ primitives
    def step(self, x: Tensor, y: Tensor, per_member: bool = False, mask: Tensor | None = None) -> Tensor:
        """One update of every member on ``x``: ``[B, ...]`` shared or ``[N, B, ...]``; losses ``[N]``.

        ``mask`` (``[N]`` bools): only members marked True update; the others stay exactly as they
        were (parameters, buffers, optimizer state); the cost counters count the active ones.
        """
        if mask is None:
            losses = self._train_step(x, y, per_member, loss_hparams=self.state.loss_hparams)
            active = self.population.n
        else:
            mask = as_mask(mask, self.population.n, self.population.device)
            losses = self._train_step(x, y, per_member, mask=mask, loss_hparams=self.state.loss_hparams)
            active = int(mask.sum())
        self.global_step += 1
        self.member_steps += active
        self.samples_seen += active * int(y.shape[-1])
        return losses

    def evaluate(self, data: Any, y: Tensor | None = None, batch_size: int | None = None) -> dict[str, Tensor]:
        """Per-member ``{"loss": [N], "accuracy": [N]}`` over ``(x, y)``, a split, or a DataLoader."""
        if y is not None:
            data = (data, y)
        batch = self.eval_batch_size if batch_size is None else checks.integer("batch_size", batch_size)
        return evaluate(self.population, data, self.loss_fn, batch, precision=self.precision)

    def select(self, indices: IndexLike) -> None:
        """Keep, reorder or copy members: every per-member field of the state follows (one index)."""
        index = as_index(indices, self.population.n, self.population.device)
        self.state.select(index)
        if self._loss_sum is not None:
            self._loss_sum = self._loss_sum.index_select(0, index)
        if self._bad_step is not None and self._bad_loss is not None:
            self._bad_step = self._bad_step.index_select(0, index)
            self._bad_loss = self._bad_loss.index_select(0, index)
        self._train_step.grad_norm_max = None

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        train_data: Any,
        val_data: Any,
        steps: int,
        policy: SelectionPolicy | None = None,
        checkpoint_path: str | Path | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_every: int | None = None,
    ) -> dict[str, Any]:
        """Train until global step ``steps``, consulting ``policy`` at the steps it asks for.

        ``train_data`` is a DataLoader-like iterable (shared batches) or a ``DeviceLoader``
        (shared, or per-member orders). At each decision the members are evaluated on
        ``val_data``, the policy's answer is applied to the whole state (a :class:`Decision` may
        also set hyperparameters and which members stay active), the round is recorded in
        ``history`` and handed to the callbacks, then checkpointed (with ``checkpoint_path``; the
        checkpoint holds the callbacks' state), then passed to ``on_round(record)``.
        ``checkpoint_every``: also checkpoint every that many steps between decisions. Training
        ends early when a decision leaves no member active. A trainer restored with
        :meth:`load_checkpoint` continues exactly where the checkpoint was taken.
        """
        checks.integer("steps", steps, 0)
        checks.optional_integer("checkpoint_every", checkpoint_every, 1)
        source = as_source(train_data, self.population.device)
        self.state.attach_source(source)
        self._attach_policy(policy)
        callbacks = list(self.callbacks)
        self._load_callback_states(callbacks)
        self._fit_callbacks = callbacks
        started = time.perf_counter() - self.wall_time
        for callback in callbacks:
            callback.on_fit_start(self, steps)
        try:
            while self.global_step < steps and self._any_active():
                if getattr(policy, "needs_grad_norm", False):
                    self._train_step.track_grad_norm = True
                decision = policy.next_decision(self.global_step, self.population.n) if policy is not None else None
                stop = steps if decision is None else min(decision, steps)
                for callback in callbacks:
                    callback.on_segment(self, stop - self.global_step)
                if self._loss_sum is None:
                    self._loss_sum, self._loss_count = torch.zeros(self.population.n, device=self.population.device), 0
                self._reset_bad_steps(keep=True)
                while self.global_step < stop:
                    x, y = source.next_batch()
                    losses = self.step(x, y, source.per_member, mask=self.state.active)
                    self._loss_sum += losses
                    self._loss_count += 1
                    self._note_bad_losses(losses)
                    for callback in callbacks:
                        callback.on_step(self, losses)
                    if (
                        checkpoint_path is not None
                        and checkpoint_every
                        and self.global_step % checkpoint_every == 0
                        and self.global_step < stop
                    ):
                        self.wall_time = time.perf_counter() - started
                        self.save_checkpoint(checkpoint_path)
                if decision is not None and self.global_step == decision:
                    assert policy is not None
                    record = self._decide(policy, val_data, self._loss_sum / max(self._loss_count, 1))
                    self._loss_sum = None
                    self._reset_bad_steps()
                    self.wall_time = time.perf_counter() - started
                    for callback in callbacks:  # before the checkpoint, which then holds what they recorded
                        callback.on_round(self, record)
                    if checkpoint_path is not None:
                        self.save_checkpoint(checkpoint_path)
                    if on_round is not None:
                        on_round(record)
            self.wall_time = time.perf_counter() - started
            self.check_divergence()  # after the last decision too: the survivors' last segment
            self._record_cost(steps)
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
        finally:
            for callback in callbacks:
                callback.on_fit_end(self)
        return self.history

    # ------------------------------------------------------------------ divergence
    def _reset_bad_steps(self, keep: bool = False) -> None:
        n, device = self.population.n, self.population.device
        if keep and self._bad_step is not None and self._bad_step.shape[0] == n:
            return
        self._bad_step = torch.full((n,), -1, dtype=torch.long, device=device)
        self._bad_loss = torch.zeros(n, device=device)

    def _note_bad_losses(self, losses: Tensor) -> None:
        """Record (on the device, no sync) the first step at which each member's loss is not finite."""
        assert self._bad_step is not None and self._bad_loss is not None
        first = (self._bad_step < 0) & ~torch.isfinite(losses)
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_loss = torch.where(first, losses.detach().to(self._bad_loss.dtype), self._bad_loss)

    def check_divergence(self, val_loss: Sequence[float] | None = None) -> Tensor:
        """Mark the members whose training loss or weights became non-finite; ``[N]`` bools (True: diverged).

        Newly diverged members are recorded in ``history["diverged"]`` by id (the step and the reason:
        ``"loss nan"``, ``"loss inf"``, ``"weights not finite"`` or, given each member's ``val_loss``
        on clean data, ``"val loss nan"``/``"val loss inf"`` for finite weights whose outputs overflow). Cheap: the steps'
        losses were tracked on the device, and the parameters cost one ``isfinite`` reduction per stack.
        """
        n = self.population.n
        bad_weights = ~finite_members(self.population.params)
        bad_steps = self._bad_step if self._bad_step is not None and self._bad_step.shape[0] == n else None
        bad_loss = bad_steps >= 0 if bad_steps is not None else torch.zeros_like(bad_weights)
        vals = list(val_loss) if val_loss is not None else [0.0] * n
        bad_val = torch.tensor([not math.isfinite(v) for v in vals], dtype=torch.bool)
        diverged = bad_weights | bad_loss | bad_val.to(bad_weights.device)
        recorded = self.history.setdefault("diverged", {})
        if bool(diverged.any()):
            ids = self.population.ids.tolist()
            steps = bad_steps.tolist() if bad_steps is not None else [-1] * n
            values = self._bad_loss.tolist() if self._bad_loss is not None and bad_steps is not None else [0.0] * n
            for p in diverged.nonzero().flatten().tolist():
                key = str(ids[p])
                if steps[p] >= 0:
                    entry = {"step": int(steps[p]), "reason": f"loss {values[p]}"}
                elif bad_weights[p]:
                    entry = {"step": self.global_step, "reason": "weights not finite"}
                else:
                    entry = {"step": self.global_step, "reason": f"val loss {vals[p]}"}
                recorded.setdefault(key, entry)
        return diverged

    def _any_active(self) -> bool:
        return self.state.active is None or bool(self.state.active.any())

    def metrics_table(self, val_data: Any, train_loss: Tensor | None = None) -> MetricsTable:
        """Evaluate every member on ``val_data``: a table with val_loss, val_accuracy (and train_loss).

        ``val_data=None`` evaluates nothing (for policies that decide on the step alone).
        """
        columns: dict[str, list[float]] = {}
        if val_data is not None:
            metrics = self.evaluate(val_data)
            columns = {"val_loss": metrics["loss"].tolist(), "val_accuracy": metrics["accuracy"].tolist()}
        if train_loss is not None:
            columns = {"train_loss": train_loss.tolist(), **columns}
        if self._train_step.track_grad_norm and self._train_step.grad_norm_max is not None:
            columns["grad_norm_max"] = self._train_step.grad_norm_max.tolist()  # since the last decision
            self._train_step.grad_norm_max = None
        hparams = {k: v.tolist() for k, v in self.hparams().items()}
        return MetricsTable(self.population.ids.tolist(), columns, step=self.global_step, hparams=hparams)

    def checked_table(self, val_data: Any, train_loss: Tensor | None = None) -> MetricsTable:
        """:meth:`metrics_table` with divergence applied: diverged members' metrics NaN, a ``diverged`` column."""
        table = self.metrics_table(val_data, train_loss)  # the data were checked finite: a NaN loss is the member's
        self._mark_diverged(table, self.check_divergence(table.columns.get("val_loss")))
        return table

    def _mark_diverged(self, table: MetricsTable, diverged: Tensor) -> None:
        """A diverged member's metrics become NaN (so every ranking puts it last) and ``diverged`` is 1.0."""
        flags = diverged.tolist()
        for name, values in table.columns.items():
            if name != "grad_norm_max":
                table.columns[name] = [math.nan if bad else v for v, bad in zip(values, flags)]
        table.columns["diverged"] = [1.0 if bad else 0.0 for bad in flags]

    def _decide(self, policy: SelectionPolicy, val_data: Any, train_loss: Tensor) -> dict[str, Any]:
        table = self.checked_table(val_data, train_loss)
        # A metric that is NaN for every member ranks nobody: say so rather than keep by id order silently.
        all_nan = [k for k, v in table.columns.items() if k != "diverged" and v and all(math.isnan(x) for x in v)]
        answer = policy.decide(table)
        decision = as_decision(answer)
        keep = decision.keep
        kept = set(keep)
        record: dict[str, Any] = {
            "round": len(self.history["rounds"]) + 1,
            "step": self.global_step,
            "members": [{**row, "kept": p in kept} for p, row in enumerate(table.rows())],
            "kept_ids": [table.ids[p] for p in keep],
            "member_steps": self.member_steps,
        }
        recorded = self.history.get("diverged", {})
        for row in record["members"]:
            row["diverged"] = bool(row.pop("diverged"))
            if row["diverged"] and str(row["id"]) in recorded:
                row["diverged_step"] = recorded[str(row["id"])]["step"]
                row["diverged_reason"] = recorded[str(row["id"])]["reason"]
        if all_nan:
            record["all_nan"] = all_nan
            warnings.warn(
                f"step {self.global_step}: {', '.join(all_nan)} is NaN for every member; the members kept were not chosen on it",
                RuntimeWarning,
                stacklevel=2,
            )
        if isinstance(answer, Decision):  # the richer answer: hyperparameters, reasons and events are recorded
            for p, row in enumerate(record["members"]):
                row["hparams"] = {k: v[p] for k, v in table.hparams.items()}
                if table.ids[p] in decision.reasons and not row["kept"]:
                    row["reason"] = decision.reasons[table.ids[p]]
            record["events"] = decision.events
        self.history["rounds"].append(record)
        self.select(keep)
        self.apply_decision(decision)
        if isinstance(answer, Decision):
            record["kept_ids"] = self.population.ids.tolist()
            record["hparams_after"] = {k: v.tolist() for k, v in self.hparams().items()}
            if decision.active is not None:
                record["active_ids"] = [i for i, a in zip(record["kept_ids"], decision.active) if a]
        return record

    def apply_decision(self, decision: Decision) -> None:
        """After ``select(decision.keep)``: set the new positions' ids, hyperparameters and active mask."""
        if decision.ids is not None:
            self.population.ids = torch.as_tensor(decision.ids, dtype=torch.long)
        for name, updates in decision.hparams.items():
            if updates:
                values = self.hparams()[name].detach().cpu().clone()
                for position, value in updates.items():
                    values[position] = value
                self.set_hparam(name, values)
        if decision.active is not None:
            self.state.active = as_mask(decision.active, self.population.n, self.population.device)

    def _record_cost(self, steps: int) -> None:
        naive = self.initial_n * steps
        self.history["cost"] = {
            "member_steps": self.member_steps,
            "naive_member_steps": naive,
            "fraction_of_naive": self.member_steps / naive if naive else 0.0,
            "samples_seen": self.samples_seen,
            "wall_time_s": self.wall_time,
            "global_steps": self.global_step,
        }

    # ------------------------------------------------------------------ checkpoints
    def _attach_policy(self, policy: SelectionPolicy | None) -> None:
        self._policy = policy
        pending = self._pending_extra.pop("policy", None)
        if pending is not None and policy is not None and hasattr(policy, "load_state_dict"):
            policy.load_state_dict(pending)

    def _load_callback_states(self, callbacks: Sequence[Callback]) -> None:
        pending = self._pending_extra.pop("callbacks", None) or {}
        for key, callback in _stateful(callbacks).items():
            if key in pending:
                callback.load_state_dict(pending[key])  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        """Everything a run needs to continue exactly: the population state, counters, history, RNG, the
        policy's and the callbacks' own state."""
        policy = self._policy
        return {
            "state": self.state.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "policy": policy.state_dict() if policy is not None and hasattr(policy, "state_dict") else None,
            "callbacks": {key: cb.state_dict() for key, cb in _stateful(self._fit_callbacks or self.callbacks).items()},  # type: ignore[attr-defined]
            "round_loss": None
            if self._loss_sum is None
            else {"sum": self._loss_sum, "count": self._loss_count, "bad_step": self._bad_step, "bad_loss": self._bad_loss},
            "counters": {
                "global_step": self.global_step,
                "member_steps": self.member_steps,
                "samples_seen": self.samples_seen,
                "wall_time": self.wall_time,
                "initial_n": self.initial_n,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the policy's and callbacks' parts are applied when ``fit`` starts."""
        if "state" not in state:  # a checkpoint of popvec 0.1.0, before the state object
            state = {**state, "state": {k: state.get(k) for k in ("population", "optimizer", "loss_hparams", "source")}}
        self.state.load_state_dict(state["state"])
        self.history = state["history"]
        self.history.setdefault("diverged", {})
        counters = state["counters"]
        self.global_step = int(counters["global_step"])
        self.member_steps = int(counters["member_steps"])
        self.samples_seen = int(counters["samples_seen"])
        self.wall_time = float(counters["wall_time"])
        self.initial_n = int(counters["initial_n"])
        round_loss = state.get("round_loss")
        self._bad_step = self._bad_loss = None
        if round_loss is None:
            self._loss_sum, self._loss_count = None, 0
        else:
            self._loss_sum, self._loss_count = round_loss["sum"].to(self.population.device), int(round_loss["count"])
            if round_loss.get("bad_step") is not None:
                self._bad_step = round_loss["bad_step"].to(self.population.device)
                self._bad_loss = round_loss["bad_loss"].to(self.population.device)
        self._pending_extra = {"policy": state.get("policy"), "callbacks": state.get("callbacks")}
        set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | Path) -> None:
        save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the checkpoint at ``path``; :class:`~popvec.checkpoint.CheckpointError` (one line naming
        it) when it is corrupted, unreadable, or not a trainer's checkpoint that fits this population.

        N shrinks by design (eliminations), so the population's shapes cannot tell another run's
        checkpoint apart: the number of members the run started with must be this trainer's.
        """
        state = load_checkpoint(path, map_location=self.population.device)
        counters = state.get("counters")
        started = counters.get("initial_n") if isinstance(counters, dict) else None
        if isinstance(started, int) and started != self.initial_n:
            raise CheckpointError(
                f"checkpoint {path} is not a checkpoint of this popvec run "
                f"(it started with {started} members, this run with {self.initial_n})"
            )
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError) as err:
            detail = f"missing key {err}" if isinstance(err, KeyError) else " ".join(str(err).split())[:200]
            raise CheckpointError(f"checkpoint {path} is not a checkpoint of this popvec run ({detail})") from None


def _stateful(callbacks: Sequence[Callback]) -> dict[str, Callback]:
    """Callbacks that carry state, keyed by position and class (stable for one run's callback list)."""
    return {
        f"{i}:{type(cb).__name__}": cb for i, cb in enumerate(callbacks) if hasattr(cb, "state_dict") and hasattr(cb, "load_state_dict")
    }


class MultipleInitializationsTrainer:
    """Progressive elimination of ``num_models`` random initializations, trained in one stack.

    Every ``num_elim_steps`` steps all remaining members are evaluated on the whole validation
    set, ranked by validation loss (ties by member id), and the best
    ``max(1, int(n * reduce_factor))`` are kept, until one remains; the survivor then trains
    until ``num_epochs`` epochs of steps are done in total. Same arguments as the original
    one-model-at-a-time framework; member i is initialized by ``torch.manual_seed(seed + i)``.
    ``callbacks`` are added after the console reporter (e.g. a :class:`~popvec.callbacks.HistoryLogger`).
    ``reduce_factor`` is the *fraction kept* each round (that framework's name, in (0, 1)); it is
    not Hyperband's ``reduction_factor``, the integer eta a rung *divides* by.
    With ``memory_check``, ``train`` first refuses a ``num_models`` that cannot fit on ``device``
    (:class:`~popvec.memory.PopulationTooLarge`, one member probed; see :mod:`popvec.memory`).
    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for training and evaluation (see :mod:`popvec.precision`).
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        optimizer_fn: Callable[..., Any],
        num_models: int = 10,
        num_elim_steps: int = 100,
        reduce_factor: float = 0.5,
        device: torch.device | str | None = None,
        seed: int = 0,
        compile: bool = False,
        console: Console | None = None,
        progress: bool = True,
        member_chunk_size: int | str | None = None,
        callbacks: Sequence[Callback] = (),
        memory_check: bool = True,
        precision: str = "fp32",
    ) -> None:
        checks.integer("num_models", num_models)
        self.precision = check_precision(precision)
        checks.integer("num_elim_steps", num_elim_steps)
        check_reduce_factor(reduce_factor)
        checks.model_fn("model_fn", model_fn)
        if not callable(optimizer_fn):
            raise checks.CheckTypeError(f"optimizer_fn must be callable, got {type(optimizer_fn).__name__}")
        self.model_fn = model_fn
        self.optimizer_fn = optimizer_fn
        self.num_models = num_models
        self.num_elim_steps = num_elim_steps
        self.reduce_factor = reduce_factor
        auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = checks.device("device", device) if device is not None else auto
        self.seed = checks.seed("seed", seed, num_models)
        self.compile = compile
        self.console = console or Console()
        self.progress = progress
        self.member_chunk_size = member_chunk_size
        self.callbacks = list(callbacks)
        self.memory_check = memory_check
        self.trainer: PopulationTrainer | None = None

    @property
    def history(self) -> dict[str, Any]:
        return self.trainer.history if self.trainer is not None else {"rounds": [], "cost": {}}

    @property
    def population(self) -> Population:
        if self.trainer is None:
            raise RuntimeError("call train() first")
        return self.trainer.population

    def build(self, criterion: LossFn | None = None) -> PopulationTrainer:
        """The population trainer for a fresh run (all members initialized, nothing trained)."""
        population = Population.from_factory(self.model_fn, self.num_models, self.seed, self.device)
        optimizer = optim.build(population, self.optimizer_fn)
        self.trainer = PopulationTrainer(
            population,
            optimizer,
            criterion or F.cross_entropy,
            self.compile,
            console=self.console,
            member_chunk_size=self.member_chunk_size,
            callbacks=[ConsoleReporter(self.console, self.progress), *self.callbacks],
            precision=self.precision,
        )
        return self.trainer

    def check_memory(self, train_loader: Any, val_loader: Any = None, criterion: LossFn | None = None) -> memory.MemoryEstimate | None:
        """Raise :class:`~popvec.memory.PopulationTooLarge` when ``num_models`` members cannot fit on the device.

        One member is built and probed on a batch of ``train_loader`` and of ``val_loader`` when they
        are tensors on the device (a :class:`~popvec.loaders.DeviceLoader`, a split or an ``(x, y)``
        pair); other loaders are not drawn from, and then only parameters and optimizer state count.
        """
        if not memory.checks_enabled():
            return None
        with torch.random.fork_rng(devices=[]):
            probe = Population.from_modules([self.model_fn()])
        slots = memory.optimizer_slots(optim.build(probe, self.optimizer_fn))
        batch = _inputs(train_loader, getattr(train_loader, "batch_size", None))
        x, y = batch if batch is not None else (None, None)
        eval_batch = _inputs(val_loader, 1024)
        return memory.preflight_training(
            self.model_fn, self.num_models, self.device, slots, x, y, criterion or F.cross_entropy,
            self.member_chunk_size, f"num_models={self.num_models}", "member_chunk_size",
            eval_batch[0] if eval_batch is not None else None,
        )  # fmt: skip

    def train(
        self,
        train_loader: Any,
        val_loader: Any,
        criterion: LossFn | None = None,
        num_epochs: int = 1,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> nn.Module:
        """Run the elimination and return the winner as a plain ``nn.Module``.

        With ``checkpoint_dir`` a checkpoint is written after every round; ``resume=True``
        continues from it and ends with the same winner and weights as an uninterrupted run.
        ``on_round`` is called with each round's record, after selection and the checkpoint.
        The global torch generator is seeded with ``seed`` first (dropout and every other draw), so
        two runs with the same arguments give identical weights. Raises :class:`AllDiverged` when no
        member stayed finite (diverged members rank last, so that is when the winner diverged).
        """
        checks.integer("num_epochs", num_epochs)
        steps = num_epochs * as_source(train_loader, self.device).steps_per_epoch
        if self.memory_check:
            self.check_memory(train_loader, val_loader, criterion)
        torch.manual_seed(self.seed)  # every draw of the run (dropout included) follows the seed; resume restores the RNG
        trainer = self.build(criterion)
        checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        if resume:
            if checkpoint_path is None:
                raise ValueError("resume=True needs checkpoint_dir")
            trainer.load_checkpoint(checkpoint_path)
        # If the budget ends before the elimination does, a last round there keeps the best.
        policy = SuccessiveHalving(self.num_elim_steps, self.reduce_factor, final_step=steps)
        trainer.fit(train_loader, val_loader, steps, policy, checkpoint_path, on_round)
        if not bool(finite_members(trainer.population.params)[0]) or str(int(trainer.population.ids[0])) in trainer.history["diverged"]:
            raise AllDiverged(trainer.history["diverged"], self.num_models)
        self.best_val_loss = float(trainer.evaluate(val_loader)["loss"][0])
        self.console.print(f"Training complete! Best validation loss: {self.best_val_loss:.4f}")
        return trainer.population.member(0)


def _inputs(data: Any, batch_size: int | None) -> tuple[Tensor, Tensor] | None:
    """The first ``batch_size`` samples of ``data`` when it holds tensors (a ``DeviceLoader``, a split,
    an ``(x, y)`` pair), for a memory probe; None for any other loader (it is not drawn from)."""
    if isinstance(data, DeviceLoader):
        data = data.split
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(getattr(data, "x", None), Tensor) and isinstance(getattr(data, "y", None), Tensor):
        x, y = data.x, data.y
    else:
        return None
    if batch_size is None:
        return None
    return x[:batch_size], y[:batch_size]
