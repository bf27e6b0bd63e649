"""Linear mode connectivity: vmapped curves vs one-network-per-alpha references, BatchNorm
recomputation, barrier matrices, spawning (instability analysis), bad input, and the CLI."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import IN_SHAPE, NUM_CLASSES, tiny_cnn, tiny_mlp, tiny_mlp_dropout
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import popvec
from popvec import Population, cli, lmc
from popvec.data import TensorSplit
from popvec.engine import TrainStep
from popvec.loaders import DeviceLoader
from popvec.models import MLP, LeNet5, build_model
from popvec.studies import paths

TOL = {"rtol": 1e-5, "atol": 1e-5}
pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *IN_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


DATA = synthetic(96, 0)
BN_DATA = synthetic(64, 1)


def trained_pair(model_fn: Callable[[], nn.Module], steps: int = 8) -> Population:
    """Two members from different inits, a few SGD steps each (BatchNorm statistics move too)."""
    pop = Population.from_factory(model_fn, 2, seed=3)
    step = TrainStep(pop, popvec.optim.SGD(pop, lr=0.2, momentum=0.9))
    x, y = synthetic(32 * steps, 2)
    for xb, yb in zip(x.split(32), y.split(32)):
        step(xb, yb)
    return pop


@pytest.fixture(scope="module")
def mlp_pair() -> Population:
    return trained_pair(tiny_mlp)


@pytest.fixture(scope="module")
def cnn_pair() -> Population:
    return trained_pair(tiny_cnn)


# --------------------------------------------------------------------------- references
def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def loss_and_error(model: nn.Module, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    model.eval()
    out = model(data[0])
    return float(F.cross_entropy(out, data[1])), float((out.argmax(1) != data[1]).float().mean())


@torch.no_grad()
def reference_curve(a: nn.Module, b: nn.Module, alphas: Tensor, bn_data: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One nn.Module per alpha (textbook formula, load_state_dict), evaluated with plain PyTorch.

    With ``bn_data``: reset running statistics, then PyTorch's cumulative averaging (momentum=None)
    over ``bn_data`` in batches of 16, BatchNorm in train mode and everything else in eval mode.
    """
    sa, sb = a.state_dict(), b.state_dict()
    losses, errors = [], []
    for alpha in alphas.tolist():
        model = copy.deepcopy(a)
        model.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v for k, v in sa.items()})
        if bn_data is not None:
            model.eval()
            for bn in batchnorms(model):
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for x in bn_data[0].split(16):
                model(x)
        loss, error = loss_and_error(model, DATA)
        losses.append(loss)
        errors.append(error)
    return torch.tensor(losses), torch.tensor(errors)


# --------------------------------------------------------------------------- curves
@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_endpoints_equal_each_network_alone_and_gap_is_zero_there(name: str, mlp_pair: Population, cnn_pair: Population) -> None:
    pop = mlp_pair if name == "mlp" else cnn_pair
    res = lmc.interpolate((pop, 0), (pop, 1), DATA, alphas=7, bn="keep")
    for end, member in ((0, 0), (-1, 1)):
        loss, error = loss_and_error(pop.member(member), DATA)
        assert res.loss[end].item() == pytest.approx(loss, abs=1e-5)
        assert res.error[end].item() == pytest.approx(error, abs=1e-6)
        assert res.loss_gap[end] == 0 and res.error_gap[end] == 0
    assert res.loss_barrier == pytest.approx(float(res.loss_gap[1:-1].max()))  # the ends (gap 0) are left out


