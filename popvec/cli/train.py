"""``popvec train``: progressive elimination of N initializations on a dataset.

Live progress, per-round tables, and a run folder with config.json, checkpoint.pt (after every
round), history.json, leaderboard.json, summary.json and the winner's winner.pt; ``--resume``.

``--seeds K`` runs K independent eliminations one after the other, run k with seed
``seed + k * num_models`` (so no two runs share an initialization), each in its own subfolder
``seed-<s>/`` holding the files above; the top-level summary.json then reports the winners' test
accuracy over the K runs as mean, sample std and 95% Student-t confidence interval, with every
run's own summary. ``--resume`` skips finished runs and continues the interrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.markup import escape

from popvec.augment import Augment
from popvec.callbacks import HistoryLogger
from popvec.checkpoint import save_checkpoint
from popvec.cli import common
from popvec.cli.argtypes import open_unit, positive_int, positive_int_or_auto
from popvec.cli.config import (
    DataFlags,
    DeviceFlags,
    HparamFlags,
    OptimizerFlags,
    PrecisionFlags,
    RunFlags,
    SeedFlags,
    config,
)
from popvec.cli.flags import add_flags, flag, override
from popvec.engine import evaluate
from popvec.loaders import DeviceLoader
from popvec.population import Population
from popvec.report import leaderboard_table, write_json
from popvec.stats import summarize
from popvec.trainer import CHECKPOINT_NAME, AllDiverged, MultipleInitializationsTrainer

__all__ = ["TrainConfig", "add_train_arguments", "register", "run"]


@config
class TrainConfig(DataFlags, OptimizerFlags, HparamFlags, SeedFlags, PrecisionFlags, DeviceFlags, RunFlags):
    """``popvec train``: the Multiple Initializations framework's flags (same names) plus popvec's."""

    COMMAND: ClassVar[str] = "train"
    RESUMABLE: ClassVar[bool] = True
    num_models: int = flag(10, "initializations to start with", parse=positive_int)
    num_elim_steps: int = flag(100, "steps between eliminations", parse=positive_int)
    reduce_factor: float = flag(0.5, "fraction kept each round, in (0, 1) (not hyperband's --reduction-factor, a divisor)", parse=open_unit)
    epochs: int = flag(10, "epochs of steps in total", parse=positive_int)
    per_member_data: bool = flag(False, "each member draws its own seeded batch order")
    augment: bool = flag(False, "each member sees its own seeded random crop (padding 4) and horizontal flip of every batch")
    compile: bool = flag(False, "torch.compile the vmapped step")
    seeds: int = flag(
        1, "independent elimination runs, one after another in subfolders seed-<s>/ (s = seed + k * num_models)", parse=positive_int
    )
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
    steps = config.epochs * (len(data.train) // config.batch_size)
    if config.num_models > 1 and config.num_elim_steps >= steps:
        raise common.UsageError(
            f"--num-elim-steps: must be < the run's {steps} steps (--epochs {config.epochs} x {len(data.train) // config.batch_size} "
            f"steps per epoch), or no member is ever eliminated; got {config.num_elim_steps}"
        )
    common.preflight(
        data,
        model_fn,
        device,
        config.num_models,
        f"--num-models {config.num_models}",
        config.optimizer,
        config.batch_size,
        config.member_chunk_size,
        "--member-chunk-size",
    )
    with common.run_folder(config, resume) as out:
        if config.seeds == 1:
            _run_one(config, config.seed, out, resume, console, data, model_fn, device)
            return 0
        seeds = replicate_seeds(config.seed, config.seeds, config.num_models)
        console.print(f"popvec train: {config.seeds} independent runs, seeds {', '.join(map(str, seeds))}, in {out}/seed-<s>/")
        runs = []
        for seed in seeds:
            folder = out / f"seed-{seed}"
            done = folder / "summary.json"
            if resume and done.is_file():  # finished before the interruption
                runs.append({"seed": seed, **json.loads(done.read_text())})
                console.print(f"seed {seed}: finished earlier, test accuracy {100 * runs[-1]['test_accuracy']:.2f}% ({done})")
                continue
            started = folder.is_dir()
            folder.mkdir(exist_ok=True)
            console.rule(f"seed {seed}")
            try:
                runs.append({"seed": seed, **_run_one(config, seed, folder, resume and started, console, data, model_fn, device)})
            except AllDiverged as err:  # no winner for this seed: kept as a NaN replicate, counted and reported
                console.print(escape(f"seed {seed}: {err} — no winner; counted as a non-finite run"), soft_wrap=True)
                runs.append({"seed": seed, "diverged": str(err), "test_accuracy": math.nan, "cost": {"member_steps": 0}})
        accuracy = summarize([r["test_accuracy"] for r in runs], bounds=(0.0, 1.0))
        summary = {
            "seeds": seeds,
            "test_accuracy": accuracy.to_dict(),
            "test_accuracy_text": accuracy.scaled(100).format(".2f") + " (%)",
            "member_steps": sum(r["cost"]["member_steps"] for r in runs),
            "runs": runs,
        }
        write_json(out / "summary.json", summary)
        per_seed = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs)
        console.print(
            f"Winners' test accuracy over {config.seeds} seeds: {accuracy.scaled(100).format('.2f')} (%, mean ± sample std, "
            f"Student-t CI); per seed {per_seed} ({out / 'summary.json'})"
        )
    return 0 if accuracy.n_finite == accuracy.n else 1


def replicate_seeds(seed: int, runs: int, num_models: int) -> list[int]:
    """The seeds of ``runs`` independent eliminations: ``seed + k * num_models``, so run k's members
    (seeds ``s .. s + num_models - 1``) share no initialization with another run's."""
    return [seed + k * num_models for k in range(runs)]


def _run_one(
    config: TrainConfig, seed: int, out: Path, resume: bool, console: Console, data: Any, model_fn: Any, device: torch.device
) -> dict[str, Any]:
    """One elimination with ``seed`` in folder ``out`` (resumed from its checkpoint when there is one); its summary."""
    if resume and not (out / CHECKPOINT_NAME).is_file():
        console.print(f"{out} holds no {CHECKPOINT_NAME} yet (stopped before the first round): starting over from its config.json")
        resume = False
    per_member = config.per_member_data or config.augment  # augmented views are per member
    train_loader = DeviceLoader(
        data.train,
        config.batch_size,
        num_members=config.num_models if per_member else None,
        seed=seed,
        augment=Augment.for_data(data) if config.augment else None,
        shared_order=config.augment and not config.per_member_data,
    )
    trainer = MultipleInitializationsTrainer(
        model_fn,
        common.optimizer_factory(config.optimizer, config.lr, config.momentum),
        num_models=config.num_models,
        num_elim_steps=config.num_elim_steps,
        reduce_factor=config.reduce_factor,
        device=device,
        seed=seed,
        compile=config.compile,
        console=console,
        progress=not config.no_progress,
        member_chunk_size=config.member_chunk_size,
        memory_check=False,  # checked above, naming the flags
        callbacks=[HistoryLogger(out)],  # history.json and rounds.csv after every round
        precision=config.precision,
    )
    console.print(
        f"popvec train: {config.num_models} x {config.model} on {data.name} ({len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test) on {device}; run folder {out}"
    )
    winner = trainer.train(train_loader, data.val, num_epochs=config.epochs, checkpoint_dir=out, resume=resume)
    history = trainer.history
    test = evaluate(Population.from_modules([winner]), data.test, precision=config.precision)
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
    return summary


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
