"""Per-member augmentation: the cost of one augmented batch, batched on the device vs a per-sample loop.

For N members and batch B of 3x32x32 synthetic_cifar images (CIFAR recipe: random crop with 4
pixels of padding, horizontal flip): the time of ``DeviceLoader.next_batch()`` without
augmentation, with popvec's batched augmentation (``[N, B, ...]`` views of a shared order), and
the same draws applied the way a per-sample transform pipeline does it (a Python loop of pad,
slice, flip per member and sample). Both augmented paths are checked to give identical tensors.

    python benchmarks/bench_augment.py                  # CPU
    python benchmarks/bench_augment.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import environment, sync, write_report

from popvec.augment import Augment
from popvec.data import load_dataset
from popvec.loaders import DeviceLoader


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def loop_augment(x: torch.Tensor, draws: torch.Tensor, aug: Augment) -> torch.Tensor:
    """The per-sample reference: ``x [B, C, H, W]``, ``draws [N, B, 3]`` -> ``[N, B, C, H, W]``."""
    p, (h, w) = aug.crop_padding, x.shape[-2:]
    fill = torch.tensor(aug.fill, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    out = []
    for member in draws.tolist():
        views = []
        for k, (dy, dx, flip) in enumerate(member):
            padded = F.pad(x[k] - fill, (p, p, p, p)) + fill
            crop = padded[:, dy : dy + h, dx : dx + w]
            views.append(crop.flip(-1) if flip else crop)
        out.append(torch.stack(views))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--members", default="1,4,16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_dataset("synthetic_cifar").to(device)
    aug = Augment.for_data(data)
    rows = []
    for n in (int(v) for v in args.members.split(",")):
        plain = DeviceLoader(data.train, args.batch_size, num_members=n, shared_order=True)
        augmented = DeviceLoader(data.train, args.batch_size, num_members=n, shared_order=True, augment=aug)
        x, _ = DeviceLoader(data.train, args.batch_size).next_batch()
        draws = torch.stack([aug.draw(s, 0, args.batch_size) for s in range(n)]).to(device)
        assert torch.allclose(aug.apply(x, draws), loop_augment(x, draws, aug), rtol=0, atol=1e-6)
        row = {
            "members": n,
            "batch_size": args.batch_size,
            "plain_ms": median_ms(plain.next_batch, device, args.repeats),
            "augmented_ms": median_ms(augmented.next_batch, device, args.repeats),
            "per_sample_loop_ms": median_ms(lambda x=x, draws=draws: loop_augment(x, draws, aug), device, max(3, args.repeats // 4)),
        }
        row["speedup_over_loop"] = row["per_sample_loop_ms"] / row["augmented_ms"]
        row["augmented_member_images_per_s"] = n * args.batch_size / (row["augmented_ms"] / 1000)
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    write_report({"environment": environment(device), "rows": rows}, args.out, f"bench_augment-{device.type}.json")


if __name__ == "__main__":
    main()