def test_identical_endpoints_give_a_flat_curve_and_zero_barrier(cnn_pair: Population) -> None:
    model = cnn_pair.member(0)
    res = lmc.interpolate(model, copy.deepcopy(model), DATA, alphas=9, bn_data=BN_DATA)
    torch.testing.assert_close(res.loss, res.loss[:1].expand(9), rtol=0, atol=1e-6)
    assert abs(res.loss_barrier) <= 1e-6 and abs(res.error_barrier) <= 1e-6 and res.l2 == 0.0


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6, unique=True))
def test_swapping_a_and_b_reverses_the_curve(mlp_pair: Population, steps: list[int]) -> None:
    alphas = torch.tensor(sorted(steps)) / 20
    forward = lmc.interpolate((mlp_pair, 0), (mlp_pair, 1), DATA, alphas=alphas)
    backward = lmc.interpolate((mlp_pair, 1), (mlp_pair, 0), DATA, alphas=(1 - alphas).flip(0))
    for field in ("loss", "error", "loss_gap", "error_gap"):
        torch.testing.assert_close(getattr(backward, field), getattr(forward, field).flip(0), **TOL)
    assert backward.loss_barrier == pytest.approx(forward.loss_barrier, abs=1e-5)
    assert backward.l2 == pytest.approx(forward.l2)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_vmapped_curve_equals_one_network_per_alpha(name: str, mlp_pair: Population, cnn_pair: Population) -> None:
    pop = mlp_pair if name == "mlp" else cnn_pair
    a, b = pop.member(0), pop.member(1)
    res = lmc.interpolate(a, b, DATA, alphas=11, bn="keep", batch_size=40, member_chunk_size=4)
    loss, error = reference_curve(a, b, res.alphas)
    torch.testing.assert_close(res.loss, loss, **TOL)
    torch.testing.assert_close(res.error, error, **TOL)
    gap = loss - ((1 - res.alphas) * loss[0] + res.alphas * loss[-1])
    torch.testing.assert_close(res.loss_gap, gap, **TOL)
    assert res.loss_barrier == pytest.approx(float(gap[1:-1].max()), abs=1e-5)
    l2 = torch.cat([(pa - pb).detach().flatten() for pa, pb in zip(a.parameters(), b.parameters())]).norm()
    assert res.l2 == pytest.approx(float(l2), rel=1e-6)


def test_recompute_equals_sequential_recompute_and_differs_from_keep(cnn_pair: Population) -> None:
    a, b = cnn_pair.member(0), cnn_pair.member(1)
    batches = list(zip(*(t.split(16) for t in BN_DATA)))  # an iterable of training batches
    res = lmc.interpolate(a, b, DATA, alphas=9, bn_data=batches, member_chunk_size=4)  # bn="auto" -> recompute
    assert res.bn == "recompute"
    loss, error = reference_curve(a, b, res.alphas, bn_data=BN_DATA)
    torch.testing.assert_close(res.loss, loss, **TOL)
    torch.testing.assert_close(res.error, error, **TOL)
    keep = lmc.interpolate(a, b, DATA, alphas=9, bn="keep")
    assert (res.loss - keep.loss).abs().max() > 1e-3


def test_recompute_batchnorm_is_cumulative_average_of_batch_statistics(cnn_pair: Population) -> None:
    buffers = lmc.recompute_batchnorm(cnn_pair, BN_DATA, batch_size=16)
    conv = cnn_pair.member(1).conv
    with torch.no_grad():
        feats = [conv(x) for x in BN_DATA[0].split(16)]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(buffers["bn.running_mean"][1], mean, **TOL)
    torch.testing.assert_close(buffers["bn.running_var"][1], var, **TOL)
    assert buffers["bn.num_batches_tracked"].tolist() == [4, 4]


class ViewCNN(nn.Module):
    """Conv + BatchNorm whose forward ``.view``s its activations (which fails in channels_last)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.shape[0], -1))


class InPlaceInput(ViewCNN):
    """ViewCNN that doubles its input in place first."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.mul_(2.0))


def perturbed_pair(model_fn: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a, b = model_fn(), model_fn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return a, b


@pytest.fixture(params=[True, False], ids=["one_at_a_time", "vmapped"])
def cpu_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Forces the CPU's choice between one network at a time and the vmapped pass (made by timing the
    first batch); the list records each choice made."""
    choose, made = paths._members_one_at_a_time, []

    def forced(*args: object) -> bool:
        choose(*args)  # the first batch, vmapped, and the timing of member 0 alone
        made.append(request.param)
        return bool(request.param)

    monkeypatch.setattr(paths, "_members_one_at_a_time", forced)
    return made


@pytest.mark.parametrize("model_fn", [tiny_cnn, ViewCNN])
def test_cpu_recompute_either_way_equals_the_loop_and_the_chunked_path(model_fn: Callable[[], nn.Module], cpu_way: list[bool]) -> None:
    """On a CPU without member_chunk_size, one network at a time (channels_last where the model allows
    it) or all vmapped, as the first batch decides: the per-alpha loop's curve and statistics."""
    a, b = perturbed_pair(model_fn)
    batches = list(zip(*(t.split(16) for t in BN_DATA)))
    res = lmc.interpolate(a, b, DATA, alphas=7, bn_data=batches, batch_size=40)
    assert res.bn == "recompute" and len(cpu_way) == 1
    ref_loss, ref_error = reference_curve(a, b, res.alphas, bn_data=BN_DATA)
    torch.testing.assert_close(res.loss, ref_loss, **TOL)
    torch.testing.assert_close(res.error, ref_error, **TOL)
    ends = [Population.from_modules([m]) for m in (a, b)]
    params, buffers = (paths.interpolate_stacks(getattr(ends[0], k), getattr(ends[1], k), res.alphas) for k in ("params", "buffers"))
    path = Population(ends[0].skeleton, params, buffers)
    one, chunked = (lmc.recompute_batchnorm(path, batches, member_chunk_size=c) for c in (None, 2))
    assert one.keys() == chunked.keys() and len(cpu_way) == 2
    for key in one:
        torch.testing.assert_close(one[key], chunked[key], **TOL)
    assert one["bn.num_batches_tracked"].tolist() == [len(batches)] * 7


