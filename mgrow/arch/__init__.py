"""Architecture registry: one factory builds every network, plain or template-mixed.

Names: `wrn-D-K` (WideResNet for small inputs), `resnet18`, `resnet34`, `resnet50`
(torchvision layout and key names), `vgg11_bn` (torchvision layout). `ArchSpec.width`
multiplies every channel count, so growing by g is `spec.widened(g)`.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from .. import MgrowError
from ..manifest import ArchSpec, MixingSpec
from ..mixing import Builder


def channels(base: int, width: float) -> int:
    """Return a channel count scaled by `width` (at least 1)."""
    return max(1, int(round(base * width)))


from .resnet import resnet  # noqa: E402  (families use `channels` above)
from .vgg import vgg11_bn  # noqa: E402
from .wrn import wrn  # noqa: E402

_FIXED: dict[str, Callable[[ArchSpec, Builder], nn.Module]] = {
    "resnet18": lambda s, b: resnet(s, b, "basic", (2, 2, 2, 2)),
    "resnet34": lambda s, b: resnet(s, b, "basic", (3, 4, 6, 3)),
    "resnet50": lambda s, b: resnet(s, b, "bottleneck", (3, 4, 6, 3)),
    "vgg11_bn": vgg11_bn,
}
_WRN = re.compile(r"wrn-(\d+)-(\d+)$")
NAMES = ("wrn-D-K", *_FIXED)


def check_name(name: str) -> str:
    """Return `name` if the registry knows it, else raise a one-line MgrowError."""
    m = _WRN.match(name)
    if name in _FIXED or (m and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10):
        return name
    raise MgrowError(f"unknown architecture {name!r}: expected one of {', '.join(NAMES)} "
                     "(WRN depth D = 6n + 4, n >= 1; for example wrn-16-4, wrn-28-10)")


def build(arch: ArchSpec, mixing: MixingSpec | None = None, seed: int = 0,
          meta: bool = False) -> nn.Module:
    """Return a freshly initialised network: plain when `mixing` is None, else template-mixed.

    meta=True: shapes only, on the meta device, no initialisation (free even for large
    nets); `.to_empty(device=...)` then gives uninitialised storage to load weights into.
    """
    check_name(arch.name)
    builder = Builder(mixing)
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        m = _WRN.match(arch.name)
        if m:
            model = wrn(arch, builder, int(m.group(1)), int(m.group(2)))
        else:
            model = _FIXED[arch.name](arch, builder)
        return builder.finalize(model, init=not meta)

