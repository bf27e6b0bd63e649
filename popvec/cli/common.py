"""What every ``popvec`` command shares, written once.

The one-line usage errors (exit 2), the device, the dataset and model of a config, the optimizer
from the registry, the run folder (``runs/<command>-<YYYYmmdd-HHMMSS>`` unless ``--out``, with
its ``config.json``), ``--resume`` (the saved config back, only ``--device``/``--no-progress``
may change), and registering a command whose flags come from its config class.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.nn import functional as F

from popvec import memory, optim
from popvec.checks import InvalidArgument
from popvec.cli.config import DataFlags
from popvec.cli.flags import (
    ConfigError,
    add_flags,
    from_args,
    from_json,
    option,
    spec_of,
    to_json,
)
from popvec.data import DatasetSplits, load_dataset
from popvec.models import model_factory, required_image_size
from popvec.plots import MissingMatplotlib
from popvec.runlock import LOCK_NAME, RunLocked, clean_temp_files, lock_run_folder

__all__ = [
    "CONFIG_NAME",
    "Command",
    "Parser",
    "UsageError",
    "add_command",
    "check_batch_size",
    "check_finite_data",
    "check_model_fits",
    "config_for",
    "device_of",
    "interrupted_line",
    "load_data",
    "one_line",
    "optimizer_factory",
    "preflight",
    "refuse_existing_run",
    "resolve_device",
    "run_folder",
    "save_plots",
    "with_run_folder",
]

CONFIG_NAME = "config.json"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A setting the run cannot use; the command prints it as one line and exits 2."""


def one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


