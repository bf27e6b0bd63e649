"""``popvec warmstart``: cold vs warm vs shrink-perturb starts in one stack (Ash & Adams 2020).

Writes ``results.json`` (every member and phase), ``summary.json`` (one row per arm) and, with
matplotlib installed, ``warmstart.png`` (test accuracy and steps to the threshold vs samples seen).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from popvec.cli.argtypes import nonnegative_float, number, number_pair, open_unit, positive_float, positive_int
from popvec.data import DATASET_NAMES, load_dataset
from popvec.models import MODEL_NAMES, model_factory, required_image_size
from popvec.plots import MissingMatplotlib, new_figure, save_figure
from popvec.report import write_json
from popvec.studies.warmstart import OPTIMIZER_NAMES, PROTOCOLS, Arm, PhaseRecord, WarmStartResult, default_arms, run_study

__all__ = ["register", "run_warmstart", "plot_result"]


def register(commands: Any) -> None:
    """Add the ``warmstart`` subcommand to ``popvec``."""
    p = commands.add_parser("warmstart", help="cold vs warm vs shrink-perturb starts, trained in one stack")
    p.add_argument("--protocol", choices=PROTOCOLS, default="online", help="online chunks, or two phases (fraction, then all)")
    p.add_argument("--model", choices=MODEL_NAMES, default="mlp")
    p.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help="digits is built in (offline)")
    p.add_argument("--data-dir", default="./data", help="where torchvision datasets live")
    p.add_argument("--download", action="store_true", help="download a torchvision dataset if missing")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd")
    p.add_argument("--lr", type=positive_float, default=0.01)
    p.add_argument("--momentum", type=nonnegative_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--threshold", type=number(0.0, 1.0, low_open=True), default=0.99, help="train accuracy that ends a phase, in (0, 1]")
    p.add_argument("--max-steps", type=positive_int, default=1000, help="step cap per phase")
    p.add_argument("--check-every", type=positive_int, default=10, help="steps between train-accuracy checks")
    p.add_argument("--fraction", type=open_unit, default=0.5, help="two-phase: first phase's share, in (0, 1)")
    p.add_argument("--chunks", type=positive_int, default=10, help="online: the training set in this many chunks")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="online: samples per chunk (overrides --chunks)")
    p.add_argument("--replicates", type=positive_int, default=3, help="members (seeds) per arm")
    p.add_argument("--sp", type=number_pair("LAM,SIGMA", ordered=False, minimum=0.0), action="append", metavar="LAM,SIGMA", help="a shrink-perturb arm (repeatable)")
    p.add_argument("--no-cold", action="store_true", help="leave out the cold-start arm")
    p.add_argument("--no-warm", action="store_true", help="leave out the warm-start arm")
    p.add_argument("--keep-optimizer-state", action="store_true", help="warm/shrink-perturb members keep optimizer state across phases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="results folder (default: runs/warmstart-<timestamp>)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(run=_command)


def build_arms(args: argparse.Namespace) -> list[Arm]:
    arms = [] if args.no_cold else [Arm("cold", "cold")]
    if not args.no_warm:
        arms.append(Arm("warm", "warm"))
    if args.sp is None:
        arms += [a for a in default_arms() if a.kind == "shrink_perturb"]
    else:
        for lam, sigma in dict.fromkeys(args.sp):
            arms.append(Arm.shrink_perturb(lam, sigma))
    return arms


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    from popvec.cli import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    arms = build_arms(args)
    if not arms:
        parser.error("no arms left: drop --no-cold/--no-warm or add --sp LAM,SIGMA")
    out = Path(args.out or Path("runs") / time.strftime("warmstart-%Y%m%d-%H%M%S"))
    try:
        run_warmstart(args, arms, device, out, console)
    except FileNotFoundError as err:
        parser.error(str(err))
    except ValueError as err:  # settings that do not fit the data (e.g. --chunk-size larger than the set)
        parser.error(str(err))
    except KeyboardInterrupt:
        console.print("Interrupted.")
        return 130
    return 0


def run_warmstart(args: argparse.Namespace, arms: list[Arm], device: Any, out: Path, console: Console) -> WarmStartResult:
    """Run the study of ``args``, print the table, write JSON (and the plot) to ``out``."""
    data = load_dataset(args.dataset, args.data_dir, args.download, image_size=required_image_size(args.model)).to(device)
    model_fn = model_factory(args.model, data.input_shape, data.num_classes)
    n = len(arms) * args.replicates
    console.print(
        f"popvec warmstart: {args.protocol}, {len(arms)} arms x {args.replicates} replicates = {n} x {args.model} "
        f"in one stack, on {data.name} ({len(data.train)} train / {len(data.test)} test) on {device}"
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[active]} of " + str(n) + " training"),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    task: list[Any] = []

    def on_phase_start(phase: int, samples: int, _population: Any) -> None:
        if task:
            progress.remove_task(task.pop())
        task.append(progress.add_task(f"phase {phase + 1} ({samples} samples)", total=args.max_steps, active=n))

    def on_step(phase: int, step: int, active: Any, _population: Any) -> None:
        if step % 10 == 0:
            progress.update(task[-1], completed=step, active=int(active.sum()))

    def on_phase_end(record: PhaseRecord) -> None:
        progress.update(task[-1], completed=max(record.steps), active=0)
        parts = []
        for a, arm in enumerate(arms):
            members = [i for i in range(n) if i // args.replicates == a]
            acc = sum(record.test_accuracy[i] for i in members) / len(members)
            steps = sum(record.steps[i] for i in members) / len(members)
            parts.append(f"{arm.name} {100 * acc:.2f}% ({steps:.0f} steps)")
        progress.console.print(f"phase {record.phase + 1}, {record.samples} samples: " + "; ".join(parts))

    with progress:
        result = run_study(
            model_fn, data.train, data.test, protocol=args.protocol, arms=arms, replicates=args.replicates,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            batch_size=args.batch_size, threshold=args.threshold, max_steps=args.max_steps, check_every=args.check_every,
            fraction=args.fraction, chunk_size=args.chunk_size, chunks=args.chunks,
            reset_optimizer=not args.keep_optimizer_state, seed=args.seed, device=device,
            on_phase_start=on_phase_start, on_step=on_step, on_phase_end=on_phase_end,
        )
    result.config.update(model=args.model, dataset=data.name)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result.to_dict())
    summary = result.summary()
    write_json(out / "summary.json", summary)
    console.print(summary_table(result, args.model, data.name))
    console.print(
        f"Wall time {result.wall_time_s:.1f} s for all {n} members in one stack; 'time' is the stack's wall time "
        f"until the member stopped, summed over phases."
    )
    if not args.no_plots:
        path = plot_result(result, out / "warmstart.png", title=f"{args.model} on {data.name}, {args.protocol}")
        console.print(f"Plot: {path}" if path else escape(f"No plot written ({MissingMatplotlib()})"))
    console.print(f"Results: {out / 'results.json'}, {out / 'summary.json'}")
    return result


def summary_table(result: WarmStartResult, model: str, dataset: str) -> Table:
    last = result.phases[-1]
    table = Table(title=f"{model} on {dataset}, {result.protocol}: after the last phase ({last.samples} samples)", title_justify="left")
    for name in ("arm", "n", "test acc", "mean over phases", "train acc", "steps", "time s", "reached"):
        table.add_column(name, justify="left" if name == "arm" else "right")
    for row in result.summary():
        table.add_row(
            row["arm"],
            str(row["members"]),
            f"{100 * row['final_test_accuracy']:.2f} ± {100 * row['final_test_accuracy_std']:.2f}%",
            f"{100 * row['mean_test_accuracy']:.2f}%",
            f"{100 * row['final_train_accuracy']:.2f}%",
            f"{row['total_steps']:.0f}",
            f"{row['time_s']:.1f}",
            "yes" if row["reached_all"] else "[yellow]cap hit",
        )
    return table


def plot_result(result: WarmStartResult, path: Path, title: str = "") -> Path | None:
    """Test accuracy and steps per phase vs samples seen, one line per arm; None without matplotlib."""
    try:
        fig = new_figure(11, 4)
    except MissingMatplotlib:
        return None
    ax_acc, ax_steps = fig.subplots(1, 2)
    for name, c in result.curves().items():
        ax_acc.plot(c["samples"], [100 * v for v in c["test_accuracy"]], marker="o", label=name)
        ax_steps.plot(c["samples"], c["steps"], marker="o", label=name)
    ax_acc.set(xlabel="training samples seen", ylabel="test accuracy (%)", title="test accuracy")
    ax_steps.set(xlabel="training samples seen", ylabel="steps in the phase", title="steps to the threshold")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
