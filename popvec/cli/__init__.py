"""The ``popvec`` command: one module per subcommand, each with its config class; shared pieces in ``common``."""

from popvec.cli.common import resolve_device
from popvec.cli.main import build_parser, main
from popvec.cli.train import add_train_arguments

__all__ = ["add_train_arguments", "build_parser", "main", "resolve_device"]