def test_one_at_a_time_gives_every_network_its_own_copy_of_the_input(cpu_way: list[bool]) -> None:
    """A forward that modifies its input in place changes neither the data nor the other networks' input."""
    a, b = perturbed_pair(InPlaceInput)
    x, bx = DATA[0].clone(), BN_DATA[0].clone()
    data, bn_data = (x, DATA[1]), list(zip(bx.split(16), BN_DATA[1].split(16)))
    either = lmc.interpolate(a, b, data, alphas=5, bn_data=bn_data, batch_size=40)
    chunked = lmc.interpolate(a, b, data, alphas=5, bn_data=bn_data, batch_size=40, member_chunk_size=2)
    torch.testing.assert_close(either.loss, chunked.loss, **TOL)
    assert torch.equal(x, DATA[0]) and torch.equal(bx, BN_DATA[0])


def test_channels_last_only_where_the_model_gives_the_same_outputs() -> None:
    x = torch.randn(2, 3, 8, 8)
    for model, expected in ((nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), True), (ViewCNN(3), False)):
        pop = Population.from_modules([model])
        members = paths._Members(copy.deepcopy(model).eval(), pop.params, pop.buffers)
        assert members.layout(x).is_contiguous(memory_format=torch.channels_last) == expected
        assert members.channels_last == expected


# --------------------------------------------------------------------------- first-layer shortcut
class ScaledInput(nn.Module):
    """A learned input scale before the first Linear: the first layer's input depends on the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(64))
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1) * self.scale)))


class NormFirst(nn.Module):
    """LayerNorm (not an affine layer of the supported kinds) as the first computation."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(64), nn.Linear(64, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(torch.flatten(x, 1)))


class SharedFirst(nn.Module):
    """The first Linear applied twice (square weight): its output is not linear in alpha any more."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(torch.relu(self.fc1(torch.flatten(x, 1)))))


class ShiftedInput(nn.Module):
    """A parameter-free op (x - 0.5) before the first Linear: a new tensor, not a view of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1) - 0.5)))


def general_path(a: nn.Module, b: nn.Module, data: tuple[Tensor, Tensor], alphas: int, **kwargs: object) -> tuple[Tensor, Tensor]:
    """The same curve as lmc.interpolate, the first-layer shortcut turned off."""
    pa, pb = Population.from_modules([a]), Population.from_modules([b])
    spec = paths.path_evaluation(
        pa.skeleton,
        data,
        F.cross_entropy,
        kwargs.pop("bn", "auto"),
        kwargs.pop("bn_data", None),
        kwargs.pop("batch_size", 1024),
        kwargs.pop("member_chunk_size", None),
    )
    loss, error, used = paths.evaluate_paths(pa, pb, paths.alpha_grid(paths.as_alphas(alphas))[0], spec, shortcut=False)
    assert not used
    return loss[0], error[0]


