"""The geometry of a grown net: which member's layer each tile carries, which member owns
each tile and channel block, and the norm layers and biases assembled from the members.

Channel block j of every grown layer belongs to member j mod m; a grown net grown again
keeps its blocks, and new block j starts from old block `old_block(j)`. Also the types
every method shares: `Job` (what a method is given) and `Result` (what it returns).

Owns `carried`, `owner`, `grid`, `old_block`, `common`, `tile_weights`, `Job`, `Result`.
Imports mgrow.bundle, mgrow.manifest, mgrow.mixing (and torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bundle import Bundle
from ..data import Data
from ..manifest import ArchSpec, DatasetSpec, MixingSpec, Phase
from ..mixing import MixedLayer, mixed_layers, plain_state_dict


def carried(role: str, r: int, c: int, m: int, grid: tuple[int, int] = (0, 0)) -> int | None:
    """Return the member whose own layer tile (r, c) is, or None for a new tile. A layer of
    one tile column (the stem; a builder's depthwise convolution) carries tile (r, 0) from
    member r, one of a single row (the classifier) tile (0, c) from member c."""
    if role == "stem" or (role == "inner" and grid[1] == 1):
        return r if r < m else None
    if role == "head" or (role == "inner" and grid[0] == 1):
        return c if c < m else None
    return r if r == c and r < m else None


def owner(layer: MixedLayer, r: int, c: int, m: int) -> int:
    """Return the member whose templates tile (r, c) is generated from."""
    return (r if layer.axis == "row" else c) % m


@dataclass
class Job:
    """Everything a growth method needs: members, the grown layout, options, data."""

    members: list[Bundle]
    skeleton: torch.nn.Module  # the grown net's mixed layout, shapes only (tiles, grids)
    arch: ArchSpec  # the grown architecture
    mixing: MixingSpec  # the grown net's mixing spec (used by `mixture`)
    init: str
    noise: float
    gen: torch.Generator
    seed: int
    # the data-driven methods' training data, or a function loading it once options are checked
    data: Data | Callable[[], Data] | None = None
    batch_size: int = 64
    steps: int = 8


@dataclass
class Result:
    """A method's output: tensors, whether they are template-mixed, notes, a ledger row."""

    tensors: dict[str, torch.Tensor]
    mixed: bool
    notes: list[str] = field(default_factory=list)
    phase: Phase | None = None  # the growth step's own training FLOPs (data methods)
    sources: Sources | None = None  # where each channel block's norms came from (common)
    data: DatasetSpec | None = None  # the data the growth step read


def grid(bundle: Bundle) -> int:
    """Return the bundle's tile grid size: 1 for an ungrown (or plain) net."""
    mix = bundle.manifest.mixing
    return mix.factor if mix is not None else 1


def plain_state(bundle: Bundle) -> dict[str, torch.Tensor]:
    if bundle.manifest.mixing is None:
        return bundle.tensors
    return plain_state_dict(bundle.model())


def blocks(parts: list[torch.Tensor], g: int) -> torch.Tensor:
    """Return member tensors concatenated into g channel blocks, block j from member j mod m."""
    return torch.cat([parts[j % len(parts)] for j in range(g)])


def old_block(j: int, before: int, m: int) -> int:
    """Return which of a grown net's `before` blocks (owned in turn by its m members) block j
    of the regrown net starts from: itself if carried, else one of the same owner j mod m,
    as in a first fuse (the first `before` cut to a multiple of m, repeated: a 3-block grid
    of 2 members gives 0 1 2 | 1 0 1 ...)."""
    if j < before:
        return j
    cycle = before - before % m if before >= m else before
    return j % cycle


Sources = list[tuple[int, int]]  # per grown channel block: (member, block of that member)


def block_sources(g: int, m: int, before: int = 1) -> Sources:
    """Return where each of a grown net's g channel blocks is carried from, as (member,
    block of that member): member b mod m's whole width for members grown as they are
    (every method's first growth, and the plain methods, which treat a grown net as one
    member of its own width); for a grown net of `before` blocks owned in turn by m members
    regrown by mixture, its block old_block(b, before, m)."""
    if before == 1:
        return [(b % m, 0) for b in range(g)]
    return [(0, old_block(b, before, m)) for b in range(g)]


def common(states: list[dict[str, torch.Tensor]], skeleton: torch.nn.Module, srcs: Sources,
           head: str) -> dict[str, torch.Tensor]:
    """Return the grown norm layers and biases, channel block b from `srcs[b]` (see
    block_sources), and the classifier's bias as the members' mean. The same map is the
    Result's `sources`: the BN correction fits each block against where it came from."""
    out = {}
    layers = mixed_layers(skeleton)
    for key, ref in skeleton.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod == "banks" or (mod in layers and leaf in ("alpha", "weight")):
            continue
        parts = [s[key] for s in states]
        if key == f"{head}.bias":
            out[key] = torch.stack(parts).mean(0)
        elif parts[0].dim() == 0:  # num_batches_tracked
            out[key] = parts[0].clone()
        else:
            size = ref.shape[0] // len(srcs)  # channels of one block
            out[key] = torch.cat([parts[i].reshape(-1, size)[k] for i, k in srcs])
        assert out[key].shape == ref.shape, key
    return out


def head_name(skeleton: torch.nn.Module) -> str:
    return next(n for n, layer in mixed_layers(skeleton).items() if layer.role == "head")


def grid_size(skeleton: torch.nn.Module) -> int:
    return max(max(layer.grid) for layer in mixed_layers(skeleton).values())


def tile_weights(skeleton: torch.nn.Module, states: list[dict[str, torch.Tensor]],
                  fill: Callable[[str, MixedLayer, int, int, torch.Tensor], torch.Tensor],
                  ) -> dict[str, torch.Tensor]:
    """Return plain grown weights: carried tiles from the members, the rest from `fill`."""
    m, out = len(states), {}
    for name, layer in mixed_layers(skeleton).items():
        g_out, g_in = layer.grid
        o, i = layer.tile_shape[:2]
        w = torch.empty(g_out * o, g_in * i, *layer.tile_shape[2:])
        for r in range(g_out):
            for c in range(g_in):
                j = carried(layer.role, r, c, m)
                member = states[j if j is not None else 0][f"{name}.weight"]
                tile = member.clone() if j is not None else fill(name, layer, r, c, member)
                w[r * o:(r + 1) * o, c * i:(c + 1) * i] = tile
        out[f"{name}.weight"] = w / m if layer.role == "head" else w
    return out
