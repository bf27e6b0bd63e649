"""``popvec warmstart``: cold vs warm vs shrink-perturb starts in one stack (Ash & Adams 2020).

Writes config.json, ``results.json`` (every member and phase), ``summary.json`` (one row per arm)
and, with matplotlib installed, ``warmstart.png`` (test accuracy and steps to the threshold vs
samples seen) to the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from popvec.cli import common
from popvec.cli.argtypes import (
    nonnegative_float,
    number,
    number_pair,
    open_unit,
    positive_int,
)
from popvec.cli.config import (
    DataFlags,
    DeviceFlags,
    HparamFlags,
    OptimizerFlags,
    PlotFlags,
    PrecisionFlags,
    RunFlags,
    SeedFlags,
    config,
)
from popvec.cli.flags import as_dict, flag, override
from popvec.cli.search import library_error
from popvec.plots import MissingMatplotlib, new_figure, save_figure
from popvec.report import write_json
from popvec.studies.warmstart import (
    OPTIMIZER_NAMES,
    PROTOCOLS,
    Arm,
    PhaseRecord,
    WarmStartResult,
    default_arms,
    run_study,
)

__all__ = ["WarmstartConfig", "build_arms", "plot_result", "register", "run", "summary_table"]


@config
class WarmstartConfig(DataFlags, OptimizerFlags, HparamFlags, SeedFlags, PrecisionFlags, DeviceFlags, PlotFlags, RunFlags):
    """``popvec warmstart``: the protocol, the arms, and when a phase ends."""

    COMMAND: ClassVar[str] = "warmstart"
    RESUMABLE: ClassVar[bool] = True
    protocol: str = flag("online", "online chunks, or two phases (fraction, then all)", choices=PROTOCOLS)
    weight_decay: float = flag(0.0, "L2 weight decay", parse=nonnegative_float)
    threshold: float = flag(0.99, "train accuracy that ends a phase, in (0, 1]", parse=number(0.0, 1.0, low_open=True))
    max_steps: int = flag(1000, "step cap per phase", parse=positive_int)
    check_every: int = flag(10, "steps between train-accuracy checks", parse=positive_int)
    fraction: float = flag(0.5, "two-phase: first phase's share, in (0, 1)", parse=open_unit)
    chunks: int = flag(10, "online: the training set in this many chunks", parse=positive_int)
    chunk_size: int | None = flag(None, "online: samples per chunk (overrides --chunks)", parse=positive_int)
    replicates: int = flag(3, "members (seeds) per arm", parse=positive_int)
    sp: tuple[tuple[float, float], ...] | None = flag(
        None,
        "a shrink-perturb arm (repeatable)",
        parse=number_pair("LAM,SIGMA", ordered=False, minimum=0.0),
        metavar="LAM,SIGMA",
        repeat=True,
    )
    no_cold: bool = flag(False, "leave out the cold-start arm")
    no_warm: bool = flag(False, "leave out the warm-start arm")
    keep_optimizer_state: bool = flag(False, "warm/shrink-perturb members keep optimizer state across phases")
    # The study's documented settings: an MLP trained by SGD lr 0.01 (momentum 0.9).
    optimizer: str = override(OptimizerFlags, "optimizer", default="sgd", choices=OPTIMIZER_NAMES)
    lr: float = override(HparamFlags, "lr", default=0.01)


#: Keywords of ``run_study()`` whose errors name them; they are shown as flags.
LIBRARY_NAMES = ("chunk_size", "chunks", "fraction", "replicates")


def register(commands: Any) -> None:
    common.add_command(commands, WarmstartConfig, run, "cold vs warm vs shrink-perturb starts, trained in one stack")


def build_arms(config: WarmstartConfig) -> list[Arm]:
    """The arms ``config`` asks for: cold, warm, and the ``--sp`` arms (default: the study's)."""
    arms = [] if config.no_cold else [Arm("cold", "cold")]
    if not config.no_warm:
        arms.append(Arm("warm", "warm"))
    if config.sp is None:
        arms += [a for a in default_arms() if a.kind == "shrink_perturb"]
    else:
        for lam, sigma in dict.fromkeys(config.sp):
            arms.append(Arm.shrink_perturb(lam, sigma))
    return arms


def run(config: WarmstartConfig, console: Console, resume: bool = False) -> int:
    """Run (or resume) the study of ``config``, print the table, write the run folder; returns the exit code."""
    arms = build_arms(config)
    if not arms:
        raise common.UsageError("no arms left: drop --no-cold/--no-warm or add --sp LAM,SIGMA")
    device = common.device_of(config)
    data, model_fn = common.load_data(config, device)
    common.check_batch_size(config.batch_size, data)
    n = len(arms) * config.replicates
    what = f"--replicates {config.replicates} x {len(arms)} arms ({n} members)"
    common.preflight(data, model_fn, device, n, what, config.optimizer, config.batch_size)
    with common.run_folder(config, resume) as out:
        console.print(
            f"popvec warmstart: {config.protocol}, {len(arms)} arms x {config.replicates} replicates = {n} x {config.model} "
            f"in one stack, on {data.name} ({len(data.train)} train / {len(data.test)} test) on {device}"
        )
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[active]} of " + str(n) + " training"),
            TimeElapsedColumn(),
            console=console,
            disable=config.no_progress,
        )
        task: list[Any] = []

        def on_phase_start(phase: int, samples: int, _population: Any) -> None:
            if task:
                progress.remove_task(task.pop())
            task.append(progress.add_task(f"phase {phase + 1} ({samples} samples)", total=config.max_steps, active=n))

        def on_step(phase: int, step: int, active: Any, _population: Any) -> None:
            if step % 10 == 0:
                progress.update(task[-1], completed=step, active=int(active.sum()))

        def on_phase_end(record: PhaseRecord) -> None:
            progress.update(task[-1], completed=max(record.steps), active=0)
            parts = []
            for a, arm in enumerate(arms):
                members = [i for i in range(n) if i // config.replicates == a]
                acc = sum(record.test_accuracy[i] for i in members) / len(members)
                steps = sum(record.steps[i] for i in members) / len(members)
                parts.append(f"{arm.name} {100 * acc:.2f}% ({steps:.0f} steps)")
            progress.console.print(f"phase {record.phase + 1}, {record.samples} samples: " + "; ".join(parts))

        with progress:
            try:
                result = run_study(
                    model_fn,
                    data.train,
                    data.test,
                    protocol=config.protocol,
                    arms=arms,
                    replicates=config.replicates,
                    optimizer=config.optimizer,
                    lr=config.lr,
                    momentum=config.momentum,
                    weight_decay=config.weight_decay,
                    batch_size=config.batch_size,
                    threshold=config.threshold,
                    max_steps=config.max_steps,
                    check_every=config.check_every,
                    fraction=config.fraction,
                    chunk_size=config.chunk_size,
                    chunks=config.chunks,
                    reset_optimizer=not config.keep_optimizer_state,
                    seed=config.seed,
                    device=device,
                    on_phase_start=on_phase_start,
                    on_step=on_step,
                    on_phase_end=on_phase_end,
                    run_dir=out,
                    precision=config.precision,
                    resume=resume,
                )
            except ValueError as err:  # settings that do not fit the data (e.g. --chunk-size larger than the set)
                raise library_error(err, LIBRARY_NAMES) from None
        result.config.update(as_dict(config))
        write_json(out / "results.json", result.to_dict())
        write_json(out / "summary.json", result.summary())
        console.print(summary_table(result, config.model, data.name))
        console.print(
            f"Wall time {result.wall_time_s:.1f} s for all {n} members in one stack; 'time' is the stack's wall time "
            f"until the member stopped, summed over phases."
        )
        if not config.no_plots:
            path = plot_result(result, out / "warmstart.png", title=f"{config.model} on {data.name}, {config.protocol}")
            console.print(f"Plot: {path}" if path else escape(f"No plot written ({MissingMatplotlib()})"))
        console.print(f"Results: {out / 'results.json'}, {out / 'summary.json'}")
    return 0


def summary_table(result: WarmStartResult, model: str, dataset: str) -> Table:
    last = result.phases[-1]
    table = Table(
        title=f"{model} on {dataset}, {result.protocol}: after the last phase ({last.samples} samples)",
        title_justify="left",
        caption="test acc: mean ± sample std over the n replicates; 95% CI: Student t over the replicates (nan with n = 1)",
        caption_justify="left",
    )
    for name in ("arm", "n", "test acc", "95% CI", "mean over phases", "train acc", "steps", "time s", "reached"):
        table.add_column(name, justify="left" if name == "arm" else "right")
    for row in result.summary():
        finite = row["final_test_accuracy_n_finite"]
        table.add_row(
            row["arm"],
            str(row["members"]) if finite == row["members"] else f"{row['members']} ({row['members'] - finite} nan)",
            f"{100 * row['final_test_accuracy']:.2f} ± {100 * row['final_test_accuracy_std']:.2f}%",
            f"{100 * row['final_test_accuracy_ci_low']:.2f}-{100 * row['final_test_accuracy_ci_high']:.2f}%",
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
