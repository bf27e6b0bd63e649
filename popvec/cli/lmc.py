"""``popvec lmc`` and ``popvec instability``: linear mode connectivity from the command line.

``popvec lmc A.pt B.pt`` evaluates the straight line between two saved ``state_dict``s (e.g. the
``winner.pt`` of two ``popvec train`` runs); ``popvec instability`` runs the spawning analysis of
Frankle et al. (2020) on a built-in or torchvision dataset. Both write JSON and (with matplotlib)
a PNG to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor, nn

from popvec import optim
from popvec.studies import lmc
from popvec.cli.argtypes import integer
from popvec.cli import resolve_device
from popvec.data import DATASET_NAMES, DatasetSplits, load_dataset
from popvec.models import MODEL_NAMES, build_model, model_factory, required_image_size
from popvec.population import Population
from popvec.report import leaderboard_table, make_progress, write_json

__all__ = ["register"]

SPLITS = ("test", "train", "val")
OPTIMIZERS = ("sgd", "adam")


def _k1_list(text: str) -> list[int]:
    """``"0,10,50"`` -> ``[0, 10, 50]``: distinct integers >= 0."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0, e.g. 0,10,50; got {text!r}") from None
    if min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 0, got {text!r}")
    return sorted(values)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help="digits is built in (offline)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="lenet5")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split the curve is measured on")
    parser.add_argument("--alphas", type=integer(2), default=25, help="equally spaced alphas in [0, 1], both ends")
    parser.add_argument("--bn", choices=lmc.BN_MODES, default="auto", help="BatchNorm statistics: recompute on train (auto) or keep")
    parser.add_argument("--data-dir", default="./data", help="where torchvision datasets live")
    parser.add_argument("--download", action="store_true", help="download a torchvision dataset if missing")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<command>-<timestamp>)")


def register(commands: Any) -> None:
    """Add the ``lmc`` and ``instability`` subcommands to ``popvec``."""
    curve = commands.add_parser("lmc", help="loss and error along the line between two saved networks")
    curve.add_argument("a", metavar="A.pt", help="state_dict of the network at alpha 0 (e.g. a winner.pt)")
    curve.add_argument("b", metavar="B.pt", help="state_dict of the network at alpha 1")
    _add_common(curve)
    curve.add_argument("--batch-size", type=integer(1), default=1024, help="evaluation batch size")
    curve.set_defaults(run=_lmc_command)

    spawn = commands.add_parser("instability", help="barrier between copies spawned at step k1 (Frankle et al. 2020)")
    _add_common(spawn)
    spawn.add_argument("--k1", type=_k1_list, default=[0, 10, 50, 100, 500], help="spawn steps, e.g. 0,10,50,100,500")
    spawn.add_argument("--k2", type=integer(1), default=500, help="steps every copy trains after spawning")
    spawn.add_argument("--copies", type=integer(2), default=2, help="copies spawned at each k1")
    spawn.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (momentum 0.9) or adam")
    spawn.add_argument("--lr", type=float, default=0.05)
    spawn.add_argument("--batch-size", type=integer(1), default=64, help="training batch size")
    spawn.add_argument("--seed", type=int, default=0, help="trunk init and order; copy c draws its order from seed + 1 + c")
    spawn.add_argument("--no-progress", action="store_true", help="no live progress bar")
    spawn.set_defaults(run=_instability_command)


# --------------------------------------------------------------------------- shared steps
def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[torch.device, DatasetSplits, Path]:
    """Device, dataset (on the device) and output folder, or a one-line usage error."""
    try:
        device = resolve_device(args.device)
        data = load_dataset(args.dataset, args.data_dir, args.download, image_size=required_image_size(args.model))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    out = Path(args.out or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    return device, data.to(device), out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _write_plot(result: Any, path: Path, console: Console) -> None:
    try:
        console.print(f"Plot: {result.plot(path)}")
    except ImportError as err:
        console.print(escape(f"No plot written ({err})"))


# --------------------------------------------------------------------------- popvec lmc
def _load_model(path: str, args: argparse.Namespace, data: DatasetSplits, device: torch.device, parser: argparse.ArgumentParser) -> nn.Module:
    model = build_model(args.model, data.input_shape, data.num_classes)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, AttributeError, TypeError) as err:
        parser.error(f"{path} is not a --model {args.model} state_dict for {args.dataset}: {_one_line(err)}")
    return model.to(device)