@pytest.mark.parametrize("name", ["mlp", "lenet5", "tiny_mlp", "cnn_bn"])
def test_first_layer_shortcut_is_taken_and_equals_the_general_path(name: str) -> None:
    big = name in ("mlp", "lenet5")
    model_fn = {"mlp": lambda: MLP(784, (256, 256), 10), "lenet5": lambda: LeNet5(1, 10, 28), "tiny_mlp": tiny_mlp, "cnn_bn": tiny_cnn}[
        name
    ]
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(48, 1, 28, 28, generator=g), torch.randint(0, 10, (48,), generator=g)) if big else DATA
    torch.manual_seed(0)
    a, b = model_fn(), model_fn()
    kwargs = {"bn_data": list(zip(*(t.split(16) for t in BN_DATA)))} if name == "cnn_bn" else {}  # batches of 16, as the reference
    res = lmc.interpolate(a, b, data, alphas=9, batch_size=20, member_chunk_size=4, **kwargs)
    assert res.shortcut
    loss, error = general_path(a, b, data, 9, batch_size=20, member_chunk_size=4, **kwargs)
    torch.testing.assert_close(res.loss, loss, **TOL)
    torch.testing.assert_close(res.error, error, **TOL)
    if not big:
        ref_loss, ref_error = reference_curve(a, b, res.alphas, bn_data=BN_DATA if name == "cnn_bn" else None)
        torch.testing.assert_close(res.loss, ref_loss, **TOL)
        torch.testing.assert_close(res.error, ref_error, **TOL)


