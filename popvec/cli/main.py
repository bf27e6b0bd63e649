"""The ``popvec`` command: one subcommand per module, each registered here.

Every command module has a config class (its flags), ``register(commands)`` and a runner
``run(config, console, resume=False) -> int``. ``main`` parses the flags (or reads
``--resume RUN_DIR``'s config.json), runs the command, and turns usage errors, unusable
checkpoints, arguments the library's validators refuse (:class:`popvec.checks.InvalidArgument`) and
populations too large for memory (:mod:`popvec.memory`) into one line, exit 2, and a run in which
no member stayed finite into one line, exit 1. The global torch generator is seeded with ``--seed`` first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from popvec.checkpoint import CheckpointError
from popvec.checks import InvalidArgument
from popvec.cli import hyperband, instability, lmc, pbt, train, warmstart
from popvec.cli.common import Command, Parser, UsageError, config_for, interrupted_line, one_line
from popvec.memory import PopulationTooLarge
from popvec.trainer import AllDiverged

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommands, in the order ``popvec --help`` lists them.
COMMANDS = (train, lmc, instability, hyperband, pbt, warmstart)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="popvec", description="Train populations of neural networks in one vmapped stack.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``popvec`` command; returns the exit code (2 for bad flags, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command: Command = args.popvec_command
    console = Console()
    config: Any = None
    try:
        config, resume = config_for(command, args, argv[argv.index(args.command) + 1 :])
        if getattr(config, "seed", None) is not None:
            torch.manual_seed(config.seed)  # every draw of the run follows --seed (a resumed run restores its saved RNG)
        return command.run(config, console, resume=resume)
    except (UsageError, CheckpointError, InvalidArgument, PopulationTooLarge) as err:  # one line, exit 2
        command.parser.error(one_line(err))
    except AllDiverged as err:  # a run with no finite member: no winner is written
        console.print(escape(f"{err} — try a smaller --lr"), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print(interrupted_line(command, config))
        return 130


if __name__ == "__main__":
    sys.exit(main())
