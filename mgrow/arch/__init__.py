"""Architecture registry: one factory builds every network, plain or template-mixed.

Names: `wrn-D-K` (WideResNet for small inputs), `resnet18`, `resnet34`, `resnet50`
(torchvision layout and key names), `vgg11_bn` (torchvision layout), and any builder's
network, `torchvision:NAME` or `timm:NAME` (arch.zoo, plain only). `ArchSpec.width`
multiplies every channel count, so growing by g is `spec.widened(g)`.

Owns `build` and `check_name`; the families (wrn, resnet, vgg) build through mgrow.mixing's
Builder and scale channels by arch.scale; builders' networks come from arch.zoo (grown by
arch.widen). Imports mgrow.errors, limits, manifest, mixing and footprint (every network
is sized on the meta device before it is built).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..errors import MgrowError
from ..footprint import estimate
from ..limits import MAX_DEPTH, MAX_WIDTH, check_memory
from ..manifest import ArchSpec, MixingSpec
from ..mixing import Builder
from .resnet import resnet
from .scale import channels
from .vgg import vgg11_bn
from .wrn import wrn
from .zoo import build_traced, check_traced, is_traced

__all__ = ["NAMES", "build", "channels", "check_name", "is_traced"]

_FIXED: dict[str, Callable[[ArchSpec, Builder], nn.Module]] = {
    "resnet18": lambda s, b: resnet(s, b, "basic", (2, 2, 2, 2)),
    "resnet34": lambda s, b: resnet(s, b, "basic", (3, 4, 6, 3)),
    "resnet50": lambda s, b: resnet(s, b, "bottleneck", (3, 4, 6, 3)),
    "vgg11_bn": vgg11_bn,
}
_WRN = re.compile(r"wrn-(\d{1,6})-(\d{1,6})$")
NAMES = ("wrn-D-K", *_FIXED)


def check_name(name: str) -> str:
    """Return `name` if the registry knows it, else raise a one-line MgrowError."""
    if is_traced(name):
        return check_traced(name)
    m = _WRN.match(name)
    if m and int(m.group(1)) > MAX_DEPTH:  # build work grows with the layer count
        raise MgrowError(f"{name}: depth {int(m.group(1))} exceeds the {MAX_DEPTH} layers "
                         "mgrow builds")
    if m and not 1 <= int(m.group(2)) <= MAX_WIDTH:
        raise MgrowError(f"{name}: widening factor K must lie in 1..{MAX_WIDTH:g}")
    if name in _FIXED or (m and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10):
        return name
    shown = name if len(name) <= 40 else name[:37] + "..."
    raise MgrowError(f"unknown architecture {shown!r}: expected one of {', '.join(NAMES)} "
                     "(WRN depth D = 6n + 4, n >= 1; for example wrn-16-4, wrn-28-10)")


def build(arch: ArchSpec, mixing: MixingSpec | None = None, seed: int = 0,
          meta: bool = False) -> nn.Module:
    """Return a freshly initialised network: plain when `mixing` is None, else template-mixed.

    meta=True: shapes only, on the meta device, no initialisation (free even for large
    nets); `.to_empty(device=...)` then gives uninitialised storage to load weights into.
    Either way the network is first built on the meta device and sized (footprint.estimate:
    parameters, generated weights, one forward pass at batch 1 and the manifest's input
    size), and refused in one line if it cannot take that input or would not fit memory.
    """
    check_name(arch.name)
    if is_traced(arch.name) and mixing is not None:
        raise MgrowError(f"{arch.name}: template-mixed builders' networks are not supported "
                         "yet; use a plain one (--plain)")
    if is_traced(arch.name) and arch.norm != "every":
        raise MgrowError(f"{arch.name}: --norm is a WRN option")
    shapes = _construct(arch, mixing, seed, meta=True)
    what = f"{arch.name} x{arch.width:g}" + (" mixed" if mixing else " plain")
    try:
        size = (1, arch.in_channels, arch.input_size, arch.input_size)
        need = estimate(shapes, size).need(False)
    except MgrowError as e:
        raise MgrowError(f"{what}: {e}") from None
    check_memory(need, what)
    return shapes if meta else _construct(arch, mixing, seed, meta=False)


def _construct(arch: ArchSpec, mixing: MixingSpec | None, seed: int, meta: bool) -> nn.Module:
    """Return the network, on the meta device (uninitialised) or initialised on the CPU."""
    if is_traced(arch.name):
        return build_traced(arch, seed, meta)
    if arch.options:
        raise MgrowError(f"{arch.name}: builder options are for torchvision:/timm: networks")
    builder = Builder(mixing)
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        m = _WRN.match(arch.name)
        if m:
            model = wrn(arch, builder, int(m.group(1)), int(m.group(2)))
        else:
            model = _FIXED[arch.name](arch, builder)
        return builder.finalize(model, init=not meta)

