"""Tests for popvec.data: dataset loading, device-resident sampling, eval batches."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from popvec.data import (
    DATASET_NAMES,
    DatasetSplits,
    DeviceLoader,
    TensorSplit,
    iterate_batches,
    load_dataset,
)


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


def index_split(m: int) -> TensorSplit:
    """Split whose x and y both hold the sample index, so batches reveal the order."""
    return TensorSplit(torch.arange(m, dtype=torch.float32).unsqueeze(1), torch.arange(m))


def draw(loader: DeviceLoader, steps: int) -> list[torch.Tensor]:
    """Labels of the next ``steps`` batches (after checking x matches y)."""
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert torch.equal(x[..., 0].long(), y)
        out.append(y)
    return out


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #
def test_digits_splits(digits: DatasetSplits) -> None:
    assert DATASET_NAMES[0] == "digits"
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1257, 270, 270)
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)
        assert set(split.y.tolist()) == set(range(10))


def test_digits_splits_do_not_overlap(digits: DatasetSplits) -> None:
    # The digits set holds no duplicate images, so distinct rows = distinct samples.
    rows = torch.cat([digits.train.x, digits.val.x, digits.test.x]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] == 1797


def test_digits_normalized_and_deterministic(digits: DatasetSplits) -> None:
    assert abs(digits.train.x.mean().item()) < 1e-4
    assert abs(digits.train.x.std().item() - 1.0) < 1e-4
    again = load_dataset("digits")
    for a, b in [(digits.train, again.train), (digits.val, again.val), (digits.test, again.test)]:
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_digits_resized() -> None:
    data = load_dataset("digits", image_size=28)
    assert data.input_shape == (1, 28, 28)
    assert data.train.x.shape == (1257, 1, 28, 28) and data.test.x.shape == (270, 1, 28, 28)
    assert abs(data.train.x.mean().item()) < 1e-4


def test_splits_to_device(digits: DatasetSplits) -> None:
    moved = digits.to("cpu")
    assert moved.name == "digits" and torch.equal(moved.val.x, digits.val.x)
    with pytest.raises(ValueError, match="TensorSplit"):
        TensorSplit(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))


# --------------------------------------------------------------------------- #
# torchvision datasets, fully offline
# --------------------------------------------------------------------------- #
def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "digits" in message and "--download" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dataset.*digits.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in MNIST's big-endian IDX format."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (50, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(20) % 10)

    data = load_dataset("mnist", data_dir=tmp_path, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 20)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    # Train + val is a partition of the official train set, normalized as usual.
    labels = torch.cat([data.train.y, data.val.y])
    assert sorted(labels.tolist()) == sorted((np.arange(50) % 10).tolist())
    expected = (torch.from_numpy(train_images).float() / 255 - 0.1307) / 0.3081
    rows = torch.cat([data.train.x, data.val.x]).flatten(1)
    got, want = rows.sum(1).sort().values, expected.flatten(1).sum(1).sort().values
    assert torch.allclose(got, want, atol=1e-3)
    again = load_dataset("mnist", data_dir=tmp_path, val_fraction=0.2, image_size=32)
    assert torch.equal(again.val.y, data.val.y) and again.input_shape == (1, 32, 32)


def test_cifar_layout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 30 if train else 10
            self.data = np.full((n, 32, 32, 3), (0, 128, 255), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.1)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 10)
    assert data.input_shape == (3, 32, 32)
    channel_means = data.test.x.mean(dim=(0, 2, 3))
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    expected = (torch.tensor([0, 128, 255]) / 255 - mean) / std
    assert torch.allclose(channel_means, expected, atol=1e-5)


def test_missing_cifar10_names_the_data_dir_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "--download" in message and "synthetic_cifar" in message
    assert str(tmp_path / "cifar-10-batches-py") in message


def test_cifar_carries_its_normalization(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.data = np.zeros((20, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(20)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_dataset("cifar10", data_dir=tmp_path).to("cpu")
    assert data.normalization == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in data.normalization)
    torch.testing.assert_close(data.test.x[0], (torch.zeros(3, 32, 32) - mean) / std)  # black, normalized


# --------------------------------------------------------------------------- #
# synthetic CIFAR-shaped data
# --------------------------------------------------------------------------- #
def test_synthetic_cifar_shapes_sizes_and_normalization() -> None:
    data = load_dataset("synthetic_cifar", num_train=300, num_val=50, num_test=40)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 50, 40)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10 and data.name == "synthetic_cifar"
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert set(data.train.y.tolist()) == set(range(10))
    # CIFAR-10's normalization of 8-bit pixels: undoing it gives multiples of 1/255 in [0, 1].
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in data.normalization or ((), ()))
    pixels = (data.train.x * std + mean) * 255
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-3)
    assert load_dataset("synthetic_cifar", num_train=20, num_val=5, num_test=5).train.x.shape == (20, 3, 32, 32)
    assert load_dataset("synthetic_cifar", num_train=20, num_val=5, num_test=5, image_size=16).input_shape == (3, 16, 16)


def test_synthetic_cifar_is_deterministic_under_its_seed() -> None:
    a = load_dataset("synthetic_cifar", num_train=64, num_val=16, num_test=16, seed=3)
    b = load_dataset("synthetic_cifar", num_train=64, num_val=16, num_test=16, seed=3)
    c = load_dataset("synthetic_cifar", num_train=64, num_val=16, num_test=16, seed=4)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x) and torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.train.x[:16], a.val.x)  # the splits are independent draws
    # The validation set does not change with the size of the training set.
    assert torch.equal(load_dataset("synthetic_cifar", num_train=10, num_val=16, num_test=16, seed=3).val.x, a.val.x)


def test_synthetic_cifar_is_learnable_well_above_chance() -> None:
    data = load_dataset("synthetic_cifar", num_train=1000, num_val=500, num_test=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        i = torch.randint(0, 1000, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(data.train.x[i]), data.train.y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(data.val.x).argmax(1) == data.val.y).float().mean())
    assert accuracy > 0.5  # chance is 0.1 (measured: 0.91 at these seeds)


def test_sizes_apply_to_synthetic_cifar_only() -> None:
    with pytest.raises(ValueError, match="num_train applies to the synthetic_cifar dataset only"):
        load_dataset("digits", num_train=10)
    with pytest.raises(ValueError, match="num_val"):
        load_dataset("synthetic_cifar", num_val=0)


# --------------------------------------------------------------------------- #
# DeviceLoader
# --------------------------------------------------------------------------- #
def test_shared_mode_covers_epoch_once_and_is_reproducible() -> None:
    loader = DeviceLoader(index_split(103), batch_size=10, drop_last=False, seed=7)
    assert len(loader) == loader.steps_per_epoch == 11
    epoch0 = torch.cat([y for _, y in loader])
    assert sorted(epoch0.tolist()) == list(range(103))
    assert not torch.equal(epoch0, torch.arange(103))
    assert (loader.epoch, loader.position) == (1, 0)
    epoch1 = torch.cat([y for _, y in loader])
    assert sorted(epoch1.tolist()) == list(range(103)) and not torch.equal(epoch0, epoch1)
    replay = DeviceLoader(index_split(103), batch_size=10, drop_last=False, seed=7)
    assert torch.equal(torch.cat(draw(replay, 22)), torch.cat([epoch0, epoch1]))


def test_no_shuffle_and_drop_last() -> None:
    loader = DeviceLoader(index_split(25), batch_size=10, shuffle=False)
    assert len(loader) == 2
    assert torch.equal(torch.cat(draw(loader, 2)), torch.arange(20))
    assert loader.epoch == 1


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 60), b=st.integers(1, 70), n=st.integers(1, 3), drop_last=st.booleans())
def test_every_epoch_is_a_permutation(m: int, b: int, n: int, drop_last: bool) -> None:
    if drop_last and b > m:
        b = m
    loader = DeviceLoader(index_split(m), batch_size=b, num_members=n, drop_last=drop_last)
    for _ in range(2):
        ys = torch.cat(draw(loader, len(loader)), dim=1)
        assert ys.shape == (n, (m // b) * b if drop_last else m)
        for row in ys.tolist():
            assert len(set(row)) == len(row) and all(0 <= i < m for i in row)


def test_member_orders_depend_only_on_seed() -> None:
    split = index_split(64)
    loader = DeviceLoader(split, batch_size=8, num_members=3, seed=5)
    assert loader.member_seeds.tolist() == [5, 6, 7] and loader.num_members == 3
    xs, ys = loader.next_batch()
    assert xs.shape == (3, 8, 1) and ys.shape == (3, 8)
    batches = [ys] + draw(loader, 15)  # two epochs
    assert not torch.equal(loader.order[0], loader.order[1])

    alone = DeviceLoader(split, batch_size=8, num_members=1, seed=7)
    shared = DeviceLoader(split, batch_size=8, seed=7)
    for y, y_alone, y_shared in zip(batches, draw(alone, 16), draw(shared, 16)):
        assert not torch.equal(y[0], y[1])
        assert torch.equal(y[2], y_alone[0]) and torch.equal(y[2], y_shared)


def test_select_copies_and_reorders_members() -> None:
    loader = DeviceLoader(index_split(50), batch_size=5, num_members=3, seed=0)
    draw(loader, 3)
    reference = DeviceLoader(index_split(50), batch_size=5, num_members=3, seed=0)
    draw(reference, 3)
    loader.select([2, 0, 0])
    assert loader.member_seeds.tolist() == [2, 0, 0] and loader.num_members == 3
    for y, ref in zip(draw(loader, 15), draw(reference, 15)):  # crosses an epoch boundary
        assert torch.equal(y[0], ref[2]) and torch.equal(y[1], ref[0]) and torch.equal(y[2], ref[0])
    loader.select(torch.tensor([1]))
    assert loader.next_batch()[1].shape == (1, 5)


def test_reseed_changes_only_listed_members() -> None:
    loader = DeviceLoader(index_split(40), batch_size=4, num_members=3, seed=0)
    reference = DeviceLoader(index_split(40), batch_size=4, num_members=3, seed=0)
    seen = torch.cat(draw(loader, 3), dim=1)
    draw(reference, 3)
    loader.reseed([1], [100])
    assert loader.member_seeds.tolist() == [0, 100, 2]
    rest = torch.cat(draw(loader, 7), dim=1)
    ref_rest = torch.cat(draw(reference, 7), dim=1)
    assert torch.equal(rest[[0, 2]], ref_rest[[0, 2]]) and not torch.equal(rest[1], ref_rest[1])
    # The reseeded member still sees every sample exactly once this epoch ...
    assert sorted(torch.cat([seen[1], rest[1]]).tolist()) == list(range(40))
    # ... and from the next epoch on follows the new seed alone.
    fresh = DeviceLoader(index_split(40), batch_size=4, num_members=1, seed=100)
    draw(fresh, 10)
    assert torch.equal(torch.cat(draw(loader, 10), dim=1)[1], torch.cat(draw(fresh, 10), dim=1)[0])


def test_reseed_at_epoch_start_uses_new_seed_order() -> None:
    loader = DeviceLoader(index_split(30), batch_size=6, num_members=2, seed=0)
    loader.reseed(torch.tensor([0]), torch.tensor([9]))
    fresh = DeviceLoader(index_split(30), batch_size=6, num_members=1, seed=9)
    assert torch.equal(loader.order[0], fresh.order[0])


@pytest.mark.parametrize("num_members", [None, 3])
def test_state_dict_round_trip(num_members: int | None) -> None:
    loader = DeviceLoader(index_split(37), batch_size=5, num_members=num_members, seed=3)
    draw(loader, 9)
    if num_members is not None:
        loader.select([2, 2, 0])
        loader.reseed([1], [42])
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = DeviceLoader(index_split(37), batch_size=5, num_members=num_members, seed=99)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (loader.epoch, loader.position)
    for a, b in zip(draw(loader, 20), draw(resumed, 20)):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_mismatch() -> None:
    state = DeviceLoader(index_split(20), batch_size=5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(index_split(20), batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="mode"):
        DeviceLoader(index_split(20), batch_size=5, num_members=2).load_state_dict(state)


def test_bad_loader_arguments() -> None:
    split = index_split(10)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(split, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(split, batch_size=11)
    assert len(DeviceLoader(split, batch_size=11, drop_last=False)) == 1
    with pytest.raises(ValueError, match="num_members"):
        DeviceLoader(split, batch_size=2, num_members=0)
    with pytest.raises(ValueError, match="split"):
        DeviceLoader(index_split(0), batch_size=1, drop_last=False)
    with pytest.raises(ValueError, match="per-member"):
        DeviceLoader(split, batch_size=2).select([0])
    loader = DeviceLoader(split, batch_size=2, num_members=2)
    with pytest.raises(ValueError, match="indices"):
        loader.select([0, 2])
    with pytest.raises(ValueError, match="indices"):
        loader.select([])
    with pytest.raises(ValueError, match="positions"):
        loader.reseed([-1], [3])
    with pytest.raises(ValueError, match="seeds"):
        loader.reseed([0, 1], [3])
    with pytest.raises(ValueError, match="positions"):
        loader.reseed([0, 0], [3, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_stay_on_device_without_sync() -> None:
    split = index_split(1000).to("cuda")
    loader = DeviceLoader(split, batch_size=100, num_members=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [loader.next_batch() for _ in range(loader.steps_per_epoch - 1)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(x.is_cuda and y.is_cuda for x, y in batches)
    assert loader.order.is_cuda and batches[0][0].shape == (4, 100, 1)


# --------------------------------------------------------------------------- #
# iterate_batches
# --------------------------------------------------------------------------- #
def test_iterate_batches_sources() -> None:
    split = index_split(25)
    loader = DataLoader(TensorDataset(split.x, split.y), batch_size=7)
    for data in [(split.x, split.y), split, loader]:
        batches = list(iterate_batches(data, batch_size=7))
        assert [len(y) for _, y in batches] == [7, 7, 7, 4]
        assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(25))
        assert torch.equal(torch.cat([x for x, _ in batches]), split.x)


def test_iterate_batches_rejects_other_inputs() -> None:
    with pytest.raises(TypeError, match="data"):
        iterate_batches(torch.zeros(3))
    with pytest.raises(TypeError, match="data"):
        iterate_batches(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(index_split(3), batch_size=0)
