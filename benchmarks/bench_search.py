"""Science check of issue 5: a learning-rate search on the built-in digits, Hyperband (and one
successive-halving bracket) vs training every sampled member for the full budget.

Same members (initializations and sampled learning rates), same shared batch order, same budget per
surviving member; the winner is picked by validation loss and scored on the test split.

    python benchmarks/bench_search.py [--device cpu] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-t", type=int, default=27)
    parser.add_argument("--unit-steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_dataset("digits").to(device)
    model_fn = model_factory("mlp", data.input_shape, data.num_classes)
    quiet = Console(quiet=True)
    steps = args.max_t * args.unit_steps
    rows = []
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
    write_report({"environment": environment(device), "rows": rows, "space": SPACE.to_dict()}, None, f"bench_search-{device.type}.json")


if __name__ == "__main__":
    main()
