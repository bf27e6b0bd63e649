"""Train-step throughput: a loop of N models vs the naive torch.func recipe vs popvec.

For each model and population size N, one run measures side by side (same batch, same optimizer):
  (a) loop   - N separate nn.Modules, each with its own torch.optim.Adam (what users do today)
  (b) naive  - stack_module_state + vmap(grad) + torch.optim.Adam on the stacked leaves
               (the recipe of PyTorch's model-ensembling tutorial)
  (c) popvec - PopulationTrainer.step (vmapped step + popvec.optim.Adam)
Timings are medians over repeats of several steps each; throughput is member-steps per second.
Prints a table and writes JSON (device, torch version, every figure) to benchmarks/results/.

    python benchmarks/bench_step.py                      # CPU, all sizes
    python benchmarks/bench_step.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import environment, sync, write_report
from rich.console import Console
from rich.table import Table
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

import popvec
from popvec import Population, PopulationTrainer
from popvec.models import MLP, LeNet5

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "mlp": lambda: MLP(784, (256, 256), 10),
    "lenet5": lambda: LeNet5(),
}


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, inner: int, warmup: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` consecutive calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def make_models(model_fn: Callable[[], torch.nn.Module], n: int, device: torch.device) -> list[torch.nn.Module]:
    models = []
    for i in range(n):
        torch.manual_seed(i)
        models.append(model_fn().to(device))
    return models


def loop_step(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

    def step() -> None:
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return step


def naive_step(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    grad_fn = vmap(grad_and_value(loss), in_dims=(0, 0, None, None))
    leaves = list(params.values())
    opt = torch.optim.Adam(leaves, lr=1e-3)

    def step() -> None:
        grads, _ = grad_fn(params, buffers, x, y)
        for leaf, name in zip(leaves, params):
            leaf.grad = grads[name]
        opt.step()

    return step


def popvec_step(
    models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, compile: bool = False, member_chunk_size: int | None = None
) -> Callable[[], None]:
    pop = Population.from_modules(models)
    trainer = PopulationTrainer(pop, popvec.optim.Adam(pop, lr=1e-3), compile=compile, progress=False, member_chunk_size=member_chunk_size)
    return lambda: trainer.step(x, y)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    results = []
    console = Console()
    variants = {"loop": loop_step, "naive": naive_step, "popvec": popvec_step}
    if args.compile:
        variants["popvec+compile"] = lambda m, x, y: popvec_step(m, x, y, compile=True)
    if args.member_chunk_size:
        variants["popvec_chunked"] = lambda m, x, y: popvec_step(m, x, y, member_chunk_size=args.member_chunk_size)
    for model_name in args.models:
        for n in args.sizes:
            x = torch.randn(args.batch_size, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (args.batch_size,), device=device)
            row = {"model": model_name, "n": n, "batch_size": args.batch_size}
            for name, make in variants.items():
                step = make(make_models(MODELS[model_name], n, device), x, y)
                inner = max(1, args.inner // n) if name == "loop" and device.type == "cpu" else args.inner
                seconds = median_seconds(step, device, args.repeats, inner, args.warmup)
                row[f"{name}_s"] = seconds
                row[f"{name}_member_steps_per_s"] = n / seconds
            row["popvec_vs_loop"] = row["loop_s"] / row["popvec_s"]
            row["popvec_vs_naive"] = row["naive_s"] / row["popvec_s"]
            row["naive_vs_loop"] = row["loop_s"] / row["naive_s"]
            if "popvec_chunked_s" in row:
                row["popvec_chunked_vs_loop"] = row["loop_s"] / row["popvec_chunked_s"]
            console.print(
                f"{model_name} N={n}: loop {1e3 * row['loop_s']:.2f} ms, naive {1e3 * row['naive_s']:.2f} ms, "
                f"popvec {1e3 * row['popvec_s']:.2f} ms -> popvec/loop {row['popvec_vs_loop']:.2f}x, "
                f"popvec/naive {row['popvec_vs_naive']:.2f}x"
            )
            results.append(row)
    return {
        "benchmark": "bench_step",
        **environment(device),
        "repeats": args.repeats,
        "inner_steps": args.inner,
        "results": results,
    }


def print_table(report: dict) -> None:
    table = Table(title=f"Train step, batch {report['results'][0]['batch_size']}, {report['device']} (torch {report['torch']})")
    for col in ["model", "N", "loop ms", "naive ms", "popvec ms", "member-steps/s (popvec)", "popvec/loop", "popvec/naive", "naive/loop"]:
        table.add_column(col, justify="right")
    if "popvec_chunked_s" in report["results"][0]:
        table.add_column("chunked/loop", justify="right")
    for r in report["results"]:
        extra = [f"{r['popvec_chunked_vs_loop']:.2f}x"] if "popvec_chunked_vs_loop" in r else []
        table.add_row(
            r["model"],
            str(r["n"]),
            f"{1e3 * r['loop_s']:.2f}",
            f"{1e3 * r['naive_s']:.2f}",
            f"{1e3 * r['popvec_s']:.2f}",
            f"{r['popvec_member_steps_per_s']:.0f}",
            f"{r['popvec_vs_loop']:.2f}x",
            f"{r['popvec_vs_naive']:.2f}x",
            f"{r['naive_vs_loop']:.2f}x",
            *extra,
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "lenet5"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--compile", action="store_true", help="also time popvec with torch.compile")
    parser.add_argument("--member-chunk-size", type=int, default=0, help="also time popvec with members in chunks of this many")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<device>.json)")
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    write_report(report, args.out, f"bench_step-{report['device_type']}.json")


if __name__ == "__main__":
    main()
