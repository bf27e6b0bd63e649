"""Tests for popvec.models: parameter counts, shapes, vmap equivalence, registry."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from popvec.models import (
    MLP,
    MODEL_NAMES,
    LeNet5,
    LogisticRegression,
    ResNet18,
    ResNet20,
    VGGSmall,
    build_model,
    model_factory,
    required_image_size,
)

# One sensible sample shape per registered model.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "logreg": (1, 8, 8),
    "mlp": (1, 8, 8),
    "lenet5": (1, 28, 28),
    "vgg": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet18": (3, 32, 32),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_match_registry() -> None:
    assert set(MODEL_NAMES) == set(INPUT_SHAPES)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: LogisticRegression(64, 10), 650),
        (lambda: MLP(784, (256, 256), 10), 269_322),
        (lambda: LeNet5(1, 10, 28), 61_706),
        (lambda: LeNet5(1, 10, 32), 61_706),
        (lambda: VGGSmall(3, 10), 857_230),
        (lambda: ResNet20(3, 10), 272_474),
        (lambda: ResNet18(3, 10), 11_173_962),
    ],
    ids=["logreg", "mlp", "lenet5-28", "lenet5-32", "vgg", "resnet20", "resnet18"],
)
def test_parameter_counts(make: Callable[[], nn.Module], expected: int) -> None:
    assert n_params(make()) == expected


def test_resnet20_is_about_027m() -> None:
    assert 260_000 <= n_params(ResNet20()) <= 280_000


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    shape = INPUT_SHAPES[name]
    model = build_model(name, shape, num_classes=7).eval()
    batch = 2 if name == "resnet18" else 4
    with torch.no_grad():
        out = model(torch.randn(batch, *shape))
    assert out.shape == (batch, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_flat_models_accept_flat_and_image_inputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (64,), num_classes=10).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.flatten(1)))


def test_lenet5_32_and_channels() -> None:
    model = build_model("lenet5", (3, 32, 32), num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_dropout_layers() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in MLP(64, (32, 32)).modules())
    assert sum(isinstance(m, nn.Dropout) for m in MLP(64, (32, 32), dropout=0.2).modules()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "resnet18"])
def test_vmap_matches_individual_models(name: str) -> None:
    shape = INPUT_SHAPES[name]
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(name, shape, num_classes=10).eval())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    torch.manual_seed(123)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        stacked = vmap(call, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
        for i, model in enumerate(models):
            torch.testing.assert_close(stacked[i], model(x), atol=1e-5, rtol=1e-5)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="model") as info:
        build_model("alexnet", (3, 32, 32), 10)
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="model"):
        model_factory("alexnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="model"):
        required_image_size("alexnet")


def test_lenet5_rejects_bad_image_size() -> None:
    with pytest.raises(ValueError, match="image_size") as info:
        build_model("lenet5", (1, 30, 30), 10)
    assert "28" in str(info.value) and "32" in str(info.value)


def test_model_factory_is_picklable_and_fresh() -> None:
    factory = model_factory("mlp", (1, 8, 8), 10, hidden=(16,))
    restored = pickle.loads(pickle.dumps(factory))
    for f in (factory, restored):
        a, b = f(), f()
        assert isinstance(a, MLP) and a is not b
        assert a.net[0].in_features == 64 and a.net[0].out_features == 16
        assert not torch.equal(a.net[0].weight, b.net[0].weight)


def test_required_image_size() -> None:
    assert required_image_size("lenet5") == 28
    for name in MODEL_NAMES:
        if name != "lenet5":
            assert required_image_size(name) is None
