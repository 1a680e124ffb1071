"""VGG-11 with BatchNorm in torchvision's layout and key names, with a width multiplier.

At width 1.0 a torchvision `vgg11_bn` state_dict maps onto the plain network 1:1. The
classifier keeps torchvision's 7x7 adaptive pooling, so it works for any input size.
`depths` gives the convs of each of the five stages (1, 1, 2, 2, 2; `mgrow deepen` adds).

Imports mgrow.manifest, mgrow.mixing (Builder) and arch.scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import ArchSpec
from ..mixing import Builder
from .scale import channels

WIDTHS = (64, 128, 256, 512, 512)  # of the five stages; torchvision's config "A" has
DEPTHS = (1, 1, 2, 2, 2)  # these many convs in each


class VGG(nn.Module):
    def __init__(self, spec: ArchSpec, make: Builder, depths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = spec.in_channels
        for v in [x for w, n in zip(WIDTHS, depths) for x in (*(w,) * n, "M")]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = channels(v, spec.width)
            role = "stem" if cin == spec.in_channels and not layers else "inner"
            layers += [make.conv(cin, cout, 3, 1, 1, bias=True, role=role), make.norm(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = channels(4096, spec.width)
        self.classifier = nn.Sequential(
            make.linear(cin * 49, hidden), nn.ReLU(True), nn.Dropout(),
            make.linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            make.linear(hidden, spec.num_classes, role="head"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(spec: ArchSpec, make: Builder, depths: tuple[int, ...] = DEPTHS) -> nn.Module:
    return VGG(spec, make, depths)
