"""``popvec train``: progressive elimination of N initializations on a dataset.

Live progress, per-round tables, and a run folder with config.json, checkpoint.pt (after every
round), history.json, leaderboard.json, summary.json and the winner's winner.pt; ``--resume``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, ClassVar

from rich.console import Console

from popvec.callbacks import HistoryLogger
from popvec.checkpoint import save_checkpoint
from popvec.cli import common
from popvec.cli.argtypes import open_unit, positive_int, positive_int_or_auto
from popvec.cli.config import (
    DataFlags,
    DeviceFlags,
    HparamFlags,
    OptimizerFlags,
    RunFlags,
    SeedFlags,
    config,
)
from popvec.cli.flags import add_flags, flag, override
from popvec.engine import evaluate
from popvec.loaders import DeviceLoader
from popvec.population import Population
from popvec.report import leaderboard_table, write_json
from popvec.trainer import CHECKPOINT_NAME, MultipleInitializationsTrainer

__all__ = ["TrainConfig", "add_train_arguments", "register", "run"]


@config
class TrainConfig(DataFlags, OptimizerFlags, HparamFlags, SeedFlags, DeviceFlags, RunFlags):
    """``popvec train``: the Multiple Initializations framework's flags (same names) plus popvec's."""

    COMMAND: ClassVar[str] = "train"
    RESUMABLE: ClassVar[bool] = True
    num_models: int = flag(10, "initializations to start with", parse=positive_int)
    num_elim_steps: int = flag(100, "steps between eliminations", parse=positive_int)
    reduce_factor: float = flag(0.5, "fraction kept each round, in (0, 1) (not hyperband's --reduction-factor, a divisor)", parse=open_unit)
    epochs: int = flag(10, "epochs of steps in total", parse=positive_int)
    per_member_data: bool = flag(False, "each member draws its own seeded batch order")
    compile: bool = flag(False, "torch.compile the vmapped step")
    member_chunk_size: int | str | None = flag(
        None, "run members in chunks of this many, or 'auto' (CPU: the fastest chunk size a short probe finds)", parse=positive_int_or_auto
    )
    # LeNet-5: the model of the quickstart and of the documented results.
    model: str = override(DataFlags, "model", default="lenet5")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``popvec train`` (from :class:`TrainConfig`) on any parser."""
    add_flags(parser, TrainConfig)


def register(commands: Any) -> None:
    common.add_command(commands, TrainConfig, run, "progressive elimination of N initializations")


def run(config: TrainConfig, console: Console, resume: bool = False) -> int:
    """Run (or resume) the elimination of ``config``; writes the run folder, returns the exit code."""
    device = common.device_of(config)
    data, model_fn = common.load_data(config, device)
    common.check_batch_size(config.batch_size, data)
    with common.run_folder(config, resume) as out:
        if resume and not (out / CHECKPOINT_NAME).is_file():
            console.print(f"{out} holds no {CHECKPOINT_NAME} yet (stopped before the first round): starting over from its config.json")
            resume = False
        train_loader = DeviceLoader(
            data.train, config.batch_size, num_members=config.num_models if config.per_member_data else None, seed=config.seed
        )
        trainer = MultipleInitializationsTrainer(
            model_fn,
            common.optimizer_factory(config.optimizer, config.lr, config.momentum),
            num_models=config.num_models,
            num_elim_steps=config.num_elim_steps,
            reduce_factor=config.reduce_factor,
            device=device,
            seed=config.seed,
            compile=config.compile,
            console=console,
            progress=not config.no_progress,
            member_chunk_size=config.member_chunk_size,
            callbacks=[HistoryLogger(out)],  # history.json and rounds.csv after every round
        )
        console.print(
            f"popvec train: {config.num_models} x {config.model} on {data.name} ({len(data.train)} train / {len(data.val)} val / "
            f"{len(data.test)} test) on {device}; run folder {out}"
        )
        winner = trainer.train(train_loader, data.val, num_epochs=config.epochs, checkpoint_dir=out, resume=resume)
        history = trainer.history
        test = evaluate(Population.from_modules([winner]), data.test)
        winner_id = int(trainer.population.ids[0])
        summary = {
            "winner_id": winner_id,
            "best_val_loss": trainer.best_val_loss,
            "test_loss": float(test["loss"][0]),
            "test_accuracy": float(test["accuracy"][0]),
            "cost": history["cost"],
        }
        save_checkpoint(out / "winner.pt", winner.state_dict())  # a plain state_dict, atomic, with winner.pt.sha256
        write_json(out / "history.json", history)
        leaderboard = _leaderboard(history)
        write_json(out / "leaderboard.json", leaderboard)
        write_json(out / "summary.json", summary)
        console.print(leaderboard_table(leaderboard, title="Final leaderboard (last evaluation of each member)"))
        cost = history["cost"]
        console.print(
            f"Cost: {cost['member_steps']} member-steps vs {cost['naive_member_steps']} to train all "
            f"{config.num_models} fully ({100 * cost['fraction_of_naive']:.1f}%), {cost['wall_time_s']:.1f} s"
        )
        console.print(f"Winner: member {winner_id}, test accuracy {100 * summary['test_accuracy']:.2f}% (saved to {out / 'winner.pt'})")
    return 0


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _leaderboard(history: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's last evaluation, ranked by how long it survived, then validation loss."""
    last: dict[int, dict[str, Any]] = {}
    for record in history["rounds"]:
        for row in record["members"]:
            last[row["id"]] = {"round": record["round"], **row}
    rows = sorted(last.values(), key=lambda r: (-r["round"], not r["kept"], _nan_last(r["val_loss"]), r["id"]))
    return [
        {
            "rank": i + 1,
            "id": r["id"],
            "rounds": r["round"],
            "val_loss": r["val_loss"],
            "val_acc": r["val_accuracy"],
            "train_loss": r["train_loss"],
        }
        for i, r in enumerate(rows)
    ]
