"""Per-member augmentation on the device: the transform, its streams in the loader, and training with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import RTOL, make_references
from torch import Tensor, nn

from popvec import Population, PopulationTrainer, optim
from popvec.augment import Augment
from popvec.callbacks import Callback
from popvec.data import TensorSplit, load_dataset
from popvec.engine import TrainStep
from popvec.loaders import DeviceLoader, DeviceSource
from popvec.selection import SuccessiveHalving
from popvec.state import PopulationState

pytestmark = pytest.mark.usefixtures("single_thread")

AUG = Augment(crop_padding=2, flip=True, fill=(-1.0, 0.5))


def image_split(m: int = 40, c: int = 2, size: int = 6, seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randn(m, c, size, size, generator=g), torch.arange(m) % 3)


def reference_augment(image: Tensor, dy: int, dx: int, flip: int, p: int, fill: Tensor) -> Tensor:
    """One image ``[C, H, W]`` cropped and flipped the plain way (pad, slice, flip)."""
    c, h, w = image.shape
    padded = fill.view(-1, 1, 1).expand(c, h + 2 * p, w + 2 * p).clone()
    padded[:, p : p + h, p : p + w] = image
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


# --------------------------------------------------------------------------- the transform
def test_crop_is_a_translation_and_flip_mirrors() -> None:
    c, h, w, p = 2, 5, 7, 3
    image = (torch.arange(c * h * w, dtype=torch.float32) + 1).view(c, h, w)
    aug = Augment(crop_padding=p, flip=True, fill=(-1.0, -2.0))
    for dy, dx, flip in [(0, 0, 0), (p, p, 0), (p, p, 1), (1, 5, 0), (6, 2, 1), (6, 6, 1)]:
        out = aug.apply(image[None], torch.tensor([[dy, dx, flip]]))[0]
        for ci in range(c):
            for i in range(h):
                for j in range(w):
                    src_i, src_j = i + dy - p, (w - 1 - j if flip else j) + dx - p
                    inside = 0 <= src_i < h and 0 <= src_j < w
                    expected = image[ci, src_i, src_j] if inside else torch.tensor(-1.0 - ci)
                    assert out[ci, i, j] == expected, (dy, dx, flip, ci, i, j)
    # (p, p, no flip) is the identity.
    assert torch.equal(aug.apply(image[None], torch.tensor([[p, p, 0]]))[0], image)


def test_batched_apply_equals_a_loop_over_members_and_samples() -> None:
    n, b = 3, 5
    x = image_split(n * b).x.view(n, b, 2, 6, 6)
    draws = torch.stack([AUG.draw(s, 0, b) for s in range(n)])
    out = AUG.apply(x, draws)
    fill = torch.tensor([-1.0, 0.5])
    for i in range(n):
        assert torch.equal(AUG.apply(x[i], draws[i]), out[i])
        for k in range(b):
            dy, dx, flip = draws[i, k].tolist()
            assert torch.equal(out[i, k], reference_augment(x[i, k], dy, dx, flip, 2, fill))
    # A shared batch [B, ...] seen through per-member draws [N, B, 3]: member i's own view.
    shared = AUG.apply(x[0], draws)
    for i in range(n):
        assert torch.equal(shared[i], AUG.apply(x[0], draws[i]))


def test_normalize_after_crop_equals_crop_of_normalized_with_normalized_black() -> None:
    raw = torch.rand(4, 3, 8, 8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    draws = Augment(crop_padding=4).draw(1, 0, 4)
    after = Augment(crop_padding=4, normalize=(mean, std)).apply(raw, draws)
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    data = type("D", (), {"normalization": (mean, std)})()
    before = Augment.for_data(data).apply((raw - m) / s, draws)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_draws_are_seeded_and_cover_the_range() -> None:
    aug = Augment(crop_padding=4, flip=True)
    a = aug.draw(5, 2, 4000)
    assert a.dtype == torch.int16 and a.shape == (4000, 3)
    assert torch.equal(a, aug.draw(5, 2, 4000))
    assert not torch.equal(a, aug.draw(6, 2, 4000)) and not torch.equal(a, aug.draw(5, 3, 4000))
    assert sorted(a[:, 0].unique().tolist()) == list(range(9)) == sorted(a[:, 1].unique().tolist())
    assert 0.45 < a[:, 2].float().mean() < 0.55
    assert (Augment(flip=False).draw(5, 2, 100)[:, 2] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_padding": -1}, "crop_padding"),
        ({"crop_padding": 1.5}, "crop_padding"),
        ({"fill": float("nan")}, "fill"),
        ({"normalize": ((0.5,), (0.0,))}, "normalize std"),
    ],
)
def test_bad_augment_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Augment(**kwargs)


# --------------------------------------------------------------------------- streams in the loader
def member_view(loader: DeviceLoader, aug: Augment, split: TensorSplit, i: int, slots: slice, epoch: int = 0) -> Tensor:
    """Member i's batch, made alone: its samples from its order, augmented by its own stream."""
    assert loader.member_seeds is not None
    order = loader.order if loader.shared_order else loader.order[i]
    draws = aug.draw(int(loader.member_seeds[i]), epoch, len(split))[slots]
    return aug.apply(split.x[order[slots]], draws)


