"""``popvec instability``: the barrier between copies spawned at step k1 (Frankle et al. 2020).

One trunk trains to ``max(k1)``; copies of it at every k1 train ``k2`` steps in one stack; the
barriers between copies are measured. ``--seeds K`` trains K replicate trunks (seeds seed ..
seed + K - 1) side by side in one stack and reports every number per k1 as mean ± std with a 95%
Student-t confidence interval over the trunks. Writes config.json, instability.json (with the
per-seed values and the summaries), instability.png (with matplotlib) and the trunk checkpoints
``trunk_k1_<k1>.pt`` (all K trunks) to the run folder.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, ClassVar

from rich.console import Console
from torch import Tensor

from popvec.cli import common
from popvec.cli.argtypes import integer
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
from popvec.cli.lmc import CurveFlags
from popvec.report import leaderboard_table, make_progress, write_json
from popvec.stats import Summary
from popvec.studies import lmc

__all__ = ["InstabilityConfig", "register", "run"]


def k1_list(text: str) -> tuple[int, ...]:
    """``"0,10,50"`` -> ``(0, 10, 50)``: distinct integers >= 0, sorted."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0, e.g. 0,10,50; got {text!r}") from None
    if min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 0, got {text!r}")
    return tuple(sorted(values))


@config
class InstabilityConfig(CurveFlags, DataFlags, OptimizerFlags, HparamFlags, SeedFlags, PrecisionFlags, DeviceFlags, PlotFlags, RunFlags):
    """``popvec instability``: spawn steps, copies, and how the trunk and the copies train."""

    COMMAND: ClassVar[str] = "instability"
    RESUMABLE: ClassVar[bool] = True
    k1: tuple[int, ...] = flag((0, 10, 50, 100, 500), "spawn steps, e.g. 0,10,50,100,500", parse=k1_list)
    k2: int = flag(500, "steps every copy trains after spawning", parse=integer(1))
    copies: int = flag(2, "copies spawned at each k1", parse=integer(2))
    seeds: int = flag(
        1,
        "replicate trunks trained side by side in one stack (seeds seed..seed+K-1), reported as mean, std and confidence interval",
        parse=integer(1),
    )
    # The documented instability results: LeNet-5, SGD lr 0.05 (momentum 0.9).
    model: str = override(DataFlags, "model", default="lenet5")
    optimizer: str = override(OptimizerFlags, "optimizer", default="sgd")
    lr: float = override(HparamFlags, "lr", default=0.05)
    seed: int = override(SeedFlags, "seed", help="trunk init and order; copy c draws its order from seed + 1 + c")


def register(commands: Any) -> None:
    common.add_command(commands, InstabilityConfig, run, "barrier between copies spawned at step k1 (Frankle et al. 2020)")