@pytest.mark.parametrize("model_fn", [ScaledInput, NormFirst, SharedFirst, ShiftedInput])
def test_unsupported_first_op_falls_back_and_still_matches(model_fn: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    a, b = model_fn(), model_fn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batches = [(x, y) for x, y in zip(*(t.split(40) for t in DATA))]
    res = lmc.interpolate(a, b, iter(batches), alphas=7, member_chunk_size=3)  # a one-shot iterator: nothing lost on fallback
    assert not res.shortcut
    loss, error = reference_curve(a, b, res.alphas)
    torch.testing.assert_close(res.loss, loss, **TOL)
    torch.testing.assert_close(res.error, error, **TOL)


# --------------------------------------------------------------------------- barrier matrix
def test_barrier_matrix_is_symmetric_with_zero_diagonal_and_matches_interpolate() -> None:
    pop = Population.from_factory(tiny_cnn, 4, seed=0)
    matrix = lmc.barrier_matrix(pop, DATA, alphas=5, bn_data=BN_DATA, pair_chunk_size=4, batch_size=16)
    for values in (matrix.loss, matrix.error, matrix.l2):
        assert values.shape == (4, 4)
        torch.testing.assert_close(values, values.T, rtol=0, atol=0)
        assert bool((values.diagonal() == 0).all())
    for i, j in ((0, 1), (1, 3), (2, 3)):
        res = lmc.interpolate((pop, i), (pop, j), DATA, alphas=5, bn_data=BN_DATA, batch_size=16)
        assert matrix.loss[i, j].item() == pytest.approx(res.loss_barrier, abs=1e-5)
        assert matrix.error[i, j].item() == pytest.approx(res.error_barrier, abs=1e-6)
        assert matrix.l2[i, j].item() == pytest.approx(res.l2, rel=1e-6)


def test_barrier_matrix_of_sixteen_batchnorm_members_either_way(cpu_way: list[bool]) -> None:
    """16 members, 120 pairs, BatchNorm recomputed: one network at a time or vmapped, each entry is interpolate's."""
    pop = Population.from_factory(tiny_cnn, 16, seed=1)
    matrix = lmc.barrier_matrix(pop, DATA, alphas=3, bn_data=BN_DATA, pair_chunk_size=48, batch_size=32)
    assert matrix.bn == "recompute" and len(cpu_way) == 3  # three chunks of pairs, each deciding on its first batch
    for values in (matrix.loss, matrix.error, matrix.l2):
        assert values.shape == (16, 16) and bool(torch.isfinite(values).all())
        torch.testing.assert_close(values, values.T, rtol=0, atol=0)
    for i, j in ((0, 15), (3, 7), (14, 15)):
        res = lmc.interpolate((pop, i), (pop, j), DATA, alphas=3, bn_data=BN_DATA, batch_size=32, member_chunk_size=3)
        assert matrix.loss[i, j].item() == pytest.approx(res.loss_barrier, abs=1e-5)
        assert matrix.error[i, j].item() == pytest.approx(res.error_barrier, abs=1e-6)


# --------------------------------------------------------------------------- spawning
def sgd(pop: Population) -> popvec.optim.SGD:
    return popvec.optim.SGD(pop, lr=0.1, momentum=0.9)


TRAIN = TensorSplit(*synthetic(128, 5))


def test_copies_with_the_same_order_and_no_dropout_stay_identical() -> None:
    same = lmc.instability(tiny_mlp, sgd, TRAIN, [0, 3], k2=6, batch_size=16, eval_data=DATA, copy_seeds=[7, 7], alphas=3)
    for g in range(2):
        for stack in same.branches.params.values():
            assert torch.equal(stack[2 * g], stack[2 * g + 1])
    assert same.l2.tolist() == [0.0, 0.0] and same.loss_barrier.abs().max() <= 1e-6
    different = lmc.instability(tiny_mlp, sgd, TRAIN, [0, 3], k2=6, batch_size=16, eval_data=DATA, copy_seeds=[7, 8], alphas=3)
    assert bool((different.l2 > 1e-3).all())


def test_dropout_masks_differ_between_copies() -> None:
    res = lmc.instability(tiny_mlp_dropout, sgd, TRAIN, [2], k2=4, batch_size=16, eval_data=DATA, copy_seeds=[7, 7], alphas=3)
    assert res.l2.item() > 1e-4


def test_branches_resume_the_trunk_weights_and_optimizer_state(tmp_path: Path) -> None:
    """Copy c of k1 equals one model: k1 steps on the trunk's order, then k2 on seed copy_seeds[c]."""
    k1, k2, seeds = [0, 4], 3, [11, 12]
    res = lmc.instability(tiny_mlp, sgd, TRAIN, k1, k2, batch_size=16, seed=5, eval_data=DATA, copy_seeds=seeds, run_dir=tmp_path, alphas=3)
    torch.manual_seed(5)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trunk = DeviceLoader(TRAIN, 16, seed=5)

    def train(m: nn.Module, o: torch.optim.Optimizer, loader: DeviceLoader, steps: int) -> None:
        for _ in range(steps):
            x, y = loader.next_batch()
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    done = 0
    for g, k in enumerate(k1):
        train(model, opt, trunk, k - done)
        done = k
        saved = torch.load(tmp_path / f"trunk_k1_{k}.pt", weights_only=True)
        assert saved["k1"] == k
        for c, seed in enumerate(seeds):
            branch_model, branch_opt = copy.deepcopy((model, opt))
            train(branch_model, branch_opt, DeviceLoader(TRAIN, 16, seed=seed), k2)
            member = dict(branch_model.named_parameters())
            for name, stack in res.branches.params.items():
                torch.testing.assert_close(stack[g * 2 + c], member[name].detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "alphas, match",
    [
        (1, "alphas"),
        ([], "alphas"),
        ([[0.0, 1.0]], "alphas"),
        ([-0.1, 0.5], r"alphas must lie in \[0, 1\]"),
        ([0.0, 1.5], r"alphas must lie in \[0, 1\]"),
        ([0.0, 0.7, 0.3], "alphas must be strictly increasing"),
        ([0.2, 0.2], "alphas must be strictly increasing"),
        ([float("nan")], "alphas"),
    ],
)
def test_bad_alphas(alphas: object, match: str, mlp_pair: Population) -> None:
    with pytest.raises(ValueError, match=match):
        lmc.interpolate((mlp_pair, 0), (mlp_pair, 1), DATA, alphas=alphas)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8))
def test_as_alphas_accepts_exactly_increasing_values_in_unit_interval(values: list[float]) -> None:
    ok = all(0 <= v <= 1 for v in values) and all(x < y for x, y in itertools.pairwise(values))
    if ok:
        assert lmc.as_alphas(values).tolist() == pytest.approx(values)
    else:
        with pytest.raises(ValueError, match="alphas"):
            lmc.as_alphas(values)


