"""MixtureGrowth: carried tiles keep the members' templates and coefficients bit-equal;
every new tile mixes its owner's existing templates with a new coefficient vector
(growth.inits). See growth.methods for the grid and the owners.

A builder's template-mixed twin (torchvision:, timm:) grows the same way; its channels
are laid out as arch.widen's plan copies them, and its other tensors are the members'
along that plan (growth.traced.carried).

Owns `mixture`. Imports growth.grid, growth.inits, growth.traced, mgrow.arch and
mgrow.mixing.
"""

from __future__ import annotations

import torch

from ..arch import is_traced
from ..mixing import MixedLayer, mixed_layers
from . import traced
from .grid import (Job, Result, carried, common, grid, grid_size, head_name, old_block, owner,
                   block_sources)
from .inits import INITS


def mixture(job: Job) -> Result:
    """MixtureGrowth: carried tiles kept, new tiles from existing templates (module doc)."""
    members, skeleton, init = job.members, job.skeleton, job.init
    states = [b.tensors for b in members]
    before = grid(members[0])  # > 1: growing a grown net again, alone
    m = len(members) if before == 1 else members[0].manifest.mixing.members
    head = head_name(skeleton)
    if is_traced(job.arch.name):  # a builder's twin: channels laid out as its plan copies
        srcs, out = None, traced.carried(members, grid_size(skeleton), skeleton)
    else:
        srcs = block_sources(grid_size(skeleton), m, before)
        out = common(states, skeleton, srcs, head)
    for n in range(len(skeleton.banks)):
        out[f"banks.{n}"] = torch.cat([s[f"banks.{n}"] for s in states])  # (m, t, o, i, *k)
    layers = mixed_layers(skeleton)

    def kept(name: str, layer: MixedLayer, r: int, c: int) -> torch.Tensor | None:
        """Return the carried coefficient vector of tile (r, c), or None for a new tile."""
        if before > 1:
            g_out, g_in = states[0][f"{name}.alpha"].shape[:2]
            return states[0][f"{name}.alpha"][r, c].double() if r < g_out and c < g_in \
                else None
        j = carried(layer.role, r, c, m, layer.grid)
        return None if j is None else states[j][f"{name}.alpha"][0, 0].double()

    def source(name: str, layer: MixedLayer, r: int, c: int) -> torch.Tensor:
        """Return the owner's own coefficients at this layer (what `copy` copies)."""
        if before > 1:  # an old tile of the same owner
            a = states[0][f"{name}.alpha"]
            return a[old_block(r, a.shape[0], m), old_block(c, a.shape[1], m)].double()
        return states[owner(layer, r, c, m)][f"{name}.alpha"][0, 0].double()

    alphas = {name: torch.zeros(layer.alpha.shape, dtype=torch.float64)
              for name, layer in layers.items()}  # (g_out, g_in, t)
    todo: dict[tuple[int, int], list[tuple[str, int, int]]] = {}  # (bank, owner) -> tiles
    existing: dict[tuple[int, int], list[torch.Tensor]] = {}  # (bank, owner) -> carried
    for name, layer in layers.items():
        g_out, g_in = layer.grid
        for r in range(g_out):
            for c in range(g_in):
                key = (layer.bank_index, owner(layer, r, c, m))
                vec = kept(name, layer, r, c)
                if vec is not None:
                    alphas[name][r, c] = vec
                    existing.setdefault(key, []).append(vec)
                else:
                    todo.setdefault(key, []).append((name, r, c))
    notes = []
    for (n, j), tiles in sorted(todo.items()):
        names = [name for name, layer in layers.items() if layer.bank_index == n]
        sources = torch.stack([source(name, layers[name], r, c) for name, r, c in tiles])
        kwargs = {"noise": job.noise} if init == "copy" else {}
        new, note = INITS[init](torch.stack(existing[(n, j)]), sources, job.gen, **kwargs)
        if note:
            notes.append(f"bank {n} (member {j}, layers {', '.join(names)}): {note}")
        for (name, r, c), vec in zip(tiles, new):
            alphas[name][r, c] = vec
    for name, a in alphas.items():
        if name == head and before == 1:
            a = a / m  # the classifier averages the members: exact for m = 1, 2 (powers of 2)
        out[f"{name}.alpha"] = a.float()
    return Result(out, mixed=True, notes=notes, sources=srcs)
