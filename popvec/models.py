"""A small zoo of models from the literature, written to be vmap-safe.

Every model is a plain ``nn.Module`` that :class:`~popvec.population.Population` stacks
(``from_factory``/``from_modules``) and runs with ``torch.func.functional_call`` under
``torch.func.vmap`` (``randomness="different"``): no in-place ops on activations,
``torch.flatten`` instead of ``.view``, no data-dependent Python control flow and no ``.item()``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from popvec import checks

__all__ = [
    "MODEL_NAMES",
    "LeNet5",
    "LogisticRegression",
    "MLP",
    "ResNet18",
    "ResNet20",
    "VGGSmall",
    "build_model",
    "model_factory",
    "required_image_size",
]

MODEL_NAMES: tuple[str, ...] = ("logreg", "mlp", "lenet5", "vgg", "resnet20", "resnet18")

_LENET_IMAGE_SIZES = (28, 32)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``[B, *] -> flatten -> [B, num_classes]``."""

    def __init__(self, in_features: int, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, 1))


class MLP(nn.Module):
    """Fully connected ReLU network: ``[B, *] -> flatten -> [B, num_classes]``.

    ``MLP(784, (256, 256), 10)`` is the 784-256-256-10 benchmark model (269,322 params).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and average pooling: ``[B, C, S, S] -> [B, num_classes]``, S in {28, 32}.

    LeCun et al. 1998. It is not the MNIST network of Frankle et al. 2020 (the fully connected
    LeNet-300-100, of which :class:`MLP` is the analogue here); with SGD lr 0.05, momentum 0.9 it
    behaves like their high-learning-rate networks (copies become linearly connected only when spawned
    after some training), and on the built-in digits the barrier at small k1 depends strongly on the seed.
    61,706 parameters for ``LeNet5(1, 10, 28)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        checks.choice("LeNet5: image_size", image_size, _LENET_IMAGE_SIZES)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGGSmall(nn.Module):
    """Reduced two-block VGG for 32x32 inputs: ``[B, C, 32, 32] -> [B, num_classes]``.

    Simonyan & Zisserman 2015, shrunk to ~0.86M parameters; hidden width 204 gives
    exactly 857,230 parameters for ``VGGSmall(3, 10)``.
    """

    hidden = 204

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(64 * 8 * 8, self.hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(self.hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual; 1x1 conv+BN projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class _CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem conv+BN, BasicBlock stages, global average pool, fc."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks_per_stage: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


class ResNet20(_CifarResNet):
    """ResNet-20 for CIFAR: ``[B, C, H, W] -> [B, num_classes]``; 3 stages x 3 BasicBlocks.

    He et al. 2016 (CIFAR variant, projection shortcuts / option B); widths
    ``width``/2x/4x, 272,474 parameters for ``ResNet20(3, 10, 16)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__(in_channels, num_classes, (width, 2 * width, 4 * width), 3)


class ResNet18(_CifarResNet):
    """ResNet-18, CIFAR-style (3x3 stem, no max pool): ``[B, C, H, W] -> [B, num_classes]``.

    He et al. 2016; 4 stages 64/128/256/512 x 2 BasicBlocks, 11,173,962 parameters
    for ``ResNet18(3, 10)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(in_channels, num_classes, (64, 128, 256, 512), 2)


def _check_name(name: str) -> None:
    checks.choice("model", name, MODEL_NAMES)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for samples of shape ``input_shape`` (e.g. ``(1, 28, 28)`` or ``(64,)``).

    Extra ``kwargs`` go to the model constructor (e.g. ``hidden``/``dropout`` for ``mlp``).
    """
    _check_name(name)
    checks.integer("num_classes", num_classes)
    if name == "logreg":
        return LogisticRegression(math.prod(input_shape), num_classes, **kwargs)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes=num_classes, **kwargs)
    if name == "lenet5":
        return LeNet5(input_shape[0], num_classes, image_size=input_shape[-1], **kwargs)
    if name == "vgg":
        return VGGSmall(input_shape[0], num_classes, **kwargs)
    if name == "resnet20":
        return ResNet20(input_shape[0], num_classes, **kwargs)
    return ResNet18(input_shape[0], num_classes, **kwargs)


def model_factory(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: object) -> Callable[[], nn.Module]:
    """Picklable zero-argument callable that builds a fresh ``build_model(name, ...)`` each call."""
    _check_name(name)
    return functools.partial(build_model, name, tuple(input_shape), num_classes, **kwargs)


def required_image_size(name: str) -> int | None:
    """Square image side the model needs its inputs resized to (28 for ``lenet5``), else None."""
    _check_name(name)
    return 28 if name == "lenet5" else None
