"""Datasets as device-resident tensors: the built-in offline digits, a synthetic CIFAR-shaped set, torchvision's sets.

Whole datasets are converted to tensors once at load time and kept on the training device, so
a batch is an index gather (see :mod:`popvec.loaders` for the batch sampling).
"""

from __future__ import annotations

import dataclasses
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
    "synthetic_cifar",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "synthetic_cifar", "mnist", "fashion_mnist", "cifar10")

# Default sizes of the synthetic CIFAR-shaped splits (train / val / test).
SYNTHETIC_CIFAR_SIZES = (5000, 1000, 1000)

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
    #: Per-channel ``(mean, std)`` applied at load time (``x = (pixel - mean) / std``, pixels in
    #: [0, 1]); None when unknown. Augmentation pads with the normalized black it implies.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def to(self, device: torch.device | str) -> DatasetSplits:
        """Copy with all three splits on ``device``."""
        return DatasetSplits(
            name=self.name,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            normalization=self.normalization,
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
    *,
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Load a dataset as normalized float32 tensors with fixed splits (on the CPU).

    ``digits`` is the built-in offline dataset (scikit-learn's 8x8 handwritten
    digits) with fixed 1257/270/270 splits; ``val_fraction`` does not apply to it.
    The torchvision datasets hold out the last ``val_fraction`` of a fixed
    seeded permutation of the official train set as validation and use the
    official test set as test. ``image_size`` resizes images to
    ``image_size x image_size`` (bilinear) once, at load time.

    ``synthetic_cifar`` is generated on the fly (no files, no download): 3x32x32 images of
    10 classes, ``num_train``/``num_val``/``num_test`` samples (default 5000/1000/1000),
    drawn from ``seed`` (see :func:`synthetic_cifar`); the sizes and ``seed`` apply to it only.
    """
    checks.choice("dataset", name, DATASET_NAMES)
    checks.optional_integer("image_size", image_size)
    checks.unit_interval("val_fraction", val_fraction, low_open=True, high_open=True)
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    if name == "synthetic_cifar":
        defaults = dict(zip(sizes, SYNTHETIC_CIFAR_SIZES))
        counts = {k: defaults[k] if v is None else checks.integer(k, v) for k, v in sizes.items()}
        data = synthetic_cifar(**counts, seed=seed)
        if image_size is not None:
            data = dataclasses.replace(
                data,
                train=TensorSplit(_resize(data.train.x, image_size), data.train.y),
                val=TensorSplit(_resize(data.val.x, image_size), data.val.y),
                test=TensorSplit(_resize(data.test.x, image_size), data.test.y),
                input_shape=(3, image_size, image_size),
            )
        return data
    for key, value in sizes.items():
        if value is not None:
            raise ValueError(f"{key} applies to the synthetic_cifar dataset only, not {name!r}")
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
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return DatasetSplits(
        name="digits",
        train=TensorSplit(x[idx_train], y[idx_train]),
        val=TensorSplit(x[idx_val], y[idx_val]),
        test=TensorSplit(x[idx_test], y[idx_test]),
        num_classes=10,
        input_shape=tuple(x.shape[1:]),
        normalization=((float(mean),), (float(std),)),
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
            f"{name} dataset not found in {folder} (the data dir). Pass --download (download=True) to fetch it, "
            f"or use --dataset digits or --dataset synthetic_cifar, built in (offline)."
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
        normalization=_TORCHVISION_STATS[name],
    )


# --------------------------------------------------------------------------- #
# Synthetic CIFAR-shaped data
# --------------------------------------------------------------------------- #
def _sinusoids(freq: Tensor, phase: Tensor, colour: Tensor, shift: Tensor, size: int) -> Tensor:
    """Sum of colour-weighted plane waves: ``freq [*S, K, 2]`` cycles per image (y, x),
    ``phase [*S, K]``, ``colour [*S, K, 3]``, translation ``shift [*S, 2]`` pixels -> ``[*S, 3, size, size]``."""
    grid = torch.arange(size, dtype=torch.float64) / size
    ys = (grid.view(-1, 1) + shift[..., None, 0:1, None] / size) * freq[..., 0, None, None]  # [*S, K, size, 1]
    xs = (grid.view(1, -1) + shift[..., None, 1:2, None] / size) * freq[..., 1, None, None]  # [*S, K, 1, size]
    waves = torch.cos(2 * torch.pi * (ys + xs) + phase[..., None, None])  # [*S, K, size, size]
    return torch.einsum("...khw,...kc->...chw", waves, colour)


def _synthetic_split(count: int, classes: tuple[Tensor, Tensor, Tensor], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` images in [0, 1] (``float64 [count, 3, 32, 32]``, 8-bit levels) and their labels."""
    freq, phase, colour = classes
    y = torch.randint(0, freq.shape[0], (count,), generator=gen)
    shift = torch.randint(-4, 5, (count, 2), generator=gen).double()  # the class pattern moves, as objects do
    contrast = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=gen, dtype=torch.float64)
    pattern = contrast * _sinusoids(freq[y], phase[y], colour[y], shift, 32)
    # One class-independent plane wave per image (a distractor of the same kind) and pixel noise.
    d_freq = torch.randint(-3, 4, (count, 1, 2), generator=gen).double()
    d_phase = 2 * torch.pi * torch.rand(count, 1, generator=gen, dtype=torch.float64)
    d_colour = 0.12 * torch.randn(count, 1, 3, generator=gen, dtype=torch.float64)
    distractor = _sinusoids(d_freq, d_phase, d_colour, torch.zeros(count, 2, dtype=torch.float64), 32)
    base = 0.45 + 0.08 * torch.randn(count, 3, 1, 1, generator=gen, dtype=torch.float64)
    noise = 0.12 * torch.randn(count, 3, 32, 32, generator=gen, dtype=torch.float64)
    images = (base + pattern + distractor + noise).clamp(0, 1)
    return torch.round(images * 255) / 255, y