@pytest.mark.parametrize("shared_order", [False, True], ids=["member_orders", "shared_order"])
def test_each_member_sees_its_own_stream(shared_order: bool) -> None:
    split = image_split()
    loader = DeviceLoader(split, 8, num_members=4, seed=3, augment=AUG, shared_order=shared_order)
    for step in range(3):
        slots = slice(step * 8, step * 8 + 8)
        expected = [member_view(loader, AUG, split, i, slots) for i in range(4)]
        x, y = loader.next_batch()
        assert x.shape == (4, 8, 2, 6, 6) and y.shape == (4, 8)
        for i in range(4):
            assert torch.equal(x[i], expected[i])
        assert all(not torch.equal(x[0], x[i]) for i in range(1, 4))
        if shared_order:
            assert all(torch.equal(y[0], y[i]) for i in range(4))
    again = DeviceLoader(split, 8, num_members=4, seed=3, augment=AUG, shared_order=shared_order)
    for _ in range(2):
        again.next_batch()
    assert torch.equal(again.next_batch()[0], x)


def test_shared_mode_uses_the_stream_of_its_seed() -> None:
    split = image_split()
    shared = DeviceLoader(split, 8, seed=5, augment=AUG)
    member = DeviceLoader(split, 8, num_members=1, seed=5, augment=AUG)
    for _ in range(6):  # across an epoch boundary (5 steps per epoch)
        xs, ys = shared.next_batch()
        xm, ym = member.next_batch()
        assert torch.equal(xs, xm[0]) and torch.equal(ys, ym[0])


def test_new_epoch_draws_new_views() -> None:
    split = image_split(16)
    loader = DeviceLoader(split, 16, num_members=2, seed=0, augment=AUG, shared_order=True, shuffle=False)
    first, second = loader.next_batch()[0], loader.next_batch()[0]
    assert not torch.equal(first, second)
    assert torch.equal(second[1], member_view(loader, AUG, split, 1, slice(0, 16), epoch=1))


def test_select_keeps_streams_by_member_identity() -> None:
    split = image_split()
    loader = DeviceLoader(split, 8, num_members=3, seed=0, augment=AUG)
    loader.next_batch()
    reference = DeviceLoader(split, 8, num_members=3, seed=0, augment=AUG)
    reference.next_batch()
    loader.select([2, 2, 0])
    x, _ = loader.next_batch()
    ref, _ = reference.next_batch()
    assert torch.equal(x[0], ref[2]) and torch.equal(x[1], ref[2]) and torch.equal(x[2], ref[0])
    # Across the epoch boundary the copies still follow their source's seed.
    for _ in range(3):
        x, _ = loader.next_batch()
        ref, _ = reference.next_batch()
    assert torch.equal(x[1], ref[2]) and torch.equal(x[2], ref[0])
    # A reseeded copy gets the new seed's stream from the next batch on; the others are untouched.
    loader.reseed([1], [99])
    slots = slice(loader.position * 8, loader.position * 8 + 8)
    expected = member_view(loader, AUG, split, 1, slots, loader.epoch)
    x, _ = loader.next_batch()
    ref, _ = reference.next_batch()
    assert torch.equal(x[1], expected) and not torch.equal(x[1], ref[2])
    assert torch.equal(x[0], ref[2]) and torch.equal(x[2], ref[0])


def test_take_leaves_the_original_stream() -> None:
    split = image_split()
    loader = DeviceLoader(split, 8, num_members=3, seed=0, augment=AUG, shared_order=True)
    taken = DeviceSource(loader).take(torch.tensor([1]))
    x_taken, _ = taken.next_batch()
    x_all, _ = loader.next_batch()
    assert x_taken.shape[0] == 1 and x_all.shape[0] == 3
    assert torch.equal(x_taken[0], x_all[1])


