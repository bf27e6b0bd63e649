"""What ``popvec hyperband`` and ``popvec pbt`` share: the search-space and early-stopping flags.

The space comes from ``--space FILE`` (TOML/YAML, see :mod:`popvec.search.space`) and/or range
flags (``--lr-range 1e-4,1e-1`` is log-uniform; so are ``--weight-decay-range`` and
``--clip-range`` when their low end is > 0; ``--momentum-range`` and ``--label-smoothing-range``
are uniform). Both commands end by printing the leaderboard and writing history.json,
leaderboard.json, summary.json and winner.pt to the run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console

from popvec import checks
from popvec.checkpoint import CheckpointError, save_checkpoint
from popvec.cli import common
from popvec.cli.argtypes import number_pair, positive_float, positive_int
from popvec.cli.common import UsageError, one_line
from popvec.cli.config import config
from popvec.cli.flags import flag, option
from popvec.losses import LOSS_HPARAM_RANGES, LOSS_HPARAMS
from popvec.optim import OPTIMIZER_HPARAMS, OPTIMIZERS
from popvec.population import Population, finite_members
from popvec.report import leaderboard_table, write_json
from popvec.search.files import load_space
from popvec.search.run import SearchResult, flat_rows
from popvec.search.space import LogUniform, SearchSpace, Uniform
from popvec.trainer import AllDiverged, divergence_of

__all__ = ["SearchFlags", "early_stopping", "finish", "library_error", "run_search", "search_space"]

RANGE_FLAGS = {  # field -> (hyperparameter, log-uniform when low > 0)
    "lr_range": ("lr", True),
    "weight_decay_range": ("weight_decay", True),
    "momentum_range": ("momentum", False),
    "label_smoothing_range": ("label_smoothing", False),
    "clip_range": ("max_grad_norm", True),
}
EARLY_STOPPING = ("grad_norm_threshold", "patience", "slope_window", "check_every")

Range = tuple[float, float] | None


@config
class SearchFlags:
    TITLE: ClassVar[str] = "search space and early stopping"
    space: str | None = flag(None, "search space file (.toml, or .yaml with PyYAML)")
    lr_range: Range = flag(None, "LOW,HIGH log-uniform (default 1e-4,1e-1 without --space)", parse=number_pair())
    weight_decay_range: Range = flag(None, "LOW,HIGH", parse=number_pair())
    momentum_range: Range = flag(None, "LOW,HIGH uniform (sgd)", parse=number_pair())
    label_smoothing_range: Range = flag(None, "LOW,HIGH uniform", parse=number_pair())
    clip_range: Range = flag(None, "LOW,HIGH per-member gradient clipping norm", parse=number_pair())
    grad_norm_threshold: float | None = flag(None, "early stop: gradient norm above this", parse=positive_float)
    patience: int | None = flag(None, "early stop: steps without val-loss improvement", parse=positive_int)
    slope_window: int | None = flag(None, "early stop: train-loss slope window (steps)", parse=positive_int)
    check_every: int | None = flag(None, "early-stopping checks every this many steps", parse=positive_int)


def search_space(config: Any) -> SearchSpace:
    """The space of ``--space`` and the range flags (``--lr-range 1e-4,1e-1`` when neither is given)."""
    params: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config.space is not None:
        try:
            params.update(load_space(config.space).params)
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            raise UsageError(f"--space: {err}") from None
        source.update((name, "--space") for name in params)
    for field, (name, log) in RANGE_FLAGS.items():
        value = getattr(config, field)
        if value is None:
            continue
        low, high = value
        if name in ("lr", "max_grad_norm") and low <= 0:
            raise UsageError(f"{option(field)}: needs LOW > 0, got {low}")
        if low < 0:
            raise UsageError(f"{option(field)}: needs LOW >= 0, got {low}")
        ranges = {**OPTIMIZERS[config.optimizer].hparam_ranges, **LOSS_HPARAM_RANGES}.get(name, {})
        try:
            for bound in (low, high):
                checks.number(name, bound, **ranges)
        except ValueError as err:
            raise UsageError(f"{option(field)}: {one_line(err)}") from None
        params[name] = LogUniform(low, high) if log and low > 0 else Uniform(low, high)
        source[name] = option(field)
    if not params:
        params["lr"] = LogUniform(1e-4, 1e-1)
    allowed = (*OPTIMIZER_HPARAMS[config.optimizer], *LOSS_HPARAMS)
    for name in params:
        if name not in allowed:
            raise UsageError(
                f"{source.get(name, '--space')}: hyperparameter {name!r} does not apply to --optimizer {config.optimizer} "
                f"(it takes {', '.join(allowed)})"
            )
    return SearchSpace(params)


def early_stopping(config: SearchFlags) -> dict[str, Any] | None:
    """The early-stopping keywords that were set, or None for no early stopping."""
    chosen = {k: getattr(config, k) for k in EARLY_STOPPING if getattr(config, k) is not None}
    return chosen or None


def library_error(err: ValueError, names: tuple[str, ...]) -> UsageError:
    """A search function's ``ValueError`` as a usage error, its keyword ``names`` spelled as flags."""
    message = str(err)
    for name in names:
        message = message.replace(name, option(name))
    return UsageError(message)


