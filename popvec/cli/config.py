"""The flag groups the ``popvec`` commands share, each defined once.

A command's config class inherits the groups it needs (``class TrainConfig(DataFlags, ...)``) and
adds its own fields; where a command wants another default for a shared flag it says so in one
line with :func:`~popvec.cli.flags.override`. Same meaning, same flag, in every command.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch

from popvec import optim
from popvec.cli.argtypes import nonnegative_float, positive_float, positive_int, seed
from popvec.cli.flags import flag
from popvec.data import DATASET_NAMES
from popvec.models import MODEL_NAMES
from popvec.precision import PRECISIONS

__all__ = [
    "DataFlags",
    "DeviceFlags",
    "HparamFlags",
    "OptimizerFlags",
    "OutFlags",
    "PlotFlags",
    "PrecisionFlags",
    "RunFlags",
    "SeedFlags",
    "config",
    "device_name",
]

#: Every config class: immutable, fields by keyword (shared groups can then be combined freely).
config = dataclass(frozen=True, kw_only=True)


def device_name(text: str) -> str:
    """``auto`` or a name ``torch.device`` understands (whether it is present is checked when the run starts)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be auto or a torch device such as cpu, cuda, cuda:1, mps; got {text!r}") from None
    return text


@config
class DataFlags:
    TITLE: ClassVar[str] = "data and model"
    dataset: str = flag("digits", "digits is built in (offline)", choices=DATASET_NAMES)
    data_dir: str = flag("./data", "where torchvision datasets live")
    download: bool = flag(False, "download a torchvision dataset if missing")
    model: str = flag("mlp", "network architecture", choices=MODEL_NAMES)


@config
class DeviceFlags:
    TITLE: ClassVar[str] = "device"
    device: str = flag("auto", "auto (cuda if present), cpu, cuda, cuda:1, ...", parse=device_name, resume_may_change=True)


@config
class PrecisionFlags:
    TITLE: ClassVar[str] = "device"
    precision: str = flag(
        "fp32",
        "fp32, or autocast to bf16 / fp16 (fp16: a dynamic loss scale per member) for training and evaluation; weights stay fp32",
        choices=PRECISIONS,
        missing_ok=True,  # runs saved before the flag existed trained in fp32
    )


@config
class SeedFlags:
    TITLE: ClassVar[str] = "seed"
    seed: int = flag(0, "member i is initialized with seed + i; data order and sampling are seeded too", parse=seed)


@config
class OptimizerFlags:
    TITLE: ClassVar[str] = "optimizer"
    optimizer: str = flag("adam", "the population optimizer", choices=tuple(optim.OPTIMIZERS))
    batch_size: int = flag(64, "training batch size", parse=positive_int)


@config
class HparamFlags:
    """The optimizer's hyperparameters, when a command fixes them (searches sample them instead)."""

    TITLE: ClassVar[str] = "optimizer"
    lr: float = flag(0.001, "learning rate", parse=positive_float)
    momentum: float = flag(0.9, "SGD momentum (sgd only)", parse=nonnegative_float)


@config
class OutFlags:
    TITLE: ClassVar[str] = "run folder"
    out: str | None = flag(None, "run folder (default: runs/<command>-<YYYYmmdd-HHMMSS>)", metavar="RUN_DIR")


@config
class RunFlags(OutFlags):
    no_progress: bool = flag(False, "no live progress bar", resume_may_change=True)


@config
class PlotFlags:
    TITLE: ClassVar[str] = "run folder"
    no_plots: bool = flag(False, "write no PNG plots")
