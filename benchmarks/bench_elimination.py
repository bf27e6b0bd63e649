"""A whole progressive-elimination run: popvec's stacked trainer vs a loop of separate models.

Both sides run the same algorithm on the same batches with the same seeds: N LeNet-5
initializations (member i: ``torch.manual_seed(seed + i)``), Adam, every ``num_elim_steps`` steps
evaluate each survivor on the validation set and keep the best ``max(1, int(n * reduce_factor))``
by validation loss, until one remains; then train it to the end of the budget. The loop is the
one-model-at-a-time reference (each model its own nn.Module and torch.optim.Adam). Reported: wall
time of each, the ratio, and whether both pick the same winner with the same weights.

    python benchmarks/bench_elimination.py                 # CPU, N=32, built-in digits
    python benchmarks/bench_elimination.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from common import environment, sync, write_report
from rich.console import Console

from popvec import MultipleInitializationsTrainer
from popvec.data import load_dataset
from popvec.loaders import DeviceLoader
from popvec.models import model_factory, required_image_size
from popvec.selection import elimination_schedule


@torch.no_grad()
def val_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    loss = float(F.cross_entropy(model(x), y))
    model.train()
    return loss


def run_loop(args: argparse.Namespace, data, device: torch.device, steps: int) -> tuple[int, torch.nn.Module, float]:
    """The reference: separate models trained one after another on each batch."""
    model_fn = model_factory(args.model, data.input_shape, data.num_classes)
    models = {}
    for i in range(args.num_models):
        torch.manual_seed(args.seed + i)
        models[i] = model_fn().to(device)
    optimizers = {i: torch.optim.Adam(m.parameters(), lr=args.lr) for i, m in models.items()}
    loader = DeviceLoader(data.train, args.batch_size, seed=args.seed)
    sync(device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = loader.next_batch()
        for i, model in models.items():
            optimizers[i].zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizers[i].step()
        if len(models) > 1 and (step % args.num_elim_steps == 0 or step == steps):
            losses = {i: val_loss(m, data.val.x, data.val.y) for i, m in models.items()}
            keep = 1 if step == steps else max(1, int(len(models) * args.reduce_factor))
            ranked = sorted(losses, key=lambda i: (math.isnan(losses[i]), losses[i], i))[:keep]
            models = {i: models[i] for i in ranked}
            optimizers = {i: optimizers[i] for i in ranked}
    sync(device)
    (winner,) = models
    return winner, models[winner], time.perf_counter() - start


def run_popvec(
    args: argparse.Namespace, data, device: torch.device, member_chunk_size: int | str | None = None
) -> tuple[int, torch.nn.Module, float]:
    trainer = MultipleInitializationsTrainer(
        model_factory(args.model, data.input_shape, data.num_classes),
        lambda params: torch.optim.Adam(params, lr=args.lr),
        num_models=args.num_models,
        num_elim_steps=args.num_elim_steps,
        reduce_factor=args.reduce_factor,
        device=device,
        seed=args.seed,
        console=Console(quiet=True),
        progress=False,
        member_chunk_size=member_chunk_size,
    )
    loader = DeviceLoader(data.train, args.batch_size, seed=args.seed)
    sync(device)
    start = time.perf_counter()
    winner = trainer.train(loader, data.val, num_epochs=args.epochs)
    sync(device)
    return int(trainer.population.ids[0]), winner, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-models", type=int, default=32)
    parser.add_argument("--num-elim-steps", type=int, default=100)
    parser.add_argument("--reduce-factor", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=0, help="0: just enough epochs for the whole elimination")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (median reported)")
    parser.add_argument("--no-tf32", action="store_true", help="full float32 convolutions/matmuls on CUDA (exact comparison)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    data = load_dataset(args.dataset, args.data_dir, image_size=required_image_size(args.model)).to(device)
    steps_per_epoch = len(data.train) // args.batch_size
    rounds = len(elimination_schedule(args.num_models, args.reduce_factor)) - 1
    if args.epochs == 0:
        args.epochs = math.ceil((rounds + 1) * args.num_elim_steps / steps_per_epoch)
    steps = args.epochs * steps_per_epoch

    console = Console()
    console.print(f"{args.num_models} x {args.model} on {data.name}, {steps} steps ({args.epochs} epochs), device {device}")
    loop_times, popvec_times = [], []
    for _ in range(args.repeats):
        loop_id, loop_model, seconds = run_loop(args, data, device, steps)
        loop_times.append(seconds)
        pop_id, pop_model, seconds = run_popvec(args, data, device)
        popvec_times.append(seconds)
    diffs = [float((a - b).abs().max()) for a, b in zip(pop_model.state_dict().values(), loop_model.state_dict().values())]
    report = {
        "benchmark": "bench_elimination",
        **environment(device),
        "config": vars(args) | {"steps": steps},
        "loop_s": statistics.median(loop_times),
        "popvec_s": statistics.median(popvec_times),
        "loop_runs_s": loop_times,
        "popvec_runs_s": popvec_times,
        "speedup": statistics.median(loop_times) / statistics.median(popvec_times),
        "loop_winner": loop_id,
        "popvec_winner": pop_id,
        "same_winner": loop_id == pop_id,
        "winner_max_abs_weight_diff": max(diffs),
    }
    console.print(
        f"loop {report['loop_s']:.2f} s, popvec {report['popvec_s']:.2f} s -> {report['speedup']:.2f}x; "
        f"winner loop {loop_id} / popvec {pop_id} (same: {report['same_winner']}), "
        f"max |weight diff| {report['winner_max_abs_weight_diff']:.2e}"
    )
    suffix = "-no-tf32" if args.no_tf32 else ""
    write_report(report, args.out, f"bench_elimination-{device.type}{suffix}.json")


if __name__ == "__main__":
    main()