def run_search(
    config: Any,
    console: Console,
    resume: bool,
    search: Callable[..., SearchResult],
    specific: dict[str, Any],
    names: tuple[str, ...],
    title: str,
    plots: Callable[[SearchResult, Path], list[tuple[Callable[..., Any], tuple[Any, ...]]]],
    size: tuple[int, str] | None = None,
) -> int:
    """What ``popvec hyperband`` and ``popvec pbt`` share: data, run folder, the call with the shared
    settings plus the method's ``specific`` keywords, the leaderboard, files and plots. ``size``: the
    largest stack the search trains at once and the flags that set it, checked against memory first."""
    space = search_space(config)
    device = common.device_of(config)
    data, model_fn = common.load_data(config, device)
    common.check_batch_size(config.batch_size, data)
    if size is not None:
        common.preflight(data, model_fn, device, size[0], size[1], config.optimizer, config.batch_size)
    with common.run_folder(config, resume) as out:
        try:
            result = search(
                model_fn, space, data.train, data.val, data.test,
                optimizer=config.optimizer, batch_size=config.batch_size, seed=config.seed, device=device,
                early_stopping=early_stopping(config), console=console, progress=not config.no_progress,
                run_dir=out, resume=resume, precision=config.precision, **specific,
            )  # fmt: skip
        except CheckpointError as err:  # a corrupted checkpoint: its own line, the path left as it is
            raise UsageError(one_line(err)) from None
        except ValueError as err:
            raise library_error(err, names) from None
        check_finite_winner(result)
        finish(result, space, out, console, title)
        if not config.no_plots:
            common.save_plots(console, plots(result, out))
    return 0


def check_finite_winner(result: SearchResult) -> None:
    """Raise :class:`~popvec.trainer.AllDiverged` when the best member is not finite (diverged members
    rank last, so then none stayed finite): no winner is written."""
    best = result.best
    finite = bool(finite_members(Population.from_modules([result.winner]).params)[0])
    if finite and not best.get("diverged") and math.isfinite(best.get("val_loss", 0.0)):
        return
    history = result.history
    total = len(history.get("members") or {}) or int(history.get("config", {}).get("num_models") or len(result.leaderboard))
    raise AllDiverged(divergence_of(history), total)


def finish(result: SearchResult, space: SearchSpace, out: Path, console: Console, title: str) -> None:
    """Print the leaderboard and the winner; write history, leaderboard, summary and winner.pt."""
    rows = [{**r, "hparams": {k: v for k, v in r["hparams"].items() if k in space.params}} for r in result.leaderboard]
    console.print(leaderboard_table(flat_rows(rows), title=title))
    write_json(out / "history.json", result.history)
    write_json(out / "leaderboard.json", result.leaderboard)
    write_json(out / "summary.json", {"best": result.best, "cost": result.cost})
    save_checkpoint(out / "winner.pt", result.winner.state_dict())  # written atomically
    best = result.best
    test = f", test accuracy {100 * best['test_accuracy']:.2f}%" if "test_accuracy" in best else ""
    hp = ", ".join(f"{k}={v:.4g}" for k, v in best["hparams"].items() if k in space.params)
    console.print(f"Winner: member {best['id']} ({hp}), val accuracy {100 * best['val_accuracy']:.2f}%{test}; run folder {out}")
