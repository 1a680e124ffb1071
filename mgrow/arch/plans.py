"""A growth plan, and how any network of its architecture is carried through it.

A `Plan` says, for every tensor of a network, which old index each new index copies along
each grown axis and whether the tensor reads that axis (fan-in) or produces it (fan-out);
mgrow.arch.widen observes one. `apply` grows a network along it by a method: net2net (every
unit copied, a read axis's copies share the old weight), zero (new units' fan-out zero),
random. Shapes only on the meta device.

Owns `Axis`, `Plan`, `apply`, `grow_tensor`, `take`, `interleave`, `METHODS`. Imports
mgrow.errors only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MgrowError

METHODS = ("net2net", "zero", "random")


@dataclass
class Axis:
    """One grown axis of a tensor: new index k copies old index `index[k]`."""

    dim: int
    index: torch.Tensor
    role: str  # "in": the tensor reads this axis (fan-in); "out": it produces it; "chan"


@dataclass
class Plan:
    """How every tensor and layer of a network grows by `factor`."""

    factor: int
    axes: dict[str, list[Axis]] = field(default_factory=dict)  # tensor name -> its axes
    attrs: dict[str, dict[str, object]] = field(default_factory=dict)  # module -> new attrs


def interleave(n: int, g: int) -> torch.Tensor:
    """Return the index of n channels each copied g times in place: new j is old j // g."""
    return torch.arange(n * g) // g


def take(t: torch.Tensor, axes: list[Axis] | tuple[Axis, ...]) -> torch.Tensor:
    """Return `t` with every grown axis taken: new index k is old index `index[k]`."""
    for a in axes:
        t = t.index_select(a.dim, a.index.to(t.device))
    return t


def apply(model: nn.Module, plan: Plan, method: str = "net2net", noise: float = 0.0,
          seed: int = 0) -> nn.Module:
    """Return a grown copy of `model` (same architecture as the plan's) by `method`.

    net2net: every unit duplicated, a read axis's copies share the old weight (1/g each;
    with `noise`, shares perturbed and summing to 1), so the function is kept. zero: old
    units kept in their first copies, new units' fan-in random and fan-out zero (the
    function is kept unless a norm layer averages over grown channels). random: new units'
    fan-in and fan-out random. Works on meta tensors (shapes only) as well.
    """
    if method not in METHODS:
        raise MgrowError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    grown = copy.deepcopy(model)
    modules = dict(grown.named_modules())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, axes in plan.axes.items():
            path, _, attr = name.rpartition(".")
            m = modules[path]
            t = getattr(m, attr)
            new = grow_tensor(t.detach(), axes, method, noise, gen)
            setattr(m, attr, nn.Parameter(new, requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else new)
    for path, values in plan.attrs.items():
        for k, v in values.items():
            setattr(modules[path], k, v)
    return grown


def grow_tensor(t: torch.Tensor, axes: list[Axis], method: str, noise: float,
                gen: torch.Generator | None) -> torch.Tensor:
    """Return `t` grown along `axes` by `method` (see `apply`); `gen` draws the noise and
    the new units' weights (unused by net2net at noise 0)."""
    new = take(t, axes)
    if t.is_meta or not new.is_floating_point():
        return new

    def along(a: Axis, v: torch.Tensor) -> torch.Tensor:  # broadcast over a's dim
        shape = [1] * new.dim()
        shape[a.dim] = len(a.index)
        return v.view(shape)

    def randn() -> torch.Tensor:
        return torch.randn(new.shape, generator=gen, dtype=new.dtype)

    for a in (a for a in axes if a.role == "in"):
        counts = torch.bincount(a.index)
        if method == "net2net":  # copies share the weight; noise moves shares, sum kept
            share = 1 / counts[a.index].to(new.dtype)
            if noise:
                u = torch.randn(len(a.index), generator=gen, dtype=new.dtype) * noise
                mean = torch.zeros(len(counts), dtype=new.dtype).index_add_(0, a.index, u)
                share = share * (1 + u - (mean / counts)[a.index])
            new = new * along(a, share)
        elif method == "zero":
            new = new * along(a, _first(a.index))
        else:  # random: new fan-in columns drawn at the old columns' scale
            new = torch.where(along(a, _first(a.index)), new, randn() * new.std())
    out = [a for a in axes if a.role == "out"]
    if method != "net2net" and out and t.dim() >= 2:  # new units' fan-in: random, at the
        keep = along(out[0], _first(out[0].index))  # old rows' scale
        new = torch.where(keep, new, randn() * t.std().clamp_min(1e-12))
    return new


def _first(index: torch.Tensor) -> torch.Tensor:
    """Return a mask: True where the entry is the first copy of its old index."""
    order = torch.arange(len(index))
    first = torch.full((int(index.max()) + 1,), len(index)).scatter_reduce(
        0, index, order, "amin")
    return first[index] == order
