"""What the data-driven growth methods (GradMax, Firefly) share: the channel *groups* of a
plain network, the wide net they fill in, and the growth step's batches.

A group is one channel space: the output channels of its *writers* (conv or linear layers)
as its *readers* (conv or linear layers) see them, through channel-wise operations only
(BatchNorm, ReLU, additions; a global average pool and flatten before a linear reader).
Found by walking the autograd graph of one forward pass back from every layer's input.
A WRN block's inner width is a group of one writer (conv1) and one reader (conv2), the
*pairs* growneuron grows; a residual stream is one group of many: its writers are the stem
or the stage's first shortcut and every block's conv2, its readers every block's conv1,
the next stage's first conv1 and shortcut, and the classifier (through BN, ReLU and the
global pool). A new channel of a group has its *fan-in* in every writer (its row, over the
writer's inputs) and its *fan-out* in every reader (its column, in the reader's rows): a
channel read by several layers has its fan-out over all of them.

A group has a gradient *statistic* (`stat`) when every path from a writer to a reader keeps
the spatial layout (no max pooling, no flattening of a spatial map); `normed` when a
BatchNorm lies on some path. A path through an operation not known to keep channels
(anything but the ones named in KINDS) joins nothing.

The wide net: A's layers in the top-left tiles, every new row and column zero, norms and
biases from growth.grid.common, new units' biases zero (growneuron's `new_bias='zeros'`).
The methods then fill new units' rows (fan-in, over A's input channels) and A's rows of
new columns (fan-out into A's units); a new unit's weights from other new units stay 0.

Owns `Group`, `find_groups`, `Wide`, `widen`, `Steps` and the tensor helpers.
Imports mgrow.arch, mgrow.data (batches), mgrow.mixing and growth.grid.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import build
from ..data import batches
from ..mixing import mixed_layers
from .grid import Job

Norm = nn.modules.batchnorm._BatchNorm
KINDS = {"ReluBackward0": "relu", "AddBackward0": "add", "MeanBackward1": "pool",
         "AdaptiveAvgPool2DBackward0": "pool", "ViewBackward0": "view",
         "ReshapeAliasBackward0": "view", "UnsafeViewBackward0": "view",
         # channel-wise, but not the spatial identity: the group has no statistic
         "MaxPool2DWithIndicesBackward0": "spatial", "AvgPool2DBackward0": "spatial",
         "NativeDropoutBackward0": "spatial"}
SCALE = 0.5  # new weights' norm / A's mean norm (growneuron's CIFAR config: updater.scale)


@dataclass
class Group:
    """One channel space: its writers, its readers, and the paths between them."""

    writers: list[str]  # network order
    readers: list[str]
    reach: dict[str, list[str]]  # reader -> the writers whose output it sees
    stat: bool = True  # every path channel-wise and spatially the identity
    normed: bool = False  # a BatchNorm on some path


def find_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[Group]:
    """Return the channel groups of a plain `model` (one forward pass of 2 blank inputs)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, Norm)}
    made: dict = {}  # grad_fn of an output -> ("writer" | "bn", module name)
    entry: dict[str, object] = {}

    def hook(kind: str, name: str) -> Callable:
        def record(mod, inputs, output):
            made[output.grad_fn] = (kind, name)
            if kind == "writer" and inputs[0].grad_fn is not None:
                entry[name] = inputs[0].grad_fn
        return record

    handles = [m.register_forward_hook(hook("writer", n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(hook("bn", n)) for n, m in norms.items()]
    was = model.training
    try:
        with torch.enable_grad():
            model.eval()(torch.zeros(2, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    found = []  # (reader, writers it sees, flags)
    for reader, start in entry.items():
        flags = {"ok": True, "bn": False, "pool": False}
        writers: set[str] = set()
        seen, todo = {start}, [start]
        while todo:
            node = todo.pop()
            kind, name = made.get(node, (KINDS.get(node.name()), None))
            if kind == "writer":
                writers.add(name)
                continue
            if kind is None:  # not known to keep the channels: no group through it
                flags["ok"] = False
                continue
            flags["bn"] |= kind == "bn"
            flags["pool"] |= kind in ("pool", "view")
            flags["ok"] &= kind != "spatial"
            for n, _ in node.next_functions:
                if n is not None and n not in seen and \
                        n.name() != "torch::autograd::AccumulateGrad":
                    seen.add(n)
                    todo.append(n)
        if writers:
            found.append((reader, sorted(writers, key=list(layers).index), flags))
    return _merge(found, layers)


def _merge(found: list, layers: dict[str, nn.Module]) -> list[Group]:
    """Return the groups: readers that see a common writer read one channel space."""
    groups: list[Group] = []
    order = list(layers).index
    for reader, writers, flags in found:
        hit = [g for g in groups if set(g.writers) & set(writers)]
        group = Group(sorted(set(writers).union(*[g.writers for g in hit]), key=order), [], {})
        for g in hit:
            groups.remove(g)
            group.readers += g.readers
            group.reach.update(g.reach)
            group.stat &= g.stat
            group.normed |= g.normed
        layer = layers[reader]
        channels = {layers[w].weight.shape[0] for w in group.writers}
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        spatial = isinstance(layer, nn.Conv2d) and not flags["pool"]
        pooled = isinstance(layer, nn.Linear) and (flags["pool"] or all(
            isinstance(layers[w], nn.Linear) for w in writers))
        group.readers = sorted(group.readers + [reader], key=order)
        group.reach[reader] = writers
        group.stat &= flags["ok"] and (spatial or pooled) and channels == {width}
        group.normed |= flags["bn"]
        groups.append(group)
    return sorted(groups, key=lambda g: order(g.writers[0]))


@dataclass
class Wide:
    """The plain wide net under construction and the split of every layer's units."""

    model: nn.Module  # plain, g times wider
    old: dict[str, tuple[int, int]]  # layer -> (A's output units, A's input channels)
    groups: list[Group]

    def weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight

    def new(self, group: Group) -> int:
        """Return how many new channels the group has."""
        w = group.writers[0]
        return self.weight(w).shape[0] - self.old[w][0]

    def fan_in(self, group: Group) -> list[torch.Tensor]:
        """Return A's fan-in of the group's channels: each writer's (o, i_old, *k) rows."""
        return [self.weight(w)[:self.old[w][0], :self.old[w][1]] for w in group.writers]

    def fan_out(self, group: Group) -> list[torch.Tensor]:
        """Return A's fan-out of the group's channels: each reader's (o_r, o, *k) columns
        (a linear reader of a flattened map: (o_r, o, positions))."""
        o = self.old[group.writers[0]][0]
        return [self.weight(r)[:self.old[r][0], :o * self.spread(group, r)].reshape(
            self.old[r][0], o, -1, *self.weight(r).shape[2:]).squeeze(2)
            for r in group.readers]

    def spread(self, group: Group, reader: str) -> int:
        """Return how many input columns of `reader` one channel of the group has."""
        return self.old[reader][1] // self.old[group.writers[0]][0]


def place(wide: Wide, g: Group, fan_in: torch.Tensor, fan_out: torch.Tensor | None) -> None:
    """Write new channels' fan-in (n, writer dims) into the writers' new rows (A's input
    channels) and their fan-out (n, reader dims; None: 0) into the readers' A rows."""
    o, n = wide.old[g.writers[0]][0], len(fan_in)
    with torch.no_grad():
        for w, rows in zip(g.writers, split(fan_in.detach(), wide.fan_in(g), 0)):
            wide.weight(w)[o:o + n, :wide.old[w][1]] = rows
        for r, cols in zip(g.readers, split(fan_out.detach(), wide.fan_out(g), 1)
                           if fan_out is not None else []):
            s, w = wide.spread(g, r), wide.weight(r)
            w[:wide.old[r][0], o * s:(o + n) * s] = cols.reshape(len(cols), n * s,
                                                                 *w.shape[2:])


def fill_unread(wide: Wide, gen: torch.Generator) -> int:
    """Give the new units of layers in no group (read by no layer) random fan-in at SCALE x
    A's mean norm, zero fan-out; return how many."""
    grouped, count = {w for g in wide.groups for w in g.writers}, 0
    with torch.no_grad():
        for name, (o, i) in wide.old.items():
            w = wide.weight(name)
            if name not in grouped and len(w) > o:
                a = w[:o, :i].reshape(o, -1)
                w[o:, :i] = (uniform_rows(len(w) - o, a.shape[1], gen)
                             * (SCALE * mean_norm(a))).view_as(w[o:, :i])
                count += len(w) - o
    return count


def widen(job: Job, state: dict[str, torch.Tensor], common: dict[str, torch.Tensor]) -> Wide:
    """Return the wide plain net: A's tiles, every new row and column 0, new biases 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=job.gen)))
        model = build(job.arch)
    tensors, old = dict(common), {}
    for name, layer in mixed_layers(job.skeleton).items():
        a = state[f"{name}.weight"]
        o, i = a.shape[:2]
        w = torch.zeros(layer.grid[0] * o, layer.grid[1] * i, *a.shape[2:])
        w[:o, :i] = a
        tensors[f"{name}.weight"] = w
        if f"{name}.bias" in tensors and layer.grid[0] > 1:
            tensors[f"{name}.bias"] = tensors[f"{name}.bias"].clone()
            tensors[f"{name}.bias"][o:] = 0
        old[name] = (o, i)
    model.load_state_dict(tensors, strict=True)
    shape = (job.arch.in_channels, job.arch.input_size, job.arch.input_size)
    return Wide(model, old, find_groups(model, shape))


def concat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Return the parts flattened to (units, dims) along unit axis `dim` and concatenated."""
    return torch.cat([p.movedim(dim, 0).reshape(p.shape[dim], -1) for p in parts], 1)


def split(rows: torch.Tensor, like: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Invert `concat`: (n, dims) rows into tensors shaped like `like` with n units on `dim`."""
    out, at = [], 0
    for p in like:
        shape = list(p.movedim(dim, 0).shape)
        size = math.prod(shape[1:])
        shape[0] = len(rows)
        out.append(rows[:, at:at + size].reshape(shape).movedim(0, dim))
        at += size
    return out


def unit(rows: torch.Tensor) -> torch.Tensor:
    """Return the rows (n, ...) scaled to unit norm."""
    flat = rows.reshape(len(rows), -1) if len(rows) else rows
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).view_as(rows)


def mean_norm(rows: torch.Tensor) -> float:
    """Return the mean l2 norm of the rows (n, dims) (growneuron's `mean_norm`)."""
    return float(rows.detach().norm(dim=1).mean()) if len(rows) else 0.0


def uniform_rows(n: int, dims: int, gen: torch.Generator) -> torch.Tensor:
    """Return n random unit rows with uniform [0, 1) entries (growneuron's 'random')."""
    return unit(torch.rand(n, dims, generator=gen))


def probe(model: nn.Module) -> nn.Module:
    """Return a copy of `model` in training mode whose BN statistics never move and whose
    parameters need no gradient (the growth step's loss is the training loss)."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, Norm):
            m.momentum = 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def patches(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Return a writer's input patches laid out as its output: (B, dims, H, W) or (B, in)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(len(x), -1)
    p = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    size = [(s + 2 * pd - d * (k - 1) - 1) // st + 1 for s, pd, d, k, st in zip(
        x.shape[2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride)]
    return p.view(len(x), -1, *size)


def reader_gradient(a: torch.Tensor, delta: torch.Tensor, reader: nn.Module) -> torch.Tensor:
    """Return sum over the batch of reader-output gradient `delta` x reader input `a`: the
    loss gradient of the reader's weight columns for a's channels, (dims of a, out, *k)
    flattened to (channels or dims of a, out * k * k). A 4-d `a` before a linear reader is
    global-average-pooled first."""
    if isinstance(reader, nn.Linear):
        a = a.mean((2, 3)) if a.dim() == 4 else a
        return a.T @ delta
    t = torch.nn.grad.conv2d_weight(a, (delta.shape[1], a.shape[1], *reader.kernel_size),
                                    delta, reader.stride, reader.padding, reader.dilation)
    return t.transpose(0, 1).reshape(a.shape[1], -1)


def _batches(data, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield training batches forever (epoch after epoch, the engine's order)."""
    epoch = 0
    while True:
        yield from batches(data, True, batch_size, epoch, seed)
        epoch += 1


@dataclass
class Steps:
    """The growth step's `steps` training batches, drawn again on every pass over them (the
    same batches: the order is the seed's), so that they are never all in memory at once."""

    data: object
    batch_size: int
    seed: int
    steps: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(_batches(self.data, self.batch_size, self.seed), self.steps)