# --------------------------------------------------------------------------- device, data, optimizer
def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when present, else cpu; a cuda device without CUDA is refused (``ValueError``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device: {one_line(err)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def device_of(config: Any) -> torch.device:
    try:
        return resolve_device(config.device)
    except ValueError as err:
        raise UsageError(str(err)) from None


def load_data(config: DataFlags, device: torch.device) -> tuple[DatasetSplits, Callable[[], nn.Module]]:
    """The config's dataset (on ``device``) and a factory of its model for that data."""
    try:
        data = load_dataset(config.dataset, config.data_dir, config.download, image_size=required_image_size(config.model))
    except FileNotFoundError as err:
        raise UsageError(one_line(err)) from None
    check_finite_data(data)
    model_fn = model_factory(config.model, data.input_shape, data.num_classes)
    check_model_fits(model_fn, data, config.model)
    data = data.to(device)
    return data, model_fn


def check_model_fits(model_fn: Callable[[], nn.Module], data: DatasetSplits, name: str) -> None:
    """One model, in eval mode, on one training sample (CPU, before any run starts): a model whose input
    size does not fit the dataset is refused naming ``--model``, not met as a shape error mid-training.
    The global RNG is left as it was, so ``--seed`` draws the same numbers with or without this check."""
    x = data.train.x[:1]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model_fn().eval()(x)
    except (RuntimeError, ValueError) as err:
        raise UsageError(
            f"--model {name} does not fit {data.name} inputs of shape {tuple(data.input_shape)}: {one_line(err)}; "
            f"choose another --model or --dataset"
        ) from None


def check_finite_data(data: DatasetSplits) -> None:
    """Every split's inputs finite (checked once, on load): NaN or inf would make every loss over it NaN."""
    for name in ("train", "val", "test"):
        split = getattr(data, name, None)
        if split is not None and split.x.is_floating_point() and not bool(torch.isfinite(split.x).all()):
            raise UsageError(f"the {name} split of {data.name} contains NaN or inf inputs; clean the dataset first")


def check_batch_size(batch_size: int, data: DatasetSplits) -> None:
    """A batch larger than the training set is refused, not clamped: clamping would silently change the
    batch size and the steps per epoch the run's config.json records."""
    if batch_size > len(data.train):
        raise UsageError(f"argument --batch-size: must be <= {len(data.train)} (the training set), got {batch_size}")


def preflight(
    data: DatasetSplits,
    model_fn: Callable[[], nn.Module],
    device: torch.device,
    n: int,
    what: str,
    optimizer: str,
    batch_size: int,
    member_chunk_size: int | str | None = None,
    chunk_flag: str | None = None,
    eval_batch_size: int = 1024,
) -> memory.MemoryEstimate | None:
    """Refuse a population of ``n`` that cannot fit, in seconds and before anything is built
    (:class:`~popvec.memory.PopulationTooLarge`, printed as one line, exit 2; ``what`` names the flag).

    One member is probed on a training batch of ``batch_size`` and an evaluation batch of the
    validation split; ``chunk_flag`` names the command's chunking flag, if it has one, to suggest a
    chunk size that fits. ``POPVEC_MEMORY_CHECK=0`` skips the check.
    """
    x, y = data.train.x[:batch_size], data.train.y[:batch_size]
    x_eval = data.val.x[:eval_batch_size]
    return memory.preflight_training(model_fn, n, device, optimizer, x, y, F.cross_entropy, member_chunk_size, what, chunk_flag, x_eval)


def optimizer_factory(name: str, lr: float, momentum: float) -> Callable[[Any], optim.PopulationOptimizer]:
    """Registered optimizer ``name`` as a factory of one population (momentum applies to sgd only).

    A ``partial`` of the registry's class: ``optim.build`` (the trainers') calls those with the population.
    """
    registered: Callable[..., optim.PopulationOptimizer] = optim.OPTIMIZERS[name]
    if name == "sgd":
        return functools.partial(registered, lr=lr, momentum=momentum)
    return functools.partial(registered, lr=lr)


# --------------------------------------------------------------------------- run folders
def with_run_folder(config: Any) -> Any:
    """``config`` with ``out`` filled in: ``runs/<command>-<YYYYmmdd-HHMMSS>`` unless given."""
    if config.out is not None:
        return config
    return dataclasses.replace(config, out=str(Path("runs") / f"{config.COMMAND}-{time.strftime('%Y%m%d-%H%M%S')}"))


def refuse_existing_run(config: Any) -> None:
    """A new run may not go to a folder that already holds one (its ``config.json``), nor to a file."""
    if not str(config.out).strip():
        raise UsageError("--out: must name a folder, got an empty string")
    folder = Path(config.out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out: {folder} is a file, not a folder; choose another path")
    if (folder / CONFIG_NAME).exists():
        hint = f"resume it with --resume {folder} or choose" if config.RESUMABLE else "choose"
        raise UsageError(f"--out: {folder} already holds a run; {hint} another folder")


@contextlib.contextmanager
def run_folder(config: Any, resume: bool = False) -> Iterator[Path]:
    """The run folder of ``config``, locked for the whole ``with`` block; a new run writes ``config.json`` there first.

    The lock (``.lock``, see :mod:`popvec.runlock`) refuses a second run on the folder, new or
    resumed, with one line naming the run that holds it; a lock left by a dead process on this
    host is taken over. Once locked, temp files left by killed writes are removed. A folder that
    already holds a run (a ``config.json``) is refused for a new run. If the run then stops on a
    :class:`UsageError` before writing anything else, the folder is left as it was found.
    """
    config = with_run_folder(config)
    folder = Path(config.out)
    record = folder / CONFIG_NAME
    created = not folder.exists()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock_run_folder(folder, f"popvec {config.COMMAND}" + (" --resume" if resume else "")))
        except RunLocked as err:
            raise UsageError(one_line(err)) from None
        clean_temp_files(folder)
        if resume:
            yield folder
            return
        try:
            refuse_existing_run(config)
        except UsageError:
            stack.close()
            if created:
                folder.rmdir()
            raise
        to_json(config, record)
        try:
            yield folder
        except (UsageError, InvalidArgument):
            if [p.name for p in folder.iterdir() if p.name != LOCK_NAME] == [CONFIG_NAME]:
                record.unlink()
                stack.close()
                if created:
                    folder.rmdir()
            raise


def save_plots(console: Console, jobs: Iterable[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    """Call each ``plot(*args)`` and print the path; without matplotlib say so once and stop."""
    for plot, args in jobs:
        try:
            console.print(f"Plot: {plot(*args)}")
        except MissingMatplotlib as err:
            console.print(escape(f"No plot written ({one_line(err)})"))
            return


# --------------------------------------------------------------------------- commands and --resume
class Runner(Protocol):
    def __call__(self, config: Any, console: Console, resume: bool = False) -> int: ...


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``popvec`` subcommand: its config class, its runner and its parser (for error lines)."""

    config: type
    run: Runner
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return self.config.COMMAND  # type: ignore[attr-defined, no-any-return]


def add_command(commands: Any, config_cls: type, run: Runner, help: str) -> Command:
    """Add subcommand ``config_cls.COMMAND``: a flag per config field, plus ``--resume`` when it trains."""
    parser = commands.add_parser(config_cls.COMMAND, help=help, description=help)  # type: ignore[attr-defined]
    groups = add_flags(parser, config_cls)
    if config_cls.RESUMABLE:  # type: ignore[attr-defined]
        groups.get("run folder", parser).add_argument(
            "--resume", metavar="RUN_DIR", default=None, help=f"continue the run in RUN_DIR with its {CONFIG_NAME}"
        )
    command = Command(config_cls, run, parser)
    parser.set_defaults(popvec_command=command)
    return command


def config_for(command: Command, args: argparse.Namespace, argv: Sequence[str]) -> tuple[Any, bool]:
    """The config to run and whether it resumes: from the flags, or from ``--resume RUN_DIR``'s config.json.

    ``argv``: the command's own arguments (after its name), to see which flags were typed.
    """
    if getattr(args, "resume", None) is None:
        config = with_run_folder(from_args(command.config, args))
        refuse_existing_run(config)  # before any data is loaded
        return config, False
    folder = Path(args.resume)
    if not (folder / CONFIG_NAME).is_file():
        raise UsageError(f"--resume: {folder} holds no {CONFIG_NAME} to resume from")
    try:
        saved: Any = from_json(command.config, folder / CONFIG_NAME)
    except ConfigError as err:
        raise UsageError(f"--resume: {err}") from None
    may_change = [f.name for f in dataclasses.fields(command.config) if spec_of(f).resume_may_change]
    typed = _typed_flags(command.config, argv)
    for name in typed:
        if name not in may_change:
            raise UsageError(
                f"{option(name)}: cannot be given with --resume (the run's settings are in {folder / CONFIG_NAME}); "
                f"only {' and '.join(map(option, may_change))} may change"
            )
    return dataclasses.replace(saved, out=str(folder), **{name: getattr(args, name) for name in typed}), True


def _typed_flags(config_cls: type, argv: Sequence[str]) -> list[str]:
    """The config fields whose flags appear in ``argv``, in the order typed (parsed without defaults)."""
    probe = Parser(add_help=False)
    add_flags(probe, config_cls, suppress_defaults=True)
    probe.add_argument("--resume")
    return [name for name in vars(probe.parse_args(list(argv))) if name != "resume"]


def interrupted_line(command: Command, config: Any | None) -> str:
    """What to print on Ctrl-C: how to continue, when the run folder can be resumed."""
    folder = Path(config.out) if config is not None and config.out is not None else None
    if command.config.RESUMABLE and folder is not None and (folder / CONFIG_NAME).is_file():  # type: ignore[attr-defined]
        return f"Interrupted. Continue with: popvec {command.name} --resume {folder}"
    return "Interrupted."
