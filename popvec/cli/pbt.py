"""``popvec pbt``: population-based training (exploit/explore) over a hyperparameter space, in one stack.

The run folder gets config.json, history.json, leaderboard.json, summary.json, winner.pt,
pbt_hparams.png and pbt_lineage.png (matplotlib).
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Console

from popvec.cli import common
from popvec.cli.argtypes import number, positive_int
from popvec.cli.config import (
    DataFlags,
    DeviceFlags,
    OptimizerFlags,
    PlotFlags,
    PrecisionFlags,
    RunFlags,
    SeedFlags,
    config,
)
from popvec.cli.flags import flag
from popvec.cli.search import (
    SearchFlags,
    run_search,
)
from popvec.search.pbt import pbt
from popvec.search.plots import plot_pbt_hparams, plot_pbt_lineage

__all__ = ["PBTConfig", "register", "run"]

#: Keywords of ``pbt()`` whose errors name them; they are shown as flags.
LIBRARY_NAMES = ("num_models", "perturbation_interval", "quantile_fraction")


@config
class PBTConfig(SearchFlags, DataFlags, OptimizerFlags, SeedFlags, PrecisionFlags, DeviceFlags, PlotFlags, RunFlags):
    """``popvec pbt``: how many members, how often they exploit/explore, and for how long."""

    COMMAND: ClassVar[str] = "pbt"
    RESUMABLE: ClassVar[bool] = True
    num_models: int = flag(16, "members of the population", parse=positive_int, hidden_aliases=("--population",))
    perturbation_interval: int = flag(50, "steps between exploit/explore decisions", parse=positive_int)
    steps: int = flag(1000, "training steps in total", parse=positive_int)
    quantile_fraction: float = flag(0.25, "bottom/top fraction that exploits/is copied, in (0, 0.5]", parse=number(0.0, 0.5, low_open=True))
    resample_probability: float = flag(0.25, "chance an explored value is resampled, in [0, 1]", parse=number(0.0, 1.0))


def register(commands: Any) -> None:
    common.add_command(commands, PBTConfig, run, "population-based training (exploit/explore) in one stack")


def run(config: PBTConfig, console: Console, resume: bool = False) -> int:
    """Run (or resume) PBT as ``config`` says; returns the exit code."""
    specific = {
        "num_models": config.num_models,
        "perturbation_interval": config.perturbation_interval,
        "steps": config.steps,
        "quantile_fraction": config.quantile_fraction,
        "resample_probability": config.resample_probability,
    }
    return run_search(
        config, console, resume, pbt, specific, LIBRARY_NAMES, "Final leaderboard (every member at the end)",
        lambda result, out: [
            (plot_pbt_hparams, (result.history, out / "pbt_hparams.png")),
            (plot_pbt_lineage, (result.history, out / "pbt_lineage.png")),
        ],
        size=(config.num_models, f"--num-models {config.num_models}"),
    )  # fmt: skip