def run(config: InstabilityConfig, console: Console, resume: bool = False) -> int:
    """Run (or resume) the instability analysis of ``config``; returns the exit code."""
    device = common.device_of(config)
    data, model_fn = common.load_data(config, device)
    common.check_batch_size(config.batch_size, data)
    branches = len(config.k1) * config.copies * config.seeds
    per = "k1" if config.seeds == 1 else "trunk and k1"
    trunks = "trunk" if config.seeds == 1 else f"{config.seeds} trunks (seeds {config.seed}..{config.seed + config.seeds - 1})"
    what = f"--copies {config.copies} x {len(config.k1)} --k1 values x --seeds {config.seeds} ({branches} branches)"
    common.preflight(data, model_fn, device, branches, what, config.optimizer, config.batch_size)
    with common.run_folder(config, resume) as out:
        console.print(
            f"popvec instability: {config.model} on {data.name}, {trunks} to k1 = {max(config.k1)}, then {branches} branches "
            f"({config.copies} per {per}) for k2 = {config.k2} steps in one stack on {device}; run folder {out}"
        )
        progress = make_progress(console, disable=config.no_progress)
        with progress:
            tasks = {
                "trunk": progress.add_task(trunks.split(" (")[0], total=max(config.k1), loss="-"),
                "branches": progress.add_task(f"{branches} branches", total=config.k2, loss="-"),
            }

            def on_step(phase: str, done: int, total: int, losses: Tensor) -> None:
                if done % 10 == 0 or done == total:
                    progress.update(tasks[phase], completed=done, loss=f"{float(losses.mean()):.4f}")

            result = lmc.instability(
                model_fn,
                common.optimizer_factory(config.optimizer, config.lr, config.momentum),
                data.train,
                list(config.k1),
                config.k2,
                copies=config.copies,
                seed=config.seed,
                num_seeds=config.seeds,
                batch_size=config.batch_size,
                eval_data=getattr(data, config.split),
                alphas=config.alphas,
                bn=config.bn,
                on_step=on_step,
                run_dir=out,
                resume=resume,
                precision=config.precision,
            )
        rows = [
            {
                "k1": r["k1"],
                "loss barrier": r["loss_barrier"],
                "error barrier %": 100 * r["error_barrier"],
                "L2": r["l2"],
                "error %": 100 * r["error"],
            }
            for r in result.rows()
        ]
        if config.seeds == 1:
            title = f"Instability on {config.split}, k2 = {config.k2} (means over pairs of copies)"
        else:
            rows = _summary_rows(result.k1, result.summaries())
            title = (
                f"Instability on {config.split}, k2 = {config.k2}: mean ± std over {config.seeds} trunks "
                "(each a mean over its pairs of copies), 95% Student-t CI"
            )
        console.print(leaderboard_table(rows, title=title))
        write_json(out / "instability.json", {"config": as_dict(config), **result.to_dict()})
        console.print(f"Table: {out / 'instability.json'}; trunk checkpoints: {out}/trunk_k1_<k1>.pt")
        if not config.no_plots:
            common.save_plots(console, [(result.plot, (out / "instability.png",))])
        diverged = [r["k1"] for r in result.rows() if not (math.isfinite(r["loss_barrier"]) and math.isfinite(r["error_barrier"]))]
        if diverged:  # a NaN barrier is no measurement: say so and fail
            k1s = ", ".join(map(str, diverged))
            bad = sorted({r["seed"] for r in result.seed_rows() if not math.isfinite(r["loss_barrier"] + r["error_barrier"])})
            which = "" if config.seeds == 1 else f" (trunk seeds {', '.join(map(str, bad))})"
            console.print(f"Barrier nan for k1 = {k1s}{which}: a copy's weights or loss became non-finite — try a smaller --lr")
            return 1
    return 0


def _summary_rows(k1: list[int], summaries: list[dict[str, Summary]]) -> list[dict[str, Any]]:
    """Table rows for K trunks: per k1 each column as ``mean ± std`` and its 95% CI, and n."""
    rows = []
    for k, row in zip(k1, summaries):
        loss, err = row["loss_barrier"], row["error_barrier"].scaled(100)
        rows.append(
            {
                "k1": k,
                "loss barrier": _mean_std(loss, ".4f"),
                "loss barrier 95% CI": _ci(loss, ".4f"),
                "error barrier %": _mean_std(err, ".2f"),
                "error barrier % 95% CI": _ci(err, ".2f"),
                "L2": _mean_std(row["l2"], ".3f"),
                "error %": _mean_std(row["error"].scaled(100), ".2f"),
                "n": loss.n if loss.n_finite == loss.n else f"{loss.n_finite} of {loss.n} finite",
            }
        )
    return rows


def _mean_std(s: Summary, fmt: str) -> str:
    return f"{s.mean:{fmt}} ± {s.std:{fmt}}"


def _ci(s: Summary, fmt: str) -> str:
    return f"{s.ci_low:{fmt}} to {s.ci_high:{fmt}}"
