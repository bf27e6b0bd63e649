"""The ``popvec`` command: one module per subcommand, shared flags and run folders in ``common``."""

from popvec.cli.main import add_train_arguments, build_parser, main, resolve_device

__all__ = ["add_train_arguments", "build_parser", "main", "resolve_device"]
