"""WideResNet WRN-d-k for small (CIFAR-size) inputs, pre-activation blocks.

norm="every": BN-ReLU before every conv (Zagoruyko & Komodakis). norm="block": BN-ReLU only
before each block, as the paper uses after GradMax; the block's second conv then sees a
plain ReLU.

Imports mgrow.manifest, mgrow.mixing (Builder) and arch.scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..manifest import ArchSpec
from ..mixing import Builder
from .scale import channels


class Block(nn.Module):
    def __init__(self, make: Builder, cin: int, cout: int, stride: int, every: bool) -> None:
        super().__init__()
        self.shortcut = (make.conv(cin, cout, 1, stride) if cin != cout or stride != 1
                         else None)
        self.bn1 = make.norm(cin)
        self.conv1 = make.conv(cin, cout, 3, stride, 1)
        self.bn2 = make.norm(cout) if every else None
        self.conv2 = make.conv(cout, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = torch.relu(self.bn2(y) if self.bn2 is not None else y)
        y = self.conv2(y)
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, spec: ArchSpec, make: Builder, depths: tuple[int, ...], k: int) -> None:
        super().__init__()
        widths = [channels(16, spec.width)] + [channels(16 * k * 2**s, spec.width)
                                               for s in range(3)]
        self.conv1 = make.conv(spec.in_channels, widths[0], 3, 1, 1, role="stem")
        blocks, cin = [], widths[0]
        for s in range(3):
            for b in range(depths[s]):
                blocks.append(Block(make, cin, widths[s + 1], 2 if s and not b else 1,
                                    spec.norm == "every"))
                cin = widths[s + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = make.norm(cin)
        self.fc = make.linear(cin, spec.num_classes, role="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def wrn(spec: ArchSpec, make: Builder, depths: tuple[int, ...], k: int) -> nn.Module:
    """WRN-d-k with `depths` blocks in its three stages ((d - 4) / 6 each unless deepened)."""
    return WideResNet(spec, make, depths, k)
