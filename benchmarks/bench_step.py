"""Train-step throughput: a loop of N models vs the naive torch.func recipe vs popvec.

For each model and population size N, one run measures side by side (same batch, same optimizer):
  (a) loop   - N separate nn.Modules, each with its own torch.optim.Adam (what users do today)
  (b) naive  - stack_module_state + vmap(grad) + torch.optim.Adam on the stacked leaves
               (the recipe of PyTorch's model-ensembling tutorial)
  (c) popvec - PopulationTrainer.step (vmapped step + popvec.optim.Adam)
  (d) popvec_auto - the same with member_chunk_size="auto" (on the CPU a probe picks the chunk size;
               the probe runs before timing, in the warmup)
Timings are medians over repeats of several steps each, the variants timed in turn within each
repeat (side by side); throughput is member-steps per second.
Prints a table and writes JSON (device, torch version, every figure) to benchmarks/results/.

    python benchmarks/bench_step.py                      # CPU, all sizes
    python benchmarks/bench_step.py --device cuda
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from common import environment, interleaved_medians, loop_step, make_models, naive_step, popvec_step, write_report
from rich.console import Console
from rich.table import Table

from popvec.models import MLP, LeNet5, ResNet20

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "mlp": lambda: MLP(784, (256, 256), 10),
    "lenet5": lambda: LeNet5(),
    "resnet20": lambda: ResNet20(),
}
INPUT_SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    results = []
    console = Console()
    variants: dict[str, Callable[..., Callable[[], None]]] = {"loop": loop_step, "naive": naive_step, "popvec": popvec_step}
    if not args.no_auto:
        variants["popvec_auto"] = lambda m, x, y: popvec_step(m, x, y, member_chunk_size="auto")
    if args.compile:
        variants["popvec+compile"] = lambda m, x, y: popvec_step(m, x, y, compile=True)
    if args.member_chunk_size:
        variants["popvec_chunked"] = lambda m, x, y: popvec_step(m, x, y, member_chunk_size=args.member_chunk_size)
    for model_name in args.models:
        for n in args.sizes:
            x = torch.randn(args.batch_size, *INPUT_SHAPES[model_name], device=device)
            y = torch.randint(0, 10, (args.batch_size,), device=device)
            row: dict = {"model": model_name, "n": n, "batch_size": args.batch_size}
            steps = {name: make(make_models(MODELS[model_name], n, device), x, y) for name, make in variants.items()}
            inner = {name: max(1, args.inner // n) if device.type == "cpu" else args.inner for name in steps}
            for name, seconds in interleaved_medians(steps, device, args.repeats, inner, args.warmup).items():
                row[f"{name}_s"] = seconds
                row[f"{name}_member_steps_per_s"] = n / seconds
            row["load_avg_1min"] = os.getloadavg()[0]
            row["popvec_vs_loop"] = row["loop_s"] / row["popvec_s"]
            row["popvec_vs_naive"] = row["naive_s"] / row["popvec_s"]
            row["naive_vs_loop"] = row["loop_s"] / row["naive_s"]
            for extra in ("popvec_chunked", "popvec_auto"):
                if f"{extra}_s" in row:
                    row[f"{extra}_vs_loop"] = row["loop_s"] / row[f"{extra}_s"]
            console.print(
                f"{model_name} N={n}: loop {1e3 * row['loop_s']:.2f} ms, naive {1e3 * row['naive_s']:.2f} ms, "
                f"popvec {1e3 * row['popvec_s']:.2f} ms -> popvec/loop {row['popvec_vs_loop']:.2f}x, "
                f"popvec/naive {row['popvec_vs_naive']:.2f}x"
                + (f", auto {1e3 * row['popvec_auto_s']:.2f} ms -> {row['popvec_auto_vs_loop']:.2f}x" if "popvec_auto_s" in row else "")
                + f" (load {row['load_avg_1min']:.1f})"
            )
            results.append(row)
    return {
        "benchmark": "bench_step",
        **environment(device),
        "repeats": args.repeats,
        "inner_steps": args.inner,
        "inner_steps_note": "on the CPU, inner // N steps per timed repeat (at least 1)",
        "results": results,
    }


def print_table(report: dict) -> None:
    table = Table(title=f"Train step, batch {report['results'][0]['batch_size']}, {report['device']} (torch {report['torch']})")
    for col in ["model", "N", "loop ms", "naive ms", "popvec ms", "member-steps/s (popvec)", "popvec/loop", "popvec/naive", "naive/loop"]:
        table.add_column(col, justify="right")
    extras = [e for e in ("popvec_chunked", "popvec_auto") if f"{e}_vs_loop" in report["results"][0]]
    for e in extras:
        table.add_column(f"{e.removeprefix('popvec_')}/loop", justify="right")
    for r in report["results"]:
        extra = [f"{r[f'{e}_vs_loop']:.2f}x" for e in extras]
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
    parser.add_argument("--no-auto", action="store_true", help="do not time popvec with member_chunk_size='auto'")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step-<device>.json)")
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    write_report(report, args.out, f"bench_step-{report['device_type']}.json")


if __name__ == "__main__":
    main()
