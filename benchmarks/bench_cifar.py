"""CIFAR-class populations: a loop of N models vs the naive torch.func recipe vs popvec.

Models: ResNet-20, the reduced VGG (``VGGSmall``), CIFAR ResNet-18 and torchvision's
``mobilenet_v2(num_classes=10)``; inputs 3x32x32, 10 classes, Adam; float32 and bfloat16
(``torch.autocast``; float32 weights and optimizer state). For each model, precision and N, one
run times side by side (the variants in turn within each repeat; medians over repeats):
  (a) loop         - N models, N torch.optim.Adam, forward/backward/step per model
  (b) naive        - stack_module_state + vmap(grad) + torch.optim.Adam on the stacked leaves
  (c) popvec       - PopulationTrainer.step (bf16 only when TrainStep takes ``precision=``)
  (d) popvec_auto  - the same with member_chunk_size="auto" (CPU only: on a GPU it is (c) until
                     a memory cap exists)
Reported per variant: member-images/s, peak memory (CUDA: max_memory_allocated over building and
two steps; CPU: growth of the process's peak RSS over the same, 0 when an earlier variant peaked
higher), one N-member step's time over one 1-member step's, and achieved FLOP/s (FLOPs of one
member's forward+backward counted by FlopCounterMode; GPUs: also as a fraction of the dense peak).
Then a whole elimination run: 16 ResNet-20, loop vs popvec (benchmarks/bench_elimination.py's two
sides) on CIFAR-shaped data.

    python benchmarks/bench_cifar.py --device cuda                 # batch 128, N in 1 4 16 64
    python benchmarks/bench_cifar.py --quick                       # CPU: small sizes
"""

from __future__ import annotations

import argparse
import os
import resource
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from bench_elimination import run_loop, run_popvec
from common import (
    environment,
    interleaved_medians,
    loop_step,
    make_models,
    naive_step,
    popvec_step,
    popvec_supports_precision,
    sync,
    write_report,
)
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

import popvec.data
from popvec.data import DatasetSplits, TensorSplit
from popvec.models import ResNet18, ResNet20, VGGSmall
from popvec.selection import elimination_schedule

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet20": lambda: ResNet20(3, 10),
    "vgg": lambda: VGGSmall(3, 10),
    "resnet18": lambda: ResNet18(3, 10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}
