"""``popvec hyperband``: Hyperband / successive halving over a hyperparameter space, in one stack.

A resource unit is ``--unit-steps`` training steps. The run folder gets config.json,
history.json, leaderboard.json, summary.json, winner.pt and hyperband_val_loss.png (matplotlib).
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Console

from popvec.cli import common
from popvec.cli.argtypes import positive_int
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
    library_error,
    run_search,
)
from popvec.search.hyperband import hyperband, hyperband_brackets
from popvec.search.plots import plot_hyperband

__all__ = ["HyperbandConfig", "register", "run"]

#: Keywords of ``hyperband()`` whose errors name them; they are shown as flags.
LIBRARY_NAMES = ("max_t", "grace_period", "reduction_factor", "brackets", "unit_steps")


@config
class HyperbandConfig(SearchFlags, DataFlags, OptimizerFlags, SeedFlags, PrecisionFlags, DeviceFlags, PlotFlags, RunFlags):
    """``popvec hyperband``: the brackets, how long a resource unit is, and the rung rule."""

    COMMAND: ClassVar[str] = "hyperband"
    RESUMABLE: ClassVar[bool] = True
    max_t: int = flag(81, "resource units of the longest run", parse=positive_int, aliases=("--max-resource",))
    grace_period: int = flag(1, "resource units of the shortest run", parse=positive_int, aliases=("--min-resource",))
    reduction_factor: int = flag(3, "eta (>= 2): a rung keeps 1/eta (not train's --reduce-factor, a fraction kept)", parse=positive_int)
    brackets: int | None = flag(None, "how many brackets (most aggressive first); 1 = successive halving", parse=positive_int)
    unit_steps: int = flag(1, "training steps per resource unit", parse=positive_int)
    rule: str = flag("sha", "rung rule: fixed counts (sha) or ASHA quantile", choices=("sha", "asha"))
    sequential: bool = flag(False, "run brackets one after another instead of side by side")


def register(commands: Any) -> None:
    common.add_command(commands, HyperbandConfig, run, "Hyperband / successive halving over a hyperparameter space")


def run(config: HyperbandConfig, console: Console, resume: bool = False) -> int:
    """Run (or resume) the search of ``config``; returns the exit code."""
    try:
        sizes = [b.n for b in hyperband_brackets(config.max_t, config.grace_period, config.reduction_factor, config.brackets)]
    except ValueError as err:
        raise library_error(err, LIBRARY_NAMES) from None
    stack = max(sizes) if config.sequential else sum(sizes)  # the members trained at once
    specific = {
        "max_t": config.max_t,
        "grace_period": config.grace_period,
        "reduction_factor": config.reduction_factor,
        "brackets": config.brackets,
        "unit_steps": config.unit_steps,
        "rule": config.rule,
        "side_by_side": not config.sequential,
    }
    return run_search(
        config, console, resume, hyperband, specific, LIBRARY_NAMES,
        "Final leaderboard (survivors of the last rung of every bracket)",
        lambda result, out: [(plot_hyperband, (result.history, out / "hyperband_val_loss.png"))],
        size=(stack, f"--max-t {config.max_t} --reduction-factor {config.reduction_factor} (a stack of {stack} members)"),
    )  # fmt: skip
