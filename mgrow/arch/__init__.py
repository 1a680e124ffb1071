"""Architecture registry: one factory builds every network, plain or template-mixed.

Names: `wrn-D-K` (WideResNet for small inputs), `resnet18`, `resnet34`, `resnet50`
(torchvision layout and key names), `vgg11_bn` (torchvision layout), and any builder's
network, `torchvision:NAME` or `timm:NAME` (arch.zoo; template-mixed: arch.twins). `ArchSpec.width`
multiplies every channel count, so growing by g is `spec.widened(g)`; `ArchSpec.depths`
sets the blocks of each stage of a WRN, ResNet or VGG (deepening: `deepened`, `units`).

Owns `build`, `empty`, `check_name` and the stages of the families (`depths`, `deepened`, `units`,
`block_paths`, `same_blocks`, `stages`); the families (wrn, resnet, vgg) build through
mgrow.mixing's Builder and scale channels by arch.scale; builders' networks come from
arch.zoo (grown by arch.widen, deepened by arch.stages). Imports mgrow.errors, limits,
manifest, mixing and footprint (every network is sized on the meta device before it is
built).
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
from .vgg import DEPTHS as VGG_DEPTHS
from .vgg import vgg11_bn
from .wrn import wrn
from .zoo import build_traced, check_options, check_traced, is_traced

__all__ = ["NAMES", "block_paths", "build", "channels", "check_name", "check_options",
           "deepened", "depths",
           "empty", "is_traced", "same_blocks", "stages", "units"]

_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3))}
_FIXED: dict[str, Callable[[ArchSpec, Builder], nn.Module]] = {
    **{name: (lambda s, b, kind=kind: resnet(s, b, kind, depths(s)))
       for name, (kind, _) in _RESNETS.items()},
    "vgg11_bn": lambda s, b: vgg11_bn(s, b, depths(s)),
}
_WRN = re.compile(r"wrn-(\d{1,6})-(\d{1,6})$")
NAMES = ("wrn-D-K", *_FIXED)


def depths(arch: ArchSpec) -> tuple[int, ...]:
    """Return the blocks of each stage of a WRN or ResNet (residual blocks) or VGG (conv, BN,
    ReLU), `arch.depths` where `mgrow deepen` set them; raise a one-line MgrowError for a
    builder's network."""
    m = _WRN.match(arch.name)
    if m:
        own = ((int(m.group(1)) - 4) // 6,) * 3
    elif arch.name in _RESNETS:
        own = _RESNETS[arch.name][1]
    elif arch.name == "vgg11_bn":
        own = VGG_DEPTHS
    else:
        raise MgrowError(f"{arch.name}: a builder's network, whose stages are found by "
                         "looking (mgrow.arch.stages), not known by name")
    if arch.depths is None:
        return own
    if len(arch.depths) != len(own):  # 2 layers a WRN block, 3 a bottleneck, 1 a VGG one
        raise MgrowError(f"{arch.name}: depths {list(arch.depths)} need one count per stage "
                         f"({len(own)})")
    layers = 2 * sum(arch.depths) + 4  # WRN's count; a bottleneck has 3 a block: bounded too
    if layers > MAX_DEPTH:
        raise MgrowError(f"{arch.name}: {layers} layers exceed the {MAX_DEPTH} mgrow builds")
    return arch.depths


def deepened(arch: ArchSpec, new: tuple[int, ...]) -> ArchSpec:
    """Return `arch` with `new` blocks per stage, named canonically: a WRN with equal
    stages is wrn-(6n+4)-K, a ResNet whose stages match another registry name takes it."""
    m = _WRN.match(arch.name)
    if m and len(set(new)) == 1:
        return arch.model_copy(update={"name": f"wrn-{6 * new[0] + 4}-{m.group(2)}",
                                       "depths": None})
    if arch.name in _RESNETS:
        kind = _RESNETS[arch.name][0]
        for name, own in _RESNETS.items():
            if own == (kind, tuple(new)):
                return arch.model_copy(update={"name": name, "depths": None})
    spec = arch.model_copy(update={"depths": tuple(new)})
    depths(spec)  # checked: one count per stage, within the layer limit
    return spec


def units(arch: ArchSpec) -> list[list[list[str]]]:
    """Return the module paths of every block, stage by stage: one path for a residual
    block (WRN, ResNet), three for VGG's conv, BN and ReLU."""
    out, k = [], 0
    for s, n in enumerate(depths(arch)):
        if _WRN.match(arch.name):  # one flat Sequential of blocks
            out.append([[f"blocks.{k + b}"] for b in range(n)])
            k += n
        elif arch.name == "vgg11_bn":  # one flat Sequential: 3 modules a conv, a pool a stage
            out.append([[f"features.{k + 3 * b + j}" for j in range(3)] for b in range(n)])
            k += 3 * n + 1
        else:
            out.append([[f"layer{s + 1}.{b}"] for b in range(n)])
    return out


def block_paths(arch: ArchSpec) -> list[list[str]]:
    """Return the path of every block (VGG: of its conv), stage by stage."""
    return [[unit[0] for unit in stage] for stage in units(arch)]


def same_blocks(a: ArchSpec, b: ArchSpec) -> dict[str, str]:
    """Return B's path of each module of A's blocks (block j of stage s in both) where the
    two differ: a net and its deepened copy pair block by block ({} unless both are of one
    of mgrow's families, with as many stages)."""
    try:
        ua, ub = units(a), units(b)
    except MgrowError:
        return {}
    if len(ua) != len(ub) or a.name.split("-")[0] != b.name.split("-")[0]:
        return {}
    return {x: y for sa, sb in zip(ua, ub) for xa, xb in zip(sa, sb) for x, y in zip(xa, xb)
            if x != y}


def stages(arch: ArchSpec) -> list[tuple[str, int]]:
    """Return the stages `mgrow deepen --stage N` counts, in order: (where, blocks); [] for
    a network without any (a builder's net is built on the meta device to find them)."""
    if is_traced(arch.name):
        from .stages import find_stages
        return [(path, len(m)) for path, m in find_stages(build(arch, meta=True))]
    try:
        return [(f"{paths[0]}..{paths[-1]}" if len(paths) > 1 else paths[0], len(paths))
                for paths in block_paths(arch)]
    except MgrowError:
        return []


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
    if arch.depths is not None and not is_traced(arch.name):
        depths(arch)  # one count per stage of a family (a builder's: arch.stages checks)
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


def empty(arch: ArchSpec, mixing: MixingSpec | None = None,
          shapes: nn.Module | None = None) -> nn.Module:
    """Return the network on the CPU, ready for a state_dict: parameters and persistent
    buffers uninitialised, and the buffers a state_dict does not hold (non-persistent: timm's
    Swin and BEiT relative position index) the builder's own values, so the network is
    built for real where it has any (`to_empty` would leave them garbage). `shapes`: the
    meta network, if already built."""
    shapes = build(arch, mixing, meta=True) if shapes is None else shapes
    kept = shapes.state_dict()
    if all(name in kept for name, _ in shapes.named_buffers()):
        return shapes.to_empty(device="cpu")
    return build(arch, mixing)


def _construct(arch: ArchSpec, mixing: MixingSpec | None, seed: int, meta: bool) -> nn.Module:
    """Return the network, on the meta device (uninitialised) or initialised on the CPU."""
    if is_traced(arch.name):
        return build_traced(arch, seed, meta, mixing)
    if arch.options:
        raise MgrowError(f"{arch.name}: builder options are for torchvision:/timm: networks")
    builder = Builder(mixing)
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(seed)
        m = _WRN.match(arch.name)
        if m:
            model = wrn(arch, builder, depths(arch), int(m.group(2)))
        else:
            model = _FIXED[arch.name](arch, builder)
        return builder.finalize(model, init=not meta)

