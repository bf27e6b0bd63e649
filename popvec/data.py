"""Datasets as device-resident tensors: the built-in offline digits and torchvision's sets.

Whole datasets are converted to tensors once at load time and kept on the training device, so
a batch is an index gather (see :mod:`popvec.loaders` for the batch sampling).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from popvec import checks

__all__ = [
    "DATASET_NAMES",
    "DatasetSplits",
    "TensorSplit",
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
            raise ValueError(f"TensorSplit needs x [M, ...] and y [M]; got x {tuple(self.x.shape)}, y {tuple(self.y.shape)}")

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
    checks.choice("dataset", name, DATASET_NAMES)
    checks.optional_integer("image_size", image_size)
    checks.unit_interval("val_fraction", val_fraction, low_open=True, high_open=True)
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


def _torchvision_split(name: str, data_dir: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
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


def _load_torchvision(name: str, data_dir: Path, download: bool, image_size: int | None, val_fraction: float) -> DatasetSplits:
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


def __getattr__(name: str) -> object:
    """``DeviceLoader`` and ``iterate_batches`` moved to :mod:`popvec.loaders`; the old names still import."""
    if name in ("DeviceLoader", "iterate_batches"):
        from popvec import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
