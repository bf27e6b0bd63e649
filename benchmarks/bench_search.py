"""Science check of issue 5: a learning-rate search on the built-in digits, Hyperband (and one
successive-halving bracket) vs training every sampled member for the full budget.

Same members (initializations and sampled learning rates), same shared batch order, same budget per
surviving member; the winner is picked by validation loss and scored on the test split.
Per method it reports, over the seeds, the winner's test accuracy and the difference winner -
naive winner as mean ± sample std with a 95% Student-t confidence interval (n = seeds), plus how
many seeds the search winner scored worse than the naive one; the per-seed rows are kept.

    python benchmarks/bench_search.py [--device cpu] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from common import environment, sync, write_report
from rich.console import Console

from popvec.data import load_dataset
from popvec.loaders import DeviceLoader
from popvec.models import model_factory
from popvec.search.hyperband import hyperband, hyperband_brackets
from popvec.search.run import leaderboard, make_trainer
from popvec.search.space import LogUniform, SearchSpace
from popvec.stats import summarize

SPACE = SearchSpace({"lr": LogUniform(1e-5, 1.0)})


def naive(model_fn: Any, n: int, steps: int, data: Any, seed: int, device: torch.device) -> dict[str, Any]:
    """Every member of the Hyperband run (same ids, inits, learning rates) trained for ``steps``."""
    start = time.perf_counter()
    trainer = make_trainer(model_fn, SPACE.sample(n, seed), "adam", seed, device, Console(quiet=True), progress=False)
    trainer.fit(DeviceLoader(data.train, 64, seed=seed), data.val, steps)
    board = leaderboard(trainer, data.val, data.test)
    sync(device)
    return {"member_steps": trainer.member_steps, "wall_time_s": time.perf_counter() - start, "best": board[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-t", type=int, default=27)
    parser.add_argument("--unit-steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_dataset("digits").to(device)
    model_fn = model_factory("mlp", data.input_shape, data.num_classes)
    quiet = Console(quiet=True)
    steps = args.max_t * args.unit_steps
    rows = []
    load_before = os.getloadavg()
    for seed in args.seeds:
        for label, brackets in (("hyperband", None), ("successive halving (1 bracket)", 1)):
            n = sum(b.n for b in hyperband_brackets(args.max_t, brackets=brackets))
            start = time.perf_counter()
            result = hyperband(
                model_fn,
                SPACE,
                data.train,
                data.val,
                data.test,
                max_t=args.max_t,
                unit_steps=args.unit_steps,
                brackets=brackets,
                seed=seed,
                device=device,
                console=quiet,
                progress=False,
            )
            sync(device)
            wall = time.perf_counter() - start
            base = naive(model_fn, n, steps, data, seed, device)
            row = {
                "seed": seed,
                "method": label,
                "members": n,
                "budget_steps": steps,
                "member_steps": result.cost["member_steps"],
                "naive_member_steps": base["member_steps"],
                "fraction": result.cost["member_steps"] / base["member_steps"],
                "wall_s": wall,
                "naive_wall_s": base["wall_time_s"],
                "winner_lr": result.best["hparams"]["lr"],
                "winner_test_acc": result.best["test_accuracy"],
                "naive_winner_lr": base["best"]["hparams"]["lr"],
                "naive_winner_test_acc": base["best"]["test_accuracy"],
                "winner_val_loss": result.best["val_loss"],
                "naive_winner_val_loss": base["best"]["val_loss"],
            }
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = summarize_methods(rows)
    for method, stats in summary.items():
        print(
            f"{method}: winner test accuracy {stats['winner_test_acc']['text']}; winner - naive winner "
            f"{stats['diff_vs_naive']['text']}; worse than naive in {stats['worse_seeds']} of {stats['seeds']} seeds"
            + (f" (by up to {-100 * stats['worst_diff']:.2f} points)" if stats["worse_seeds"] else ""),
            flush=True,
        )
    env = {**environment(device), "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    write_report({"environment": env, "summary": summary, "rows": rows, "space": SPACE.to_dict()}, None, f"bench_search-{device.type}.json")


def summarize_methods(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over seeds: winner test accuracy and winner - naive winner (mean, std, 95% CI, n)."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        diffs = [r["winner_test_acc"] - r["naive_winner_test_acc"] for r in mine]
        acc, diff, naive_acc = (
            summarize(r["winner_test_acc"] for r in mine),
            summarize(diffs),
            summarize(r["naive_winner_test_acc"] for r in mine),
        )
        out[method] = {
            "seeds": len(mine),
            "winner_test_acc": {**acc.to_dict(), "text": acc.scaled(100).format(".2f") + " (%)"},
            "naive_winner_test_acc": {**naive_acc.to_dict(), "text": naive_acc.scaled(100).format(".2f") + " (%)"},
            "diff_vs_naive": {**diff.to_dict(), "text": diff.scaled(100).format(".2f") + " (points)"},
            "worse_seeds": sum(d < 0 for d in diffs),
            "worst_diff": min(diffs),
            "fraction_of_naive_steps": mine[0]["fraction"],
        }
    return out


if __name__ == "__main__":
    main()
