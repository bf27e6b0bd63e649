"""Device-resident datasets and per-member batch sampling.

Whole datasets are converted to tensors once at load time and kept on the
training device; a batch is an index gather into those tensors, so a training
step makes no host-to-device copy. In per-member mode every member of a
population draws its own seeded sample order, and ``next_batch`` returns all
members' batches stacked as ``[N, B, ...]`` ready for a vmapped step.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASET_NAMES",
    "DatasetSplits",
    "DeviceLoader",
    "TensorSplit",
    "iterate_batches",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10")

# Fixed sizes of the built-in digits splits (70/15/15 of 1797 samples).
DIGITS_VAL_SIZE = 270
DIGITS_TEST_SIZE = 270

# Usual per-channel normalization constants of the torchvision datasets.
_TORCHVISION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

# --------------------------------------------------------------------------- #
# Containers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TensorSplit:
    """One split as tensors: ``x`` ``[M, ...]`` float32, ``y`` ``[M]`` int64."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorSplit needs x [M, ...] and y [M]; got x {tuple(self.x.shape)}, "
                f"y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> TensorSplit:
        """Copy of this split with both tensors on ``device``."""
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    """Train/val/test splits of one dataset plus its metadata."""

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    input_shape: tuple[int, ...]

    def to(self, device: torch.device | str) -> DatasetSplits:
        """Copy with all three splits on ``device``."""
        return DatasetSplits(
            name=self.name,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
        )


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_dataset(
    name: str = "digits",
    data_dir: str | Path = "./data",
    download: bool = False,
    image_size: int | None = None,
    val_fraction: float = 0.1,
) -> DatasetSplits:
    """Load a dataset as normalized float32 tensors with fixed splits (on the CPU).

    ``digits`` is the built-in offline dataset (scikit-learn's 8x8 handwritten
    digits) with fixed 1257/270/270 splits; ``val_fraction`` does not apply to it.
    The torchvision datasets hold out the last ``val_fraction`` of a fixed
    seeded permutation of the official train set as validation and use the
    official test set as test. ``image_size`` resizes images to
    ``image_size x image_size`` (bilinear) once, at load time.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_NAMES)}; got {name!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 or None; got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if name == "digits":
        return _load_digits(image_size)
    return _load_torchvision(name, Path(data_dir), download, image_size, val_fraction)


def _resize(x: Tensor, image_size: int | None) -> Tensor:
    """Bilinearly resize ``[M, C, H, W]`` images to square ``image_size`` if needed."""
    if image_size is None or tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """Raw digits: pixels ``[1797, 64]`` in 0..16 and labels ``[1797]``."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # slow import: fallback only

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _load_digits(image_size: int | None) -> DatasetSplits:
    """scikit-learn digits: fixed permutation split, normalized by train mean/std."""
    pixels, labels = _read_digits()
    x = _resize(torch.from_numpy(pixels / 16.0).float().reshape(-1, 1, 8, 8), image_size)
    y = torch.from_numpy(labels)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    n_train = len(y) - DIGITS_VAL_SIZE - DIGITS_TEST_SIZE
    idx_train, idx_val = perm[:n_train], perm[n_train:-DIGITS_TEST_SIZE]
    idx_test = perm[-DIGITS_TEST_SIZE:]
    x = (x - x[idx_train].mean()) / x[idx_train].std()
    return DatasetSplits(
        name="digits",
        train=TensorSplit(x[idx_train], y[idx_train]),
        val=TensorSplit(x[idx_val], y[idx_val]),
        test=TensorSplit(x[idx_test], y[idx_test]),
        num_classes=10,
        input_shape=tuple(x.shape[1:]),
    )