def synthetic_cifar(num_train: int = 5000, num_val: int = 1000, num_test: int = 1000, seed: int = 0) -> DatasetSplits:
    """A CIFAR-10-shaped dataset made on the fly: ``[M, 3, 32, 32]`` images of 10 classes, no files.

    Each class is a fixed sum of three low-frequency colour plane waves (1-3 cycles per image);
    an image is its class pattern at a random contrast, translated by up to 4 pixels, plus a
    random class-independent plane wave, a random tint and pixel noise, clipped to [0, 1] and
    rounded to 8-bit levels like a photograph. A convolutional network learns it well above
    chance; chance is 10%. Everything (the class patterns and every split) follows from
    ``seed``, and the splits are independent draws, so the same arguments give the same tensors.
    Normalized with the CIFAR-10 channel statistics, like ``cifar10``.
    """
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    for key, value in counts.items():
        checks.integer(key, value)
    gen = torch.Generator().manual_seed(seed)
    cycles = torch.randint(1, 4, (10, 3, 2), generator=gen).double()  # 1-3 cycles per image, either sign
    freq = cycles * torch.where(torch.rand(10, 3, 2, generator=gen) < 0.5, -1.0, 1.0).double()
    phase = 2 * torch.pi * torch.rand(10, 3, generator=gen, dtype=torch.float64)
    colour = 0.1 * torch.randn(10, 3, 3, generator=gen, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in _TORCHVISION_STATS["cifar10"])
    splits = []
    for k, count in enumerate(counts.values()):
        split_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
        images, labels = _synthetic_split(count, (freq, phase, colour), split_gen)
        splits.append(TensorSplit(((images - mean) / std).float(), labels))
    return DatasetSplits(
        name="synthetic_cifar",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        input_shape=(3, 32, 32),
        normalization=_TORCHVISION_STATS["cifar10"],
    )


def __getattr__(name: str) -> object:
    """``DeviceLoader`` and ``iterate_batches`` moved to :mod:`popvec.loaders`; the old names still import."""
    if name in ("DeviceLoader", "iterate_batches"):
        from popvec import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