def test_bad_endpoints_and_options(mlp_pair: Population, cnn_pair: Population) -> None:
    with pytest.raises(ValueError, match="b must have the same architecture as a"):
        lmc.interpolate(MLP(64, (32,), 3), MLP(64, (16,), 3), DATA)
    with pytest.raises(ValueError, match="b must have the same architecture as a"):
        lmc.interpolate((mlp_pair, 0), (cnn_pair, 0), DATA)
    with pytest.raises(TypeError, match="b must be an nn.Module"):
        lmc.interpolate((mlp_pair, 0), "model.pt", DATA)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bn_data"):
        lmc.interpolate((cnn_pair, 0), (cnn_pair, 1), DATA)
    with pytest.raises(ValueError, match="bn must be one of"):
        lmc.interpolate((cnn_pair, 0), (cnn_pair, 1), DATA, bn="fresh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 members"):
        lmc.barrier_matrix(Population.from_factory(tiny_mlp, 1), DATA)
    with pytest.raises(ValueError, match="pair_chunk_size"):
        lmc.barrier_matrix(mlp_pair, DATA, pair_chunk_size=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k1_values": []}, ValueError, "k1_values"),
        ({"k1_values": [0, -1]}, ValueError, "k1_values"),
        ({"k1_values": [3, 3]}, ValueError, "k1_values"),
        ({"copies": 1}, ValueError, "copies"),
        ({"copy_seeds": [1, 2, 3]}, ValueError, "copy_seeds"),
        ({"k2": -1}, ValueError, "k2"),
        ({"optimizer_fn": lambda pop: popvec.optim.from_torch(pop, lambda p: torch.optim.SGD(p, lr=0.1))}, TypeError, "popvec optimizer"),
    ],
)
def test_bad_instability_arguments(kwargs: dict, error: type, match: str) -> None:
    args = {"model_fn": tiny_mlp, "optimizer_fn": sgd, "data": TRAIN, "k1_values": [0], "k2": 1, **kwargs}
    with pytest.raises(error, match=match):
        lmc.instability(**args)


# --------------------------------------------------------------------------- module layout
# Everything popvec.lmc offered before it was split into paths, shortcut and instability.
LMC_NAMES = [
    "BN_MODES",
    "BNMode",
    "BarrierMatrix",
    "InstabilityResult",
    "InterpolationResult",
    "StepCallback",
    "as_alphas",
    "barrier",
    "barrier_matrix",
    "check_interpolation",
    "instability",
    "interpolate",
    "interpolate_stacks",
    "interpolation_gap",
    "l2_distance",
    "recompute_batchnorm",
]


def test_lmc_reexports_the_split_modules() -> None:
    from popvec.studies import instability, paths

    assert popvec.lmc is popvec.studies.lmc
    assert popvec.lmc.instability is instability.instability and lmc.InstabilityResult is instability.InstabilityResult
    for name in LMC_NAMES:
        assert hasattr(lmc, name), name
    for name in ("as_alphas", "barrier", "interpolate_stacks", "interpolation_gap", "l2_distance", "recompute_batchnorm", "BN_MODES"):
        assert getattr(lmc, name) is getattr(paths, name)
    assert set(lmc.__all__) <= set(LMC_NAMES)


def test_lmc_modules_import_downwards_only() -> None:
    """shortcut <- paths <- instability <- lmc: no module imports one above it (no cycles)."""
    import ast

    order = ["shortcut", "paths", "instability", "lmc"]
    for level, module in enumerate(order):
        tree = ast.parse(Path(popvec.studies.__file__).with_name(f"{module}.py").read_text())
        froms = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        imported = {node.module for node in froms} | {f"{node.module}.{alias.name}" for node in froms for alias in node.names}
        above = {f"popvec.studies.{name}" for name in order[level:]}
        assert not imported & above, f"{module} imports {imported & above}"


# --------------------------------------------------------------------------- results and CLI
def test_results_to_json_and_png(tmp_path: Path, mlp_pair: Population) -> None:
    pytest.importorskip("matplotlib")
    res = lmc.interpolate((mlp_pair, 0), (mlp_pair, 1), DATA, alphas=5)
    blob = json.loads(json.dumps(res.to_dict()))
    assert blob["alphas"] == pytest.approx([0, 0.25, 0.5, 0.75, 1]) and blob["bn"] == "keep"
    assert res.plot(tmp_path / "curve.png").stat().st_size > 1000


def save_mlp(path: Path, seed: int, hidden: tuple[int, ...] = (256, 256)) -> None:
    torch.manual_seed(seed)
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=hidden).state_dict(), path)