def _torchvision_split(
    name: str, data_dir: Path, train: bool, download: bool
) -> tuple[Tensor, Tensor]:
    """One official split as raw ``uint8 [M, C, H, W]`` images and ``int64 [M]`` labels."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        ds = cls(root=str(data_dir), train=train, download=download)
    except RuntimeError as err:
        if "Dataset not found" not in str(err):
            raise
        folder = data_dir / ("cifar-10-batches-py" if name == "cifar10" else f"{cls.__name__}/raw")
        raise FileNotFoundError(
            f"{name} dataset not found in {folder}. Pass --download (download=True) to "
            f"fetch it, or use --dataset digits, the built-in offline dataset."
        ) from None
    images = torch.as_tensor(ds.data)
    images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images.unsqueeze(1)
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def _load_torchvision(
    name: str, data_dir: Path, download: bool, image_size: int | None, val_fraction: float
) -> DatasetSplits:
    """MNIST / FashionMNIST / CIFAR-10 as normalized tensors with a seeded val split."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _TORCHVISION_STATS[name])

    def prepare(images: Tensor) -> Tensor:
        return (_resize(images.float() / 255.0, image_size) - mean) / std

    x_train, y_train = _torchvision_split(name, data_dir, True, download)
    x_test, y_test = _torchvision_split(name, data_dir, False, download)
    n_val = round(val_fraction * len(y_train))
    if not 1 <= n_val < len(y_train):
        raise ValueError(f"val_fraction={val_fraction} leaves an empty train or val split")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y_train)))
    idx_train, idx_val = perm[:-n_val], perm[-n_val:]
    x_train = prepare(x_train)
    return DatasetSplits(
        name=name,
        train=TensorSplit(x_train[idx_train], y_train[idx_train]),
        val=TensorSplit(x_train[idx_val], y_train[idx_val]),
        test=TensorSplit(prepare(x_test), y_test),
        num_classes=10,
        input_shape=tuple(x_train.shape[1:]),
    )


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> Tensor:
    """CPU ``[M]`` sample order for one (seed, epoch): a seeded permutation or ``arange``."""
    if not shuffle:
        return torch.arange(num_samples)
    # numpy's permutation is ~10x faster than torch.randperm on the CPU.
    rng = np.random.default_rng([seed % 2**64, epoch])
    return torch.from_numpy(rng.permutation(num_samples))


def _index_tensor(values: Tensor | Sequence[int], arg: str) -> Tensor:
    """``values`` as a 1-D int64 CPU tensor, or ValueError naming ``arg``."""
    out = torch.as_tensor(values).detach().cpu()
    if out.dim() != 1 or out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise ValueError(f"{arg} must be a 1-D sequence of integers; got {values!r}")
    return out.long()


