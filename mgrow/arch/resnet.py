"""ResNet-18/34/50 in torchvision's layout and key names, with a width multiplier.

At width 1.0 a torchvision `resnet18/34/50` state_dict maps onto the plain network 1:1.

Imports mgrow.manifest, mgrow.mixing (Builder) and arch.scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import ArchSpec
from ..mixing import Builder
from .scale import channels


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, make: Builder, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.downsample = _downsample(make, cin, cout, stride)
        self.conv1 = make.conv(cin, planes, 3, stride, 1)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3, 1, 1)
        self.bn2 = make.norm(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, make: Builder, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.downsample = _downsample(make, cin, cout, stride)
        self.conv1 = make.conv(cin, planes, 1)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3, stride, 1)
        self.bn2 = make.norm(planes)
        self.conv3 = make.conv(planes, cout, 1)
        self.bn3 = make.norm(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(make: Builder, cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(make.conv(cin, cout, 1, stride), make.norm(cout))


class ResNet(nn.Module):
    def __init__(self, spec: ArchSpec, make: Builder, block: type, layers: tuple[int, ...]):
        super().__init__()
        stem = channels(64, spec.width)
        self.conv1 = make.conv(spec.in_channels, stem, 7, 2, 3, role="stem")
        self.bn1 = make.norm(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem
        for s, n in enumerate(layers):
            planes = channels(64 * 2**s, spec.width)
            blocks = []
            for b in range(n):
                blocks.append(block(make, cin, planes, 2 if s and not b else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = make.linear(cin, spec.num_classes, role="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(spec: ArchSpec, make: Builder, kind: str, layers: tuple[int, ...]) -> nn.Module:
    return ResNet(spec, make, BasicBlock if kind == "basic" else Bottleneck, layers)
