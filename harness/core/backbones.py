"""Backbones: a feature extractor plus one linear head over every class of the scenario.

- ``mlp``: 784-400-400 (the usual Fashion-MNIST protocol; any flat input size works).
- ``cnn``: two conv-BN-ReLU-pool blocks and a 256-unit layer, for small images.
- ``resnet18-reduced``: the narrow ResNet-18 of GEM/Mammoth (nf=20), 3x3 stem.
- ``resnet18``: the same topology with nf=64; CIFAR-style 3x3 stem for small images, the ImageNet
  7x7/stride-2 stem with max-pool for images of 128 px and more (PACS, OfficeHome).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from harness.core.errors import UserError


class Backbone(nn.Module):
    """``features`` maps inputs to a vector of ``feature_dim``; ``head`` maps it to logits."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (400, 400)) -> Backbone:
    layers: list[nn.Module] = [nn.Flatten()]
    d = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return Backbone(nn.Sequential(*layers), d, num_classes)


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32, hidden: int = 256) -> Backbone:
    c = input_shape[0] if len(input_shape) == 3 else 1
    feats = nn.Sequential(
        _Unflatten(input_shape),
        nn.Conv2d(c, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 4, hidden),
        nn.ReLU(),
    )
    return Backbone(feats, hidden, num_classes)


class _Unflatten(nn.Module):
    """Gives flat inputs (e.g. permuted MNIST vectors) an image shape; images pass through."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(input_shape) == 3:
            self.shape = input_shape
        elif len(input_shape) == 2:
            self.shape = (1, *input_shape)
        else:
            side = math.isqrt(input_shape[0])
            if side * side != input_shape[0]:
                raise UserError(f"the cnn backbone needs image inputs, got shape {input_shape}", "use --set backbone=mlp")
            self.shape = (1, side, side)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """ResNet-18 body with a 3x3 stride-1 stem (CIFAR style), global average pooling."""

    def __init__(self, input_shape: tuple[int, ...], nf: int) -> None:
        super().__init__()
        c = input_shape[0] if len(input_shape) == 3 else 1
        self.unflatten = _Unflatten(input_shape)
        # Small images (CIFAR, Tiny-ImageNet): 3x3 stride-1 stem. Large ones (PACS/OfficeHome at
        # 224 px): the ImageNet stem, 7x7 stride 2 and a 3x3 max-pool, 16x cheaper there.
        large = len(input_shape) == 3 and min(input_shape[1:]) >= 128
        self.conv1 = nn.Conv2d(c, nf, 7, 2, 3, bias=False) if large else nn.Conv2d(c, nf, 3, 1, 1, bias=False)
        self.stem_pool: nn.Module = nn.MaxPool2d(3, 2, 1) if large else nn.Identity()
        self.bn1 = nn.BatchNorm2d(nf)
        layers = []
        in_planes = nf
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, nf * mult, s))
                in_planes = nf * mult
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_pool(torch.relu(self.bn1(self.conv1(self.unflatten(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def resnet18(input_shape: tuple[int, ...], num_classes: int, nf: int = 64) -> Backbone:
    f = ResNetFeatures(input_shape, nf)
    return Backbone(f, f.out_dim, num_classes)


def resnet18_reduced(input_shape: tuple[int, ...], num_classes: int) -> Backbone:
    return resnet18(input_shape, num_classes, nf=20)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18-reduced": resnet18_reduced,
    "resnet18": resnet18,
}


def build_backbone(name: str, input_shape: tuple[int, ...], num_classes: int) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}", f"choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name](tuple(input_shape), num_classes)
