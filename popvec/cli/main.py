"""The ``popvec`` command.

``popvec train``: progressive elimination of N initializations on a dataset, with live progress,
per-round tables, a run folder (config, history, checkpoints, the winner's weights) and ``--resume``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console

from popvec.cli.argtypes import open_unit, positive_float, positive_int
from popvec.data import DATASET_NAMES, load_dataset
from popvec.loaders import DeviceLoader
from popvec.engine import evaluate
from popvec.models import MODEL_NAMES, model_factory, required_image_size
from popvec.population import Population
from popvec.report import leaderboard_table, write_json
from popvec.trainer import CHECKPOINT_NAME, MultipleInitializationsTrainer

__all__ = ["main", "build_parser"]

OPTIMIZERS = ("adam", "adamw", "sgd")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the Multiple Initializations framework (same names and defaults) plus popvec's."""
    parser.add_argument("--num-models", type=positive_int, default=10, help="initializations to start with")
    parser.add_argument("--num-elim-steps", type=positive_int, default=100, help="steps between eliminations")
    parser.add_argument("--reduce-factor", type=open_unit, default=0.5, help="fraction kept each round, in (0, 1)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs of steps in total")
    parser.add_argument("--lr", type=positive_float, default=0.001)
    parser.add_argument("--seed", type=int, default=42, help="member i is initialized with seed + i")
    parser.add_argument("--data-dir", default="./data", help="where torchvision datasets live")
    parser.add_argument("--download", action="store_true", help="download a torchvision dataset if missing")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help="digits is built in (offline)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="lenet5")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--per-member-data", action="store_true", help="each member draws its own seeded batch order"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the vmapped step")
    parser.add_argument(
        "--member-chunk-size", type=positive_int, default=None, help="run members in chunks of this many (CPU: try 1)"
    )
    parser.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue an interrupted run")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


#: Modules that add a subcommand: each defines ``register(commands)`` adding a parser whose
#: defaults include ``run=fn(args, parser, console) -> int``.
COMMAND_MODULES: tuple[str, ...] = ("popvec.cli.lmc", "popvec.cli.search", "popvec.cli.warmstart")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="popvec", description="Train populations of neural networks in one vmapped stack.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="progressive elimination of N initializations")
    add_train_arguments(train)
    train.set_defaults(run=_train_command)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    return device


def _optimizer_fn(name: str, lr: float) -> Any:
    return {
        "adam": lambda params: torch.optim.Adam(params, lr=lr),
        "adamw": lambda params: torch.optim.AdamW(params, lr=lr),
        "sgd": lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
    }[name]


def run_train(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Run (or resume) ``popvec train``; returns the final summary written to the run folder."""
    device = resolve_device(args.device)
    out = Path(args.out)
    data = load_dataset(args.dataset, args.data_dir, args.download, image_size=required_image_size(args.model)).to(device)
    model_fn = model_factory(args.model, data.input_shape, data.num_classes)
    train_loader = DeviceLoader(
        data.train, args.batch_size, num_members=args.num_models if args.per_member_data else None, seed=args.seed
    )
    trainer = MultipleInitializationsTrainer(
        model_fn,
        _optimizer_fn(args.optimizer, args.lr),
        num_models=args.num_models,
        num_elim_steps=args.num_elim_steps,
        reduce_factor=args.reduce_factor,
        device=device,
        seed=args.seed,
        compile=args.compile,
        console=console,
        progress=not args.no_progress,
        member_chunk_size=args.member_chunk_size,
    )
    console.print(
        f"popvec train: {args.num_models} x {args.model} on {data.name} ({len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test) on {device}; run folder {out}"
    )
    winner = trainer.train(train_loader, data.val, num_epochs=args.epochs, checkpoint_dir=out, resume=args.resume is not None)
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
    torch.save(winner.state_dict(), out / "winner.pt")
    write_json(out / "history.json", history)
    leaderboard = _leaderboard(history)
    write_json(out / "leaderboard.json", leaderboard)
    write_json(out / "summary.json", summary)
    console.print(leaderboard_table(leaderboard, title="Final leaderboard (last evaluation of each member)"))
    cost = history["cost"]
    console.print(
        f"Cost: {cost['member_steps']} member-steps vs {cost['naive_member_steps']} to train all "
        f"{args.num_models} fully ({100 * cost['fraction_of_naive']:.1f}%), {cost['wall_time_s']:.1f} s"
    )
    console.print(f"Winner: member {winner_id}, test accuracy {100 * summary['test_accuracy']:.2f}% (saved to {out / 'winner.pt'})")
    return summary


def _leaderboard(history: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member's last evaluation, ranked by how long it survived, then validation loss."""
    last: dict[int, dict[str, Any]] = {}
    for record in history["rounds"]:
        for row in record["members"]:
            last[row["id"]] = {"round": record["round"], **row}
    rows = sorted(last.values(), key=lambda r: (-r["round"], not r["kept"], r["val_loss"], r["id"]))
    return [
        {"rank": i + 1, "id": r["id"], "rounds": r["round"], "val_loss": r["val_loss"], "val_acc": r["val_accuracy"], "train_loss": r["train_loss"]}
        for i, r in enumerate(rows)
    ]


def _prepare_run_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """New run: pick and record the folder. Resume: reload the recorded flags from it."""
    if args.resume is not None:
        run_dir = Path(args.resume)
        config = run_dir / "config.json"
        if not (run_dir / CHECKPOINT_NAME).is_file() or not config.is_file():
            parser.error(f"--resume: {run_dir} holds no {CHECKPOINT_NAME} and config.json to resume from")
        saved = json.loads(config.read_text())
        return argparse.Namespace(**{**saved, "resume": str(run_dir), "out": str(run_dir), "no_progress": args.no_progress, "run": args.run})
    args.out = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out)
    if (out / CHECKPOINT_NAME).exists():
        parser.error(f"--out: {out} already holds a run; resume it with --resume {out} or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {k: v for k, v in vars(args).items() if k not in ("resume", "command", "run")})
    return args


def _train_command(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    try:
        resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    args = _prepare_run_folder(args, parser)
    try:
        run_train(args, console)
    except FileNotFoundError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        console.print(f"Interrupted. Continue with: popvec train --resume {args.out}")
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``popvec`` command; returns the exit code (2 for bad flags)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    return args.run(args, command_parser, Console())


if __name__ == "__main__":
    sys.exit(main())