def _curve_table(result: lmc.InterpolationResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("alpha", "loss", "error", "loss gap", "error gap"):
        table.add_column(name, justify="right")
    for alpha, loss, error, loss_gap, error_gap in zip(*(t.tolist() for t in (result.alphas, result.loss, result.error, result.loss_gap, result.error_gap))):
        table.add_row(f"{alpha:.3f}", f"{loss:.4f}", f"{100 * error:.2f}%", f"{loss_gap:+.4f}", f"{100 * error_gap:+.2f}%")
    return table


def _lmc_command(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    device, data, out = _prepare(args, parser)
    a, b = (_load_model(path, args, data, device, parser) for path in (args.a, args.b))
    split = getattr(data, args.split)
    result = lmc.interpolate(a, b, split, args.alphas, bn=args.bn, bn_data=data.train, batch_size=args.batch_size)
    console.print(_curve_table(result, f"{args.a} -> {args.b} ({args.model} on {data.name} {args.split}, {len(split)} samples)"))
    console.print(
        f"loss barrier {result.loss_barrier:.4f}, error barrier {100 * result.error_barrier:.2f}%, "
        f"L2 distance {result.l2:.3f} (BatchNorm statistics: {result.bn})"
    )
    config = {"a": args.a, "b": args.b, "model": args.model, "dataset": data.name, "split": args.split}
    write_json(out / "lmc.json", {**config, **result.to_dict()})
    console.print(f"Curve: {out / 'lmc.json'}")
    _write_plot(result, out / "lmc.png", console)
    return 0


# --------------------------------------------------------------------------- popvec instability
def _optimizer_fn(name: str, lr: float) -> Callable[[Population], optim.PopulationOptimizer]:
    if name == "sgd":
        return lambda pop: optim.SGD(pop, lr=lr, momentum=0.9)
    return lambda pop: optim.Adam(pop, lr=lr)


def _instability_command(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    if not args.lr > 0:
        parser.error(f"argument --lr: must be > 0, got {args.lr}")
    device, data, out = _prepare(args, parser)
    if args.batch_size > len(data.train):
        parser.error(f"argument --batch-size: must be <= {len(data.train)} (the train split), got {args.batch_size}")
    branches = len(args.k1) * args.copies
    console.print(
        f"popvec instability: {args.model} on {data.name}, trunk to k1 = {max(args.k1)}, then {branches} branches "
        f"({args.copies} per k1) for k2 = {args.k2} steps in one stack on {device}; run folder {out}"
    )
    progress = make_progress(console, disable=args.no_progress)
    with progress:
        tasks = {
            "trunk": progress.add_task("trunk", total=max(args.k1), loss="-"),
            "branches": progress.add_task(f"{branches} branches", total=args.k2, loss="-"),
        }

        def on_step(phase: str, done: int, total: int, losses: Tensor) -> None:
            if done % 10 == 0 or done == total:
                progress.update(tasks[phase], completed=done, loss=f"{float(losses.mean()):.4f}")

        result = lmc.instability(
            model_factory(args.model, data.input_shape, data.num_classes), _optimizer_fn(args.optimizer, args.lr),
            data.train, args.k1, args.k2, copies=args.copies, seed=args.seed, batch_size=args.batch_size,
            run_dir=out, eval_data=getattr(data, args.split), alphas=args.alphas, bn=args.bn, on_step=on_step,
        )
    rows = [
        {"k1": r["k1"], "loss barrier": r["loss_barrier"], "error barrier %": 100 * r["error_barrier"], "L2": r["l2"], "error %": 100 * r["error"]}
        for r in result.rows()
    ]
    console.print(leaderboard_table(rows, title=f"Instability on {args.split}, k2 = {args.k2} (means over pairs of copies)"))
    config = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    write_json(out / "instability.json", {"config": config, **result.to_dict()})
    console.print(f"Table: {out / 'instability.json'}; trunk checkpoints: {out}/trunk_k1_<k1>.pt")
    _write_plot(result, out / "instability.png", console)
    return 0
