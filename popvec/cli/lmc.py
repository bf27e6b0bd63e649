"""``popvec lmc A.pt B.pt``: loss and error along the straight line between two saved networks.

A and B are ``state_dict``s (e.g. the ``winner.pt`` of two ``popvec train`` runs). Prints the
curve and the barriers; writes config.json, lmc.json and (with matplotlib) lmc.png to the run
folder. :class:`CurveFlags` (split, alphas, BatchNorm statistics) are shared with ``instability``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from popvec.checkpoint import CheckpointError, load_checkpoint
from popvec.cli import common
from popvec.cli.argtypes import integer
from popvec.cli.config import DataFlags, DeviceFlags, OptimizerFlags, OutFlags, PlotFlags, PrecisionFlags, config
from popvec.cli.flags import as_dict, flag, override
from popvec.data import DatasetSplits
from popvec.models import build_model
from popvec.report import write_json
from popvec.studies import lmc

__all__ = ["CurveFlags", "LMCConfig", "register", "run"]


@config
class CurveFlags:
    TITLE: ClassVar[str] = "interpolation"
    split: str = flag("test", "split the curve is measured on", choices=("test", "train", "val"))
    alphas: int = flag(25, "equally spaced alphas in [0, 1], both ends", parse=integer(2))
    bn: lmc.BNMode = flag("auto", "BatchNorm statistics: recompute on train (auto) or keep", choices=lmc.BN_MODES)


@config
class LMCConfig(CurveFlags, DataFlags, PrecisionFlags, DeviceFlags, PlotFlags, OutFlags):
    """``popvec lmc``: the two networks, where the curve is measured, and how finely."""

    COMMAND: ClassVar[str] = "lmc"
    RESUMABLE: ClassVar[bool] = False
    a: str = flag(help="state_dict of the network at alpha 0 (e.g. a winner.pt)", metavar="A.pt")
    b: str = flag(help="state_dict of the network at alpha 1", metavar="B.pt")
    batch_size: int = override(OptimizerFlags, "batch_size", default=1024, help="evaluation batch size")
    # LeNet-5: the model of the documented LMC results.
    model: str = override(DataFlags, "model", default="lenet5")


def register(commands: Any) -> None:
    common.add_command(commands, LMCConfig, run, "loss and error along the line between two saved networks")


def _load_model(path: str, label: str, config: LMCConfig, data: DatasetSplits, device: torch.device) -> nn.Module:
    """The network in ``path`` (the ``label`` argument, A.pt or B.pt), refused in one line naming it."""
    model = build_model(config.model, data.input_shape, data.num_classes)
    if not path.strip() or Path(path).is_dir():
        raise common.UsageError(f"{label}: must be a state_dict file, got {'a directory ' + path if path.strip() else 'an empty path'}")
    try:
        state = load_checkpoint(path, map_location=device)  # checks the sha256 of a popvec winner.pt
    except (FileNotFoundError, CheckpointError) as err:
        raise common.UsageError(f"{label}: {common.one_line(err)}") from None
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise common.UsageError(f"{label}: {path} is not a --model {config.model} state_dict for {config.dataset}: {mismatch}")
    try:
        model.load_state_dict(state)
    except (OSError, RuntimeError, AttributeError, TypeError) as err:
        raise common.UsageError(
            f"{label}: {path} is not a --model {config.model} state_dict for {config.dataset}: {common.one_line(err)}"
        ) from None
    return model.to(device)


def state_dict_mismatch(expected: dict[str, Any], state: dict[str, Any], shown: int = 3) -> str:
    """How ``state`` differs from ``expected`` in keys and shapes, in one short line ('' when it fits)."""

    def listed(items: list[str]) -> str:
        return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    parts = [
        f"{what}: {listed(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    return "; ".join(parts)


def _curve_table(result: lmc.InterpolationResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("alpha", "loss", "error", "loss gap", "error gap"):
        table.add_column(name, justify="right")
    for alpha, loss, error, loss_gap, error_gap in zip(
        *(t.tolist() for t in (result.alphas, result.loss, result.error, result.loss_gap, result.error_gap))
    ):
        table.add_row(f"{alpha:.3f}", f"{loss:.4f}", f"{100 * error:.2f}%", f"{loss_gap:+.4f}", f"{100 * error_gap:+.2f}%")
    return table


def run(config: LMCConfig, console: Console, resume: bool = False) -> int:
    """Measure the curve between ``config.a`` and ``config.b``; ``resume`` does not apply (nothing trains)."""
    device = common.device_of(config)
    data, _ = common.load_data(config, device)
    a, b = (_load_model(path, label, config, data, device) for path, label in ((config.a, "A.pt"), (config.b, "B.pt")))
    split = getattr(data, config.split)
    lmc.check_interpolation(  # before the run folder: a size that cannot fit is one line, exit 2
        a, b, split, config.alphas, config.bn, data.train, config.batch_size, what=f"--alphas {config.alphas}", chunk_flag=None
    )
    with common.run_folder(config) as out:
        result = lmc.interpolate(
            a,
            b,
            split,
            config.alphas,
            bn=config.bn,
            bn_data=data.train,
            batch_size=config.batch_size,
            memory_check=False,
            precision=config.precision,
        )
        console.print(
            _curve_table(result, f"{config.a} -> {config.b} ({config.model} on {data.name} {config.split}, {len(split)} samples)")
        )
        console.print(
            f"loss barrier {result.loss_barrier:.4f}, error barrier {100 * result.error_barrier:.2f}%, "
            f"L2 distance {result.l2:.3f} (BatchNorm statistics: {result.bn})"
        )
        write_json(out / "lmc.json", {"config": as_dict(config), **result.to_dict()})
        console.print(f"Curve: {out / 'lmc.json'}")
        if not config.no_plots:
            common.save_plots(console, [(result.plot, (out / "lmc.png",))])
    if not (math.isfinite(result.loss_barrier) and math.isfinite(result.error_barrier)):  # no measurement: say so and fail
        console.print("Barrier nan: a network on the path has non-finite weights or loss (see the warning above)")
        return 1
    return 0
