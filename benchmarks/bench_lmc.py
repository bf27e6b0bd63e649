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
Medians over repeats; prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench_lmc.py                   # CPU
    python benchmarks/bench_lmc.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import functools
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
from popvec.models import MLP, LeNet5

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


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--alphas", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk-batch-size", type=int, default=250)
    parser.add_argument("--member-chunk-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.samples,), generator=g).to(device)
    alphas = torch.linspace(0, 1, args.alphas)
    rows = []
    for name, model_fn in MODELS.items():
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
    table = Table(title=f"{args.alphas}-alpha curve over {args.samples} samples on {device}")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
    report = {"environment": environment(device), "config": vars(args), "results": rows}
    write_report(report, args.out, f"bench_lmc-{device.type}.json")


if __name__ == "__main__":
    main()