AMP = {"fp32": None, "bf16": torch.bfloat16}
#: dense (no sparsity) peak TFLOP/s of the SXM parts, NVIDIA datasheets: bf16 tensor cores; fp32 without TF32
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 66.9}, "H200": {"bf16": 989.4, "fp32": 66.9}}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of a known GPU (by name), else None."""
    return next((p[precision] for gpu, p in PEAK_TFLOPS.items() if gpu in device_name), None)


def member_step_flops(model_fn: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> int:
    """FLOPs of one member's forward and backward on batch ``x`` (FlopCounterMode; the update is not counted)."""
    model = model_fn().to(x.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=amp) if amp is not None else torch.autocast(x.device.type, enabled=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    return int(counter.get_total_flops())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_measured(make: Callable[[], Callable[[], None]], device: torch.device) -> tuple[Callable[[], None], float]:
    """Build a variant and run two steps; returns its step and its peak memory in MiB (see module doc)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _rss_mb()
    step = make()
    step()
    step()
    if device.type == "cuda":
        sync(device)
        return step, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return step, _rss_mb() - before


def measure(args: argparse.Namespace, model_name: str, precision: str, n: int, device: torch.device, console: Console) -> dict[str, Any]:
    """One row: every variant of ``model_name`` at ``n`` members and ``precision``, side by side."""
    amp = AMP[precision]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    model_fn = MODELS[model_name]
    row: dict[str, Any] = {"model": model_name, "precision": precision, "n": n, "batch_size": args.batch_size}
    makers: dict[str, Callable[[], Callable[[], None]]] = {
        "loop": lambda: loop_step(make_models(model_fn, n, device), x, y, amp),
        "naive": lambda: naive_step(make_models(model_fn, n, device), x, y, amp),
    }
    if precision == "fp32" or popvec_supports_precision():
        makers["popvec"] = lambda: popvec_step(make_models(model_fn, n, device), x, y, precision=precision)
        if device.type == "cpu" and not args.no_auto:
            makers["popvec_auto"] = lambda: popvec_step(
                make_models(model_fn, n, device), x, y, member_chunk_size="auto", precision=precision
            )
    else:
        row["popvec_s"] = "n/a (TrainStep has no precision= yet)"
    steps = {}
    for name, make in makers.items():
        try:
            steps[name], row[f"{name}_peak_mib"] = build_measured(make, device)
        except (torch.OutOfMemoryError, RuntimeError) as error:  # "as memory allows"; anything else is recorded too
            row[f"{name}_s"] = f"failed: {' '.join(str(error).split())[:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    inner = {name: args.inner for name in steps}
    flops = member_step_flops(model_fn, x, y, amp)
    row["member_step_gflop"] = flops / 1e9
    peak = peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    for name, seconds in interleaved_medians(steps, device, args.repeats, inner, 0).items():
        row[f"{name}_s"] = seconds
        row[f"{name}_member_images_per_s"] = n * args.batch_size / seconds
        row[f"{name}_gflops"] = n * flops / seconds / 1e9
        if peak is not None:
            row[f"{name}_fraction_of_peak"] = n * flops / seconds / 1e12 / peak
    row["load_avg_1min"] = os.getloadavg()[0]
    for name in ("popvec", "popvec_auto", "naive"):
        if isinstance(row.get(f"{name}_s"), float) and isinstance(row.get("loop_s"), float):
            row[f"{name}_vs_loop"] = row["loop_s"] / row[f"{name}_s"]
    if isinstance(row.get("popvec_s"), float) and isinstance(row.get("naive_s"), float):
        row["popvec_vs_naive"] = row["naive_s"] / row["popvec_s"]
    shown = ", ".join(f"{k.removesuffix('_vs_loop')}/loop {v:.2f}x" for k, v in row.items() if k.endswith("_vs_loop"))
    ips = ", ".join(f"{k.removesuffix('_member_images_per_s')} {v:.0f}" for k, v in row.items() if k.endswith("_member_images_per_s"))
    console.print(f"{model_name} {precision} N={n}: member-images/s {ips}; {shown} (load {row['load_avg_1min']:.1f})")
    return row


def add_step_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ``<variant>_step_vs_n1``: its N-member step time over the same variant's 1-member step."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["precision"] == row["precision"] and r["n"] == 1), None)
        for name in ("loop", "naive", "popvec", "popvec_auto"):
            if base is not None and isinstance(row.get(f"{name}_s"), float) and isinstance(base.get(f"{name}_s"), float):
                row[f"{name}_step_vs_n1"] = row[f"{name}_s"] / base[f"{name}_s"]


def cifar_shaped_data(num_train: int, num_val: int, seed: int) -> DatasetSplits:
    """CIFAR-shaped data (3x32x32, 10 classes) without downloads.

    Swap point: popvec's synthetic CIFAR source (``popvec.data.synthetic_cifar``) when this popvec
    has it; otherwise seeded random tensors (the timing does not depend on the pixel values).
    """
    synthetic = getattr(popvec.data, "synthetic_cifar", None)
    if synthetic is not None:
        return synthetic(num_train=num_train, num_val=num_val, num_test=num_val, seed=seed)  # type: ignore[no-any-return]
    g = torch.Generator().manual_seed(seed)

    def split(m: int) -> TensorSplit:
        return TensorSplit(torch.randn(m, 3, 32, 32, generator=g), torch.randint(0, 10, (m,), generator=g))

    return DatasetSplits("random-cifar-shaped", split(num_train), split(num_val), split(num_val), 10, (3, 32, 32))


def elimination(args: argparse.Namespace, device: torch.device, console: Console) -> dict[str, Any]:
    """A whole progressive elimination of ``--elim-models`` ResNet-20: the loop vs popvec (and popvec "auto" on the CPU)."""
    rounds = len(elimination_schedule(args.elim_models, 0.5)) - 1
    batch = args.batch_size
    data = cifar_shaped_data(batch * args.elim_every, 512, seed=0).to(device)  # one epoch = one elimination round
    cfg = SimpleNamespace(
        model="resnet20", num_models=args.elim_models, num_elim_steps=args.elim_every, reduce_factor=0.5, batch_size=batch,
        epochs=rounds + 1, lr=1e-3, seed=42,
    )  # fmt: skip
    steps = cfg.epochs * args.elim_every
    console.print(f"elimination: {cfg.num_models} x resnet20 on {data.name}, {steps} steps, batch {batch}, device {device}")
    times: dict[str, list[float]] = {"loop": [], "popvec": []}
    chunkings: dict[str, int | str | None] = {"popvec": None}
    if device.type == "cpu" and not args.no_auto:
        times["popvec_auto"], chunkings["popvec_auto"] = [], "auto"
    winners: dict[str, Any] = {}
    for _ in range(args.elim_repeats):
        winners["loop"] = run_loop(cfg, data, device, steps)  # type: ignore[arg-type]
        times["loop"].append(winners["loop"][2])
        for name, chunk in chunkings.items():
            winners[name] = run_popvec(cfg, data, device, member_chunk_size=chunk)  # type: ignore[arg-type]
            times[name].append(winners[name][2])
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    report: dict[str, Any] = {
        "config": vars(cfg) | {"steps": steps, "data": data.name, "augmentation": False},
        **{f"{k}_s": v for k, v in medians.items()},
        **{f"{k}_runs_s": v for k, v in times.items()},
        **{f"{k}_vs_loop": medians["loop"] / v for k, v in medians.items() if k != "loop"},
        "winners": {k: w[0] for k, w in winners.items()},
        "load_avg_1min": os.getloadavg()[0],
    }
    for name in chunkings:
        a, b = winners[name][1].state_dict(), winners["loop"][1].state_dict()
        report[f"{name}_winner_max_abs_weight_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    console.print(
        "elimination: " + ", ".join(f"{k} {v:.1f} s" for k, v in medians.items()) + " -> "
        + ", ".join(f"{k}/loop {report[f'{k}_vs_loop']:.2f}x" for k in chunkings) + f"; winners {report['winners']}"
    )  # fmt: skip
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--big-max-n", type=int, default=64, help="largest N for resnet18 and mobilenet_v2")
    parser.add_argument("--precisions", nargs="+", choices=sorted(AMP), default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-auto", action="store_true", help="do not time popvec with member_chunk_size='auto'")
    parser.add_argument("--elim-models", type=int, default=16)
    parser.add_argument("--elim-every", type=int, default=60, help="steps between eliminations (16 models: 5x this in all)")
    parser.add_argument("--elim-repeats", type=int, default=1)
    parser.add_argument("--no-elimination", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU sizes: batch 32, N in 1 4 16 (big models N<=4), 3 repeats of 1 step")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_cifar-<device>.json)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.big_max_n, args.repeats, args.inner, args.elim_every = [1, 4, 16], 4, 3, 1, 4
        args.batch_size = 32 if args.batch_size == 128 else args.batch_size  # an explicit --batch-size stays
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console()
    env = environment(device)
    console.print(f"device {env['device']} ({device.type}), {env['threads']} threads, load {env['load_avg_1_5_15']}")
    rows = []
    for model_name in args.models:
        big = model_name in ("resnet18", "mobilenet_v2")
        for precision in args.precisions:
            for n in args.sizes:
                if not (big and n > args.big_max_n):
                    rows.append(measure(args, model_name, precision, n, device, console))
    add_step_ratios(rows)
    report: dict[str, Any] = {
        "benchmark": "bench_cifar",
        **env,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "popvec_precision_supported": popvec_supports_precision(),
        "peak_tflops_dense": PEAK_TFLOPS,
        "results": rows,
    }
    if not args.no_elimination:
        report["elimination"] = elimination(args, device, console)
    report["load_avg_1_5_15_end"] = list(os.getloadavg())
    write_report(report, args.out, f"bench_cifar-{device.type}.json")


if __name__ == "__main__":
    main()