@pytest.mark.parametrize("shared_order", [False, True], ids=["member_orders", "shared_order"])
def test_state_dict_restores_the_streams_mid_epoch(shared_order: bool) -> None:
    split = image_split()
    loader = DeviceLoader(split, 8, num_members=3, seed=1, augment=AUG, shared_order=shared_order)
    for _ in range(3):
        loader.next_batch()
    loader.select([0, 2])
    loader.reseed([1], [42])
    state = loader.state_dict()
    assert "draws" not in state  # recomputed from the seeds and the epoch
    restored = DeviceLoader(split, 8, num_members=5, seed=7, augment=AUG, shared_order=shared_order)
    restored.load_state_dict(state)
    for _ in range(4):  # across the epoch boundary
        a, b = loader.next_batch(), restored.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_load_state_dict_refuses_other_augmentation() -> None:
    split = image_split()
    state = DeviceLoader(split, 8, num_members=2, augment=AUG).state_dict()
    with pytest.raises(ValueError, match="augment"):
        DeviceLoader(split, 8, num_members=2).load_state_dict(state)
    with pytest.raises(ValueError, match="augment"):
        DeviceLoader(split, 8, num_members=2, augment=Augment(crop_padding=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="shared_order"):
        DeviceLoader(split, 8, num_members=2, augment=AUG, shared_order=True).load_state_dict(state)


def test_bad_loader_augment_arguments() -> None:
    with pytest.raises(ValueError, match="shared_order"):
        DeviceLoader(image_split(), 8, shared_order=True)
    with pytest.raises(ValueError, match="augment needs image"):
        DeviceLoader(TensorSplit(torch.randn(10, 4), torch.zeros(10, dtype=torch.int64)), 2, augment=AUG)
    with pytest.raises(TypeError, match="augment"):
        DeviceLoader(image_split(), 8, augment=True)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- training with it
class TinyConv(nn.Module):
    """conv(3, 4, 3) + ReLU + avgpool(4) + linear on 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def tiny_cifar(m: int = 64) -> TensorSplit:
    data = load_dataset("synthetic_cifar", num_train=m, num_val=1, num_test=1, image_size=8)
    return data.train


@pytest.mark.parametrize("shared_order", [False, True], ids=["member_orders", "shared_order"])
def test_population_with_augmentation_equals_members_trained_alone(shared_order: bool) -> None:
    n, seed, split = 3, 4, tiny_cifar()
    aug = Augment(crop_padding=2)
    pop = Population.from_factory(TinyConv, n, seed=seed)
    step = TrainStep(pop, optim.SGD(pop, lr=0.05, momentum=0.9))
    refs = make_references(TinyConv, n, seed, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    loader = DeviceLoader(split, 16, num_members=n, seed=seed, augment=aug, shared_order=shared_order)
    for t in range(10):  # 2.5 epochs
        e, slots = loader.epoch, slice(loader.position * 16, loader.position * 16 + 16)
        alone = [
            (member_view(loader, aug, split, i, slots, e), split.y[(loader.order if shared_order else loader.order[i])[slots]])
            for i in range(n)
        ]
        x, y = loader.next_batch()
        losses = step(x, y, per_member=True)
        expected = torch.tensor([ref.step(*alone[i]) for i, ref in enumerate(refs)])
        torch.testing.assert_close(losses, expected, rtol=RTOL, atol=1e-6, msg=lambda msg, t=t: f"step {t}: {msg}")
    for i, ref in enumerate(refs):
        for name, p in ref.model.named_parameters():
            torch.testing.assert_close(pop.params[name][i], p.detach(), rtol=1e-5, atol=1e-6)


class Crash(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, trainer: PopulationTrainer, losses: Any) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("shared_order", [False, True], ids=["member_orders", "shared_order"])
def test_resume_mid_round_restores_the_augmentation(tmp_path: Path, shared_order: bool) -> None:
    split = tiny_cifar(48)
    val = load_dataset("synthetic_cifar", num_train=1, num_val=32, num_test=1, image_size=8).val

    def run(callbacks: list[Callback], resume: bool) -> PopulationTrainer:
        pop = Population.from_factory(TinyConv, 4, seed=0)
        trainer = PopulationTrainer(pop, optim.Adam(pop, lr=1e-2), callbacks=callbacks)
        if resume:
            trainer.load_checkpoint(tmp_path / "ck.pt")
        loader = DeviceLoader(split, 16, num_members=4, seed=0, augment=Augment(crop_padding=2), shared_order=shared_order)
        trainer.fit(loader, val, 10, SuccessiveHalving(4, 0.5), checkpoint_path=tmp_path / "ck.pt", checkpoint_every=2)
        return trainer

    full = run([], False)
    with pytest.raises(KeyboardInterrupt):
        run([Crash(5)], False)
    resumed = run([], True)
    for k, v in full.population.params.items():
        assert torch.equal(resumed.population.params[k], v), k


def test_population_state_take_and_select_follow_the_streams() -> None:
    split = tiny_cifar(32)
    pop = Population.from_factory(TinyConv, 3, seed=0)
    state = PopulationState(pop, optim.SGD(pop, lr=0.1))
    loader = DeviceLoader(split, 8, num_members=3, seed=0, augment=Augment(crop_padding=2), shared_order=True)
    reference = DeviceLoader(split, 8, num_members=3, seed=0, augment=Augment(crop_padding=2), shared_order=True)
    state.attach_source(DeviceSource(loader))
    taken = state.take([2, 0])
    state.select([1, 1])
    assert taken.source is not None and state.source is not None
    xt, xs, ref = taken.source.next_batch()[0], state.source.next_batch()[0], reference.next_batch()[0]
    assert torch.equal(xt[0], ref[2]) and torch.equal(xt[1], ref[0])
    assert torch.equal(xs[0], ref[1]) and torch.equal(xs[1], ref[1])