def test_cli_lmc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_mlp(tmp_path / "a.pt", 0)
    save_mlp(tmp_path / "b.pt", 1)
    out = tmp_path / "lmc"
    args = ["lmc", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "mlp", "--alphas", "5", "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "loss barrier" in text and "error barrier" in text
    curve = json.loads((out / "lmc.json").read_text())
    assert len(curve["loss"]) == 5 and curve["config"]["split"] == "test"
    save_mlp(tmp_path / "c.pt", 2, hidden=(32,))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lmc", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--model", "mlp", "--out", str(tmp_path / "lmc2")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_lmc_with_a_non_finite_network_prints_nan_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_mlp(tmp_path / "a.pt", 0)
    torch.manual_seed(1)
    state = build_model("mlp", (1, 8, 8), 10).state_dict()
    next(iter(state.values())).fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    args = ["lmc", str(tmp_path / "a.pt"), str(tmp_path / "nan.pt"), "--model", "mlp", "--alphas", "5", "--no-plots"]
    with pytest.warns(RuntimeWarning):
        assert cli.main([*args, "--out", str(tmp_path / "lmc"), "--device", "cpu"]) == 1
    assert "Barrier nan" in capsys.readouterr().out


def test_cli_instability(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inst"
    args = [
        "instability",
        "--model",
        "mlp",
        "--k1",
        "0,5",
        "--k2",
        "5",
        "--alphas",
        "3",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert "error barrier" in capsys.readouterr().out
    result = json.loads((out / "instability.json").read_text())
    assert [row["k1"] for row in result["rows"]] == [0, 5]
    assert (out / "trunk_k1_0.pt").is_file() and (out / "trunk_k1_5.pt").is_file()
    for bad in (["--k1", "0,x"], ["--k1", "0,-5"], ["--copies", "1"], ["--k2", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["instability", "--model", "mlp", "--k2", "5", "--out", str(out), *bad])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- instability: kill and resume
class _Killed(Exception):
    pass


def _killed_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_after: int, k1: list[int], **kwargs: Any
) -> tuple[lmc.InstabilityResult, lmc.InstabilityResult]:
    """An uninterrupted instability run, and the same run killed after its ``kill_after``-th checkpoint write then resumed."""
    full = lmc.instability(tiny_mlp_dropout, sgd, TRAIN, k1, 5, run_dir=tmp_path / "full", **kwargs)
    original = popvec.PopulationTrainer.save_checkpoint
    writes = []

    def save_then_die(self: popvec.PopulationTrainer, path: Path) -> None:
        original(self, path)
        writes.append(path)
        if len(writes) == kill_after:
            raise _Killed

    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(popvec.PopulationTrainer, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            lmc.instability(tiny_mlp_dropout, sgd, TRAIN, k1, 5, run_dir=run, **kwargs)
    return full, lmc.instability(tiny_mlp_dropout, sgd, TRAIN, k1, 5, run_dir=run, resume=True, **kwargs)


@pytest.mark.parametrize("kill_after", [1, 2, 3, 5])
def test_instability_killed_and_resumed_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_after: int) -> None:
    """Checkpoints: trunk at k1 = 0, 3, 6 (writes 1-3, plus the trunk's end), branches every 2 steps; kill after
    the k-th write and resume: the branches (dropout masks too) end bit-identical."""
    kwargs = dict(batch_size=16, seed=3, eval_data=DATA, alphas=3, checkpoint_every=2)
    full, resumed = _killed_and_resumed(tmp_path, monkeypatch, kill_after, [0, 3, 6], **kwargs)
    for kind in ("params", "buffers"):
        for name, stack in getattr(full.branches, kind).items():
            assert torch.equal(getattr(resumed.branches, kind)[name], stack), name
    assert torch.equal(resumed.error_barrier, full.error_barrier) and torch.equal(resumed.loss_barrier, full.loss_barrier)


def test_instability_resume_without_checkpoints_starts_over(tmp_path: Path) -> None:
    kwargs = dict(batch_size=16, seed=3, eval_data=DATA, alphas=3)
    a = lmc.instability(tiny_mlp_dropout, sgd, TRAIN, [0, 2], 3, run_dir=tmp_path / "a", **kwargs)
    b = lmc.instability(tiny_mlp_dropout, sgd, TRAIN, [0, 2], 3, run_dir=tmp_path / "b", resume=True, **kwargs)
    for name, stack in a.branches.params.items():
        assert torch.equal(b.branches.params[name], stack), name


# --------------------------------------------------------------------------- instability: replicate trunks
def test_instability_trunk_k_of_a_k_seed_run_equals_a_one_seed_run() -> None:
    """--seeds K: trunk t (and its copies) is the standalone run with seed + t, up to float rounding."""
    kwargs = dict(batch_size=16, eval_data=DATA, alphas=3)
    many = lmc.instability(tiny_mlp, sgd, TRAIN, [0, 3], 4, seed=5, num_seeds=3, **kwargs)
    assert many.seeds == [5, 6, 7] and many.branches.n == 2 * 3 * 2
    for c in ("loss_barrier", "error_barrier", "l2", "error"):
        assert many.per_seed[c].shape == (3, 2)
        torch.testing.assert_close(getattr(many, c), many.per_seed[c].mean(0))
    for t in range(3):
        one = lmc.instability(tiny_mlp, sgd, TRAIN, [0, 3], 4, seed=5 + t, **kwargs)
        assert one.seeds == [5 + t]
        for c in ("loss_barrier", "error_barrier", "l2", "error"):
            torch.testing.assert_close(many.per_seed[c][t], getattr(one, c), atol=1e-5, rtol=1e-5)
        for name, stack in one.branches.params.items():  # copy c of trunk t at k1[g] is member (g * K + t) * copies + c
            mine = torch.stack([many.branches.params[name][(g * 3 + t) * 2 + c] for g in range(2) for c in range(2)])
            torch.testing.assert_close(mine, stack, atol=1e-5, rtol=1e-5)
    summary = many.summaries()
    assert summary[0]["loss_barrier"].n == 3
    assert summary[1]["l2"].mean == pytest.approx(float(many.l2[1]), rel=1e-6)
    assert summary[1]["l2"].ci_low <= summary[1]["l2"].mean <= summary[1]["l2"].ci_high
    d = many.to_dict()
    assert [(r["seed"], r["k1"]) for r in d["per_seed"]] == [(5, 0), (5, 3), (6, 0), (6, 3), (7, 0), (7, 3)]
    assert d["summary"][0]["k1"] == 0 and set(d["summary"][0]["error_barrier"]) >= {"mean", "std", "ci_low", "ci_high", "n", "n_finite"}


def test_instability_one_seed_has_no_spread_and_explicit_seeds_work() -> None:
    kwargs = dict(batch_size=16, eval_data=DATA, alphas=3)
    one = lmc.instability(tiny_mlp, sgd, TRAIN, [2], 3, seed=4, **kwargs)
    s = one.summaries()[0]["loss_barrier"]
    assert s.n == 1 and s.mean == pytest.approx(float(one.loss_barrier[0])) and s.std != s.std  # NaN, not 0
    listed = lmc.instability(tiny_mlp, sgd, TRAIN, [2], 3, seeds=[9, 4], **kwargs)
    assert listed.seeds == [9, 4]
    torch.testing.assert_close(listed.per_seed["l2"][1], one.l2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="disagree"):
        lmc.instability(tiny_mlp, sgd, TRAIN, [2], 3, seeds=[1, 2], num_seeds=3, **kwargs)
    with pytest.raises(ValueError, match="num_seeds"):
        lmc.instability(tiny_mlp, sgd, TRAIN, [2], 3, num_seeds=0, **kwargs)


@pytest.mark.parametrize("kill_after", [2, 4])
def test_instability_with_seeds_killed_and_resumed_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_after: int
) -> None:
    kwargs = dict(batch_size=16, seed=3, num_seeds=2, eval_data=DATA, alphas=3, checkpoint_every=2)
    full, resumed = _killed_and_resumed(tmp_path, monkeypatch, kill_after, [0, 3], **kwargs)
    for name, stack in full.branches.params.items():
        assert torch.equal(resumed.branches.params[name], stack), name
    for c, values in full.per_seed.items():
        assert torch.equal(resumed.per_seed[c], values), c


def test_cli_instability_seeds_prints_the_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inst"
    args = ["instability", "--model", "mlp", "--k1", "0,5", "--k2", "5", "--alphas", "3", "--seeds", "2"]
    assert cli.main([*args, "--out", str(out), "--device", "cpu", "--no-progress", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "95% Student-t CI" in printed and "2 trunks (seeds 0..1)" in printed
    result = json.loads((out / "instability.json").read_text())
    assert result["seeds"] == [0, 1] and len(result["per_seed"]) == 4
    assert result["summary"][1]["loss_barrier"]["n"] == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args[:-1], "0", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
