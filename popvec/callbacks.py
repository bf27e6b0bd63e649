"""Callbacks of the training loop: progress, tables, history files and TensorBoard live here, not in the loop.

:meth:`PopulationTrainer.fit <popvec.trainer.PopulationTrainer.fit>` prints nothing itself; it calls
every callback's hooks in order:

- ``on_fit_start(trainer, steps)``: before the first step (``steps``: the global step to reach);
- ``on_segment(trainer, steps)``: before training ``steps`` steps up to the next decision;
- ``on_step(trainer, losses)``: after each step (``losses``: ``[N]``, detached);
- ``on_round(trainer, record)``: after a decision was applied, before the round's checkpoint
  (``record``: the round's row of ``trainer.history["rounds"]``);
- ``on_fit_end(trainer)``: when ``fit`` returns or raises.

A callback with ``state_dict``/``load_state_dict`` is saved in the trainer's checkpoints, so a resumed
run continues it exactly. Subclass :class:`Callback` and override what you need.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from popvec.report import atomic_write_bytes, make_progress, round_table, write_json

if TYPE_CHECKING:
    from popvec.trainer import PopulationTrainer

__all__ = ["Callback", "ConsoleReporter", "HistoryLogger", "TensorBoardLogger"]


class Callback:
    """No-op hooks; see the module doc for when each is called."""

    def on_fit_start(self, trainer: PopulationTrainer, steps: int) -> None:
        """Before the first step of ``fit`` (``steps``: the global step ``fit`` trains to)."""

    def on_segment(self, trainer: PopulationTrainer, steps: int) -> None:
        """Before training ``steps`` steps up to the next decision (or the end)."""

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        """After each step; ``losses`` is ``[N]``."""

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        """After a decision was applied; the checkpoint written next holds this callback's state."""

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        """When ``fit`` returns or raises."""


class ConsoleReporter(Callback):
    """A rich progress bar over the global steps, a line per training segment, and a table per round.

    ``progress=False`` drops the live bar (for logs); ``round_tables=False`` drops the per-round
    tables and segment lines (search runners print their own one-line summaries instead).
    """

    def __init__(self, console: Console | None = None, progress: bool = True, round_tables: bool = True, every: int = 25) -> None:
        self.console = console or Console()
        self.progress = progress
        self.round_tables = round_tables
        self.every = every
        self._bar: Any = None
        self._task: Any = None
        self._loss_sum = 0.0
        self._count = 0

    def on_fit_start(self, trainer: PopulationTrainer, steps: int) -> None:
        self._bar = make_progress(self.console, disable=not self.progress)
        self._bar.start()
        self._task = self._bar.add_task("training", total=steps, completed=trainer.global_step, loss="-")

    def on_segment(self, trainer: PopulationTrainer, steps: int) -> None:
        self._loss_sum, self._count = 0.0, 0
        if self.round_tables and steps > 0:
            self.console.print(f"Training {trainer.population.n} model(s) for {steps} steps")

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        self._count += 1
        if self._count % self.every == 0:
            mean = float(losses.mean())
            self._bar.update(self._task, completed=trainer.global_step, loss=f"{mean:.4f}" if math.isfinite(mean) else "nan")

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self._bar.update(self._task, completed=trainer.global_step)
        if not self.round_tables:
            return
        self.console.print(round_table(record))
        kept = len(record["kept_ids"])
        if kept < len(record["members"]):
            self.console.print(f"Eliminated poor performers. Remaining models: {kept}")

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=trainer.global_step)
            self._bar.stop()
            self._bar = None


class HistoryLogger(Callback):
    """Writes ``history.json`` (every round) and ``rounds.csv`` (one row per member and round) to ``folder``.

    Both files are rewritten atomically after every round, so a killed run leaves whole files.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        self.write(trainer)

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        self.write(trainer)

    def write(self, trainer: PopulationTrainer) -> None:
        write_json(self.folder / "history.json", trainer.history)
        rows = [{"round": r["round"], "step": r["step"], **m} for r in trainer.history["rounds"] for m in r["members"]]
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(k for k, v in row.items() if not isinstance(v, dict)))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.folder / "rounds.csv", text.getvalue().encode())


class TensorBoardLogger(Callback):
    """One scalar series per member id (``member_<id>/train_loss``, ``.../val_loss``, ...) via ``torch.utils.tensorboard``.

    Needs the ``tensorboard`` package (``pip install tensorboard``); raises ImportError naming it otherwise.
    Training losses are logged every ``every`` steps, round metrics at every decision.
    """

    def __init__(self, log_dir: str | Path, every: int = 25) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch raises ImportError when tensorboard is missing
            raise ImportError(f"TensorBoardLogger needs the tensorboard package (pip install tensorboard): {err}") from None
        self.writer = SummaryWriter(str(log_dir))
        self.every = every

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        if trainer.global_step % self.every == 0:
            for member, loss in zip(trainer.population.ids.tolist(), losses.tolist()):
                self.writer.add_scalar(f"member_{member}/train_loss", loss, trainer.global_step)

    def on_round(self, trainer: PopulationTrainer, record: dict[str, Any]) -> None:
        for row in record["members"]:
            for name, value in row.items():
                if name != "id" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"member_{row['id']}/{name}", value, record["step"])
        self.writer.flush()

    def on_fit_end(self, trainer: PopulationTrainer) -> None:
        self.writer.flush()
