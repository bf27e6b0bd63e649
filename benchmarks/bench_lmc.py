"""A 25-alpha interpolation curve over 10,000 samples: vmapped popvec vs the per-alpha loop.

Side by side in one run, for LeNet-5 and the 784-256-256-10 MLP on 28x28 inputs:
  (a) loop   - one nn.Module per alpha (load_state_dict of the interpolated weights), evaluated
               with plain PyTorch in batches (what users do today)
  (b) popvec - popvec.studies.lmc.interpolate with its defaults: the first layer (affine in the weights,
      so in alpha) runs twice per batch, at both ends, and its outputs are interpolated; the rest
      of the 25 networks runs vmapped, on a CPU in cache-sized chunks of samples and members
      chosen from the first layer's width
  (c) popvec chunked - the same with explicit ``--chunk-batch-size`` samples and
      ``--member-chunk-size`` members per pass (no automatic chunking)
and for ResNet-20 (BatchNorm) on 3x32x32 inputs, every alpha's BatchNorm statistics recomputed over
``--bn-batches`` training batches of ``--bn-batch-size`` and the curve taken over ``--bn-samples``:
  (a) loop   - per alpha: deepcopy, load the interpolated state_dict, reset running statistics with
               momentum None, model.train() forward over the BatchNorm batches, then eval
  (b) popvec - lmc.interpolate(..., bn_data=...) with its defaults (on a CPU: one network at a time or
               all vmapped, whichever the first batch times faster; the JSON records the choice)
  (b2) popvec one at a time - the same, forced one network at a time (channels_last)
  (c) popvec vmapped - the same with ``member_chunk_size=K``: all K networks in one vmapped pass
Medians over repeats (the ResNet-20 ways in round robin) of wall time and of this process's CPU time (on a machine shared with other
jobs CPU time is the steadier measure); the machine's load average is recorded with the results.

    python benchmarks/bench_lmc.py                   # CPU
    python benchmarks/bench_lmc.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import environment, sync, write_report
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from popvec import lmc
from popvec.models import MLP, LeNet5, ResNet20
from popvec.studies import paths

MODELS: dict[str, Callable[[], nn.Module]] = {"lenet5": LeNet5, "mlp": lambda: MLP(784, (256, 256), 10)}


@torch.no_grad()
def loop_curve(a: nn.Module, b: nn.Module, alphas: Tensor, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """The per-alpha reference: build, load, evaluate; returns the losses ``[K]``."""
    sa, sb = a.state_dict(), b.state_dict()
    losses = []
    for alpha in alphas.tolist():
        model = copy.deepcopy(a)
        model.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] for k, v in sa.items()})
        model.eval()
        total = sum(F.cross_entropy(model(xb), yb, reduction="sum") for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
        losses.append(total / y.shape[0])
    return torch.stack(losses)


@torch.no_grad()
def loop_bn_curve(
    a: nn.Module, b: nn.Module, alphas: Tensor, x: Tensor, y: Tensor, bn_batches: list[tuple[Tensor, Tensor]], batch_size: int
) -> Tensor:
    """The per-alpha reference with BatchNorm statistics recomputed (cumulative average over ``bn_batches``)."""
    sa, sb = a.state_dict(), b.state_dict()
    losses = []
    for alpha in alphas.tolist():
        model = copy.deepcopy(a)
        model.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v for k, v in sa.items()})
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for xb, _ in bn_batches:
            model(xb)
        model.eval()
        total = sum(F.cross_entropy(model(xb), yb, reduction="sum") for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
        losses.append(total / y.shape[0])
    return torch.stack(losses)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return median_times(fn, device, repeats)[0][0]


def median_times(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[tuple[float, float], object]:
    """Median wall time and median CPU time of this process over ``repeats`` calls (after one warm-up), and the last result."""
    out = fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return (statistics.median(wall), statistics.median(cpu)), out


def bn_case(args: argparse.Namespace, device: torch.device, alphas: Tensor) -> dict[str, object]:
    """ResNet-20 with BatchNorm statistics recomputed per alpha: loop vs popvec (one at a time) vs popvec vmapped."""
    g = torch.Generator().manual_seed(1)
    bx = torch.randn(args.bn_batches * args.bn_batch_size, 3, 32, 32, generator=g).to(device)
    by = torch.randint(0, 10, (bx.shape[0],), generator=g).to(device)
    x = torch.randn(args.bn_samples, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.bn_samples,), generator=g).to(device)
    bn_batches = list(zip(bx.split(args.bn_batch_size), by.split(args.bn_batch_size)))
    torch.manual_seed(0)
    a, b = ResNet20().to(device), ResNet20().to(device)
    loop = functools.partial(loop_bn_curve, a, b, alphas, x, y, bn_batches, args.bn_batch_size)
    popvec = functools.partial(lmc.interpolate, a, b, (x, y), alphas, bn_data=bn_batches, batch_size=args.bn_batch_size)
    vmapped = functools.partial(popvec, member_chunk_size=alphas.numel())
    choose, choices = paths._members_one_at_a_time, []

    def decide(force: bool | None) -> Callable[..., bool]:
        def chosen(*a: object) -> bool:  # the first batch's timing decides, unless forced
            choices.append(choose(*a) if force is None else (choose(*a), force)[1])
            return choices[-1]

        return chosen

    def way(force: bool | None) -> Callable[[], object]:
        def run() -> object:
            paths._members_one_at_a_time = decide(force)
            try:
                return popvec()
            finally:
                paths._members_one_at_a_time = choose

        return run

    ways = {"loop": loop, "popvec": way(None), "popvec_one_at_a_time": way(True), "popvec_vmapped": vmapped}
    loads = [os.getloadavg()[0]]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    curves, auto_choices = {}, []
    for _ in range(args.bn_repeats + 1):  # round robin, so a change of the machine's load hits every way alike
        for name, fn in ways.items():
            choices.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = fn()
            sync(device)
            samples[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
            curves[name] = out if isinstance(out, Tensor) else out.loss  # type: ignore[attr-defined]
            auto_choices += choices if name == "popvec" else []
        loads.append(os.getloadavg()[0])
    times = {
        name: tuple(statistics.median(t[i] for t in runs[1:]) for i in (0, 1)) for name, runs in samples.items()
    }  # first round: warm-up
    row: dict[str, object] = {"model": "resnet20_bn_recompute"}
    for name in ways:
        row[f"{name}_s"], row[f"{name}_cpu_s"] = times[name]
    for name in list(ways)[1:]:
        row[f"speedup_{name}"] = times["loop"][0] / times[name][0]
        row[f"speedup_{name}_cpu_time"] = times["loop"][1] / times[name][1]
        row[f"max_abs_loss_diff_{name}"] = float((curves[name] - curves["loop"].cpu()).abs().max())
    row["popvec_chose_one_at_a_time"] = auto_choices
    return {
        **row,
        "load_average_1min": loads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--alphas", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk-batch-size", type=int, default=250)
    parser.add_argument("--member-chunk-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bn-batches", type=int, default=1, help="BatchNorm recompute batches (ResNet-20 case)")
    parser.add_argument("--bn-batch-size", type=int, default=32)
    parser.add_argument("--bn-samples", type=int, default=32, help="samples the ResNet-20 curve is taken over")
    parser.add_argument("--bn-repeats", type=int, default=3)
    parser.add_argument("--cases", default="lenet5,mlp,resnet20_bn", help="comma-separated: lenet5, mlp, resnet20_bn")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    alphas = torch.linspace(0, 1, args.alphas)
    cases = args.cases.split(",")
    rows: list[dict[str, object]] = []
    for name, model_fn in MODELS.items():
        if name not in cases:
            continue
        torch.manual_seed(0)
        a, b = model_fn().to(device), model_fn().to(device)
        loop = functools.partial(loop_curve, a, b, alphas, x, y, args.batch_size)
        vmapped = functools.partial(lmc.interpolate, a, b, (x, y), alphas, batch_size=args.batch_size)
        chunked = functools.partial(
            lmc.interpolate, a, b, (x, y), alphas, batch_size=args.chunk_batch_size, member_chunk_size=args.member_chunk_size
        )
        loop_s, pop_s, chunked_s = (median_seconds(fn, device, args.repeats) for fn in (loop, vmapped, chunked))
        diff = (chunked().loss - loop().cpu()).abs().max()
        rows.append(
            {
                "model": name,
                "loop_s": loop_s,
                "popvec_s": pop_s,
                "popvec_chunked_s": chunked_s,
                "speedup": loop_s / pop_s,
                "speedup_chunked": loop_s / chunked_s,
                "max_abs_loss_diff": float(diff),
            }
        )
    if "resnet20_bn" in cases:
        rows.append(bn_case(args, device, alphas))
    for row in rows:
        table = Table(title=f"{args.alphas}-alpha curve on {device}: {row['model']}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in row.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        Console().print(table)
    report = {"environment": environment(device), "config": vars(args), "load_average": list(os.getloadavg()), "results": rows}
    write_report(report, args.out, f"bench_lmc-{device.type}.json")


if __name__ == "__main__":
    main()
