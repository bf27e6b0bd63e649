"""``popvec hyperband`` and ``popvec pbt``: hyperparameter search on the built-in data in one stack.

A resource unit is ``--unit-steps`` training steps (default 1). The search space comes from
``--space FILE`` (TOML/YAML, see :mod:`popvec.search.space`) and/or range flags
(``--lr-range 1e-4,1e-1`` is log-uniform; so are ``--weight-decay-range`` and ``--clip-range``
when their low end is > 0; ``--momentum-range`` and ``--label-smoothing-range`` are uniform).
The run folder gets config.json, history.json, leaderboard.json, summary.json, winner.pt and
PNG plots (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from popvec.cli.argtypes import number, number_pair, positive_float, positive_int
from popvec.data import DATASET_NAMES, load_dataset
from popvec.models import MODEL_NAMES, model_factory, required_image_size
from popvec.report import leaderboard_table, write_json
from popvec.search.plots import MissingMatplotlib, plot_hyperband, plot_pbt_hparams, plot_pbt_lineage
from popvec.search.run import SearchResult, flat_rows
from popvec.losses import LOSS_HPARAMS
from popvec.search.space import OPTIMIZER_HPARAMS, OPTIMIZERS, LogUniform, SearchSpace, Uniform, load_space

__all__ = ["register"]

RANGE_FLAGS = {  # flag -> (hyperparameter, log-uniform when low > 0)
    "lr_range": ("lr", True),
    "weight_decay_range": ("weight_decay", True),
    "momentum_range": ("momentum", False),
    "label_smoothing_range": ("label_smoothing", False),
    "clip_range": ("max_grad_norm", True),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODEL_NAMES, default="mlp")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="digits", help="digits is built in (offline)")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="member j is initialized with seed + j; sampling is seeded too")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--space", default=None, help="search space file (.toml, or .yaml with PyYAML)")
    parser.add_argument("--lr-range", type=number_pair(), default=None, help="LOW,HIGH log-uniform (default 1e-4,1e-1 without --space)")
    parser.add_argument("--weight-decay-range", type=number_pair(), default=None, help="LOW,HIGH")
    parser.add_argument("--momentum-range", type=number_pair(), default=None, help="LOW,HIGH uniform (sgd)")
    parser.add_argument("--label-smoothing-range", type=number_pair(), default=None, help="LOW,HIGH uniform")
    parser.add_argument("--clip-range", type=number_pair(), default=None, help="LOW,HIGH per-member gradient clipping norm")
    parser.add_argument("--grad-norm-threshold", type=positive_float, default=None, help="early stop: gradient norm above this")
    parser.add_argument("--patience", type=positive_int, default=None, help="early stop: steps without val-loss improvement")
    parser.add_argument("--slope-window", type=positive_int, default=None, help="early stop: train-loss slope window (steps)")
    parser.add_argument("--check-every", type=positive_int, default=None, help="early-stopping checks every this many steps")
    parser.add_argument("--out", default=None, help="run folder (default runs/<command>-<timestamp>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")


def register(commands: Any) -> None:
    hb = commands.add_parser("hyperband", help="Hyperband / successive halving over a hyperparameter space")
    hb.add_argument("--max-t", "--max-resource", dest="max_t", type=positive_int, default=81, help="resource units of the longest run")
    hb.add_argument("--grace-period", "--min-resource", dest="grace_period", type=positive_int, default=1)
    hb.add_argument("--reduction-factor", type=positive_int, default=3, help="eta (>= 2)")
    hb.add_argument("--brackets", type=positive_int, default=None, help="how many brackets (most aggressive first); 1 = successive halving")
    hb.add_argument("--unit-steps", type=positive_int, default=1, help="training steps per resource unit")
    hb.add_argument("--rule", choices=("sha", "asha"), default="sha", help="rung rule: fixed counts or ASHA quantile")
    hb.add_argument("--sequential", action="store_true", help="run brackets one after another instead of side by side")
    _common(hb)
    hb.set_defaults(run=_run_hyperband)
    pb = commands.add_parser("pbt", help="population-based training (exploit/explore) in one stack")
    pb.add_argument("--population", type=positive_int, default=16)
    pb.add_argument("--perturbation-interval", type=positive_int, default=50)
    pb.add_argument("--steps", type=positive_int, default=1000)
    pb.add_argument("--quantile-fraction", type=number(0.0, 0.5, low_open=True), default=0.25, help="in (0, 0.5]")
    pb.add_argument("--resample-probability", type=number(0.0, 1.0), default=0.25, help="in [0, 1]")
    _common(pb)
    pb.set_defaults(run=_run_pbt)


# ---------------------------------------------------------------------------- shared steps
def _space(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SearchSpace:
    params: dict[str, Any] = {}
    source: dict[str, str] = {}
    if args.space is not None:
        try:
            params.update(load_space(args.space).params)
            source.update((name, "--space") for name in params)
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            parser.error(f"--space: {err}")
    for flag, (name, log) in RANGE_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        low, high = value
        if name in ("lr", "max_grad_norm") and low <= 0:
            parser.error(f"--{flag.replace('_', '-')}: needs LOW > 0, got {low}")
        if low < 0:
            parser.error(f"--{flag.replace('_', '-')}: needs LOW >= 0, got {low}")
        params[name] = LogUniform(low, high) if log and low > 0 else Uniform(low, high)
        source[name] = f"--{flag.replace('_', '-')}"
    if not params:
        params["lr"] = LogUniform(1e-4, 1e-1)
    allowed = (*OPTIMIZER_HPARAMS[args.optimizer], *LOSS_HPARAMS)
    for name in params:
        if name not in allowed:
            parser.error(f"{source.get(name, '--space')}: hyperparameter {name!r} does not apply to --optimizer {args.optimizer} (it takes {', '.join(allowed)})")
    return SearchSpace(params)


def _early(args: argparse.Namespace) -> dict[str, Any] | None:
    keys = ("grad_norm_threshold", "patience", "slope_window", "check_every")
    chosen = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    return chosen or None


def _setup(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> tuple[Any, Any, Path, torch.device]:
    from popvec.cli import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    try:
        data = load_dataset(args.dataset, args.data_dir, args.download, image_size=required_image_size(args.model)).to(device)
    except FileNotFoundError as err:
        parser.error(str(err))
    if args.batch_size > len(data.train):
        parser.error(f"--batch-size: must be <= {len(data.train)} (the training set), got {args.batch_size}")
    out = Path(args.out or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {k: v for k, v in vars(args).items() if k not in ("run", "command")})
    return data, model_factory(args.model, data.input_shape, data.num_classes), out, device


def _finish(result: SearchResult, space: SearchSpace, out: Path, console: Console, title: str) -> None:
    rows = [{**r, "hparams": {k: v for k, v in r["hparams"].items() if k in space.params}} for r in result.leaderboard]
    console.print(leaderboard_table(flat_rows(rows), title=title))
    write_json(out / "history.json", result.history)
    write_json(out / "leaderboard.json", result.leaderboard)
    summary = {"best": result.best, "cost": result.cost}
    write_json(out / "summary.json", summary)
    torch.save(result.winner.state_dict(), out / "winner.pt")
    best = result.best
    test = f", test accuracy {100 * best['test_accuracy']:.2f}%" if "test_accuracy" in best else ""
    hp = ", ".join(f"{k}={v:.4g}" for k, v in best["hparams"].items() if k in space.params)
    console.print(f"Winner: member {best['id']} ({hp}), val accuracy {100 * best['val_accuracy']:.2f}%{test}; run folder {out}")


def _plots(console: Console, jobs: list[tuple[Callable[..., Path], tuple[Any, ...]]]) -> None:
    for fn, fn_args in jobs:
        try:
            console.print(f"Plot: {fn(*fn_args)}")
        except MissingMatplotlib as err:
            console.print(escape(str(err)))
            return


def _flag_names(message: str) -> str:
    for name in ("max_t", "grace_period", "reduction_factor", "brackets", "unit_steps", "perturbation_interval", "quantile_fraction"):
        message = message.replace(name, "--" + name.replace("_", "-"))
    return message


# ---------------------------------------------------------------------------- commands
def _run_hyperband(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    from popvec.search.hyperband import hyperband, hyperband_brackets

    try:
        hyperband_brackets(args.max_t, args.grace_period, args.reduction_factor, args.brackets)
    except ValueError as err:
        parser.error(_flag_names(str(err)))
    space = _space(args, parser)
    data, model_fn, out, device = _setup(args, parser, console)
    try:
        result = hyperband(
            model_fn, space, data.train, data.val, data.test, max_t=args.max_t, grace_period=args.grace_period,
            reduction_factor=args.reduction_factor, brackets=args.brackets, unit_steps=args.unit_steps, optimizer=args.optimizer,
            batch_size=args.batch_size, seed=args.seed, device=device, rule=args.rule, side_by_side=not args.sequential,
            early_stopping=_early(args), console=console, progress=not args.no_progress,
        )
    except ValueError as err:
        parser.error(_flag_names(str(err)))
    _finish(result, space, out, console, "Final leaderboard (survivors of the last rung of every bracket)")
    if not args.no_plots:
        _plots(console, [(plot_hyperband, (result.history, out / "hyperband_val_loss.png"))])
    return 0


def _run_pbt(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    from popvec.search.pbt import pbt

    space = _space(args, parser)
    data, model_fn, out, device = _setup(args, parser, console)
    try:
        result = pbt(
            model_fn, space, data.train, data.val, data.test, num_models=args.population,
            perturbation_interval=args.perturbation_interval, steps=args.steps, quantile_fraction=args.quantile_fraction,
            resample_probability=args.resample_probability, optimizer=args.optimizer, batch_size=args.batch_size,
            seed=args.seed, device=device, early_stopping=_early(args), console=console, progress=not args.no_progress,
        )
    except ValueError as err:
        parser.error(_flag_names(str(err)))
    _finish(result, space, out, console, "Final leaderboard (every member at the end)")
    if not args.no_plots:
        _plots(console, [
            (plot_pbt_hparams, (result.history, out / "pbt_hparams.png")),
            (plot_pbt_lineage, (result.history, out / "pbt_lineage.png")),
        ])
    return 0