class DeviceLoader:
    """Endless batch sampler over a device-resident :class:`TensorSplit`.

    Shared mode (``num_members=None``): one order for everyone; ``next_batch()``
    returns ``x [B, ...], y [B]``. Per-member mode (``num_members=N``): member
    ``j`` has seed ``member_seeds[j]`` (initially ``seed + j``) and its order in
    epoch ``e`` is the permutation drawn by ``np.random.default_rng([seed_j, e])``,
    so it depends only on ``(member_seeds[j], e)``;
    ``next_batch()`` returns ``xs [N, B, ...], ys [N, B]``. Shared mode with seed
    ``s`` sees the same order as a member with seed ``s``.

    The orders of the current epoch live on the split's device (``[M]`` or
    ``[N, M]`` int64); they are generated on the CPU and moved once per epoch,
    so a step is a pure on-device gather. After the last batch of an epoch the
    loader rolls into the next one (``epoch += 1``, ``position = 0``).
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        num_members: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        num_samples = len(split)
        if num_samples < 1:
            raise ValueError("split must hold at least one sample")
        if batch_size < 1 or (drop_last and batch_size > num_samples):
            limit = f" and <= len(split) = {num_samples} with drop_last" if drop_last else ""
            raise ValueError(f"batch_size must be >= 1{limit}; got {batch_size}")
        if num_members is not None and num_members < 1:
            raise ValueError(f"num_members must be >= 1 or None; got {num_members}")
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.steps_per_epoch = (
            num_samples // batch_size if drop_last else -(-num_samples // batch_size)
        )
        self.member_seeds: Tensor | None = (
            None if num_members is None else seed + torch.arange(num_members, dtype=torch.int64)
        )
        self.epoch = 0
        self.position = 0
        self._order = self._make_order(self.epoch)

    # -- properties --------------------------------------------------------- #
    @property
    def num_members(self) -> int | None:
        """Population size N in per-member mode, ``None`` in shared mode."""
        return None if self.member_seeds is None else self.member_seeds.numel()

    @property
    def num_samples(self) -> int:
        """Number of samples M in the split."""
        return len(self.split)

    @property
    def device(self) -> torch.device:
        """Device of the split, its orders and every batch."""
        return self.split.x.device

    @property
    def order(self) -> Tensor:
        """Current epoch's sample order: ``[M]`` (shared) or ``[N, M]`` (per member)."""
        return self._order

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- sampling ----------------------------------------------------------- #
    def _make_order(self, epoch: int) -> Tensor:
        """Orders of ``epoch`` for the current seeds, on the device."""
        m, shuffle = self.num_samples, self.shuffle
        if self.member_seeds is None:
            order = _epoch_order(m, self.seed, epoch, shuffle)
        else:
            seeds = self.member_seeds.tolist()
            order = torch.stack([_epoch_order(m, s, epoch, shuffle) for s in seeds])
        return order.to(self.device)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Next batch: ``(x [B, ...], y [B])`` or ``(xs [N, B, ...], ys [N, B])``.

        With ``drop_last=False`` the last batch of an epoch may be smaller.
        """
        start = self.position * self.batch_size
        idx = self._order[..., start : start + self.batch_size]
        flat = idx.reshape(-1)
        x = self.split.x.index_select(0, flat).view(*idx.shape, *self.split.x.shape[1:])
        y = self.split.y.index_select(0, flat).view(idx.shape)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._make_order(self.epoch)
        return x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the remaining batches of the current epoch (all of them at position 0)."""
        for _ in range(self.steps_per_epoch - self.position):
            yield self.next_batch()

    # -- population edits --------------------------------------------------- #
    def _member_positions(self, values: Tensor | Sequence[int], arg: str, method: str) -> Tensor:
        """``values`` as validated member positions (1-D int64 CPU tensor)."""
        if self.member_seeds is None:
            raise ValueError(f"{method}() needs per-member mode (num_members=N)")
        idx = _index_tensor(values, arg)
        n = self.member_seeds.numel()
        if idx.numel() > 0 and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{arg} must lie in [0, {n}); got {idx.tolist()}")
        return idx

    def select(self, indices: Tensor | Sequence[int]) -> None:
        """Keep members ``indices`` in that order (new member ``i`` = old ``indices[i]``).

        Members may be dropped, reordered or repeated: seeds and current-epoch
        orders are copied, so a repeated member keeps seeing exactly the same
        batches as its source until one of them is :meth:`reseed`-ed.
        """
        idx = self._member_positions(indices, "indices", "select")
        if idx.numel() == 0:
            raise ValueError("indices must select at least one member")
        self.member_seeds = self.member_seeds.index_select(0, idx)
        self._order = self._order.index_select(0, idx.to(self.device))

    def reseed(self, positions: Tensor | Sequence[int], seeds: Tensor | Sequence[int]) -> None:
        """Give members at ``positions`` the new ``seeds``, effective immediately.

        For each listed member the samples already drawn this epoch stay as they
        were; the samples it has not seen yet this epoch are reordered in the
        order they take in the new seed's permutation for this epoch. So each
        member still sees every sample once per epoch, at ``position == 0`` the
        member's order is exactly the new seed's, and from the next epoch on
        its order depends only on (new seed, epoch). Other members are untouched.
        """
        pos = self._member_positions(positions, "positions", "reseed")
        new_seeds = _index_tensor(seeds, "seeds")
        if new_seeds.numel() != pos.numel():
            raise ValueError(
                f"seeds must have one entry per position; got {new_seeds.numel()} for {pos.numel()}"
            )
        if pos.unique().numel() != pos.numel():
            raise ValueError(f"positions must not repeat; got {pos.tolist()}")
        seen = self.position * self.batch_size
        order = self._order.to("cpu", copy=True)
        for p, s in zip(pos.tolist(), new_seeds.tolist()):
            fresh = _epoch_order(self.num_samples, s, self.epoch, self.shuffle)
            unseen = torch.ones(self.num_samples, dtype=torch.bool)
            unseen[order[p, :seen]] = False
            order[p, seen:] = fresh[unseen[fresh]]
        self.member_seeds = self.member_seeds.clone()
        self.member_seeds[pos] = new_seeds
        self._order = order.to(self.device)

    # -- checkpointing ------------------------------------------------------ #
    def state_dict(self) -> dict[str, Any]:
        """Sampling state as plain ints, bools and CPU tensors (``weights_only``-loadable)."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "member_seeds": None if self.member_seeds is None else self.member_seeds.clone(),
            "order": self._order.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next batches equal the saved loader's.

        The split, batch size, shuffle and drop_last settings and the mode
        (shared / per member) must match; the number of members comes from ``state``.
        """
        for key in ("num_samples", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                mine = getattr(self, key)
                raise ValueError(f"state {key}={state[key]} does not match this loader's {mine}")
        if (state["member_seeds"] is None) != (self.member_seeds is None):
            raise ValueError("state and loader differ in mode (shared vs. per-member)")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        seeds = state["member_seeds"]
        self.member_seeds = None if seeds is None else seeds.clone().long()
        self._order = state["order"].to(self.device, torch.int64)


# --------------------------------------------------------------------------- #
# Evaluation batches
# --------------------------------------------------------------------------- #
def iterate_batches(
    data: TensorSplit | tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    batch_size: int = 1024,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Evaluation batches ``(x [b, ...], y [b])`` in order, last partial batch included.

    ``data`` is a :class:`TensorSplit`, an ``(x, y)`` tuple of tensors (sliced
    into views of ``batch_size``) or any iterable of ``(x, y)`` batches such as
    a ``DataLoader`` (passed through unchanged).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(data, TensorSplit):
        data = (data.x, data.y)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        return zip(x.split(batch_size), y.split(batch_size))
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a TensorSplit, an (x, y) tuple of tensors or an iterable of "
            f"(x, y) batches; got {type(data).__name__}"
        )
    return iter(data)
