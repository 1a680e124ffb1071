"""The data-free plain baselines: `random` (new tiles fresh plain weights) and `net2net`
(every unit replicated g times, tiles divided by the input replication, plus noise).

Owns `random_growth` and `net2net`. Imports growth.grid and mgrow.mixing.
"""

from __future__ import annotations

import torch

from ..mixing import MixedLayer, init_weight_, mixed_layers
from .grid import (Job, Result, block_sources, common, grid_size, head_name, plain_state,
                   tile_weights)


def random_growth(job: Job) -> Result:
    """Carried tiles kept; every other tile a fresh plain weight (the wide layer's init)."""
    states, skeleton, gen = [plain_state(b) for b in job.members], job.skeleton, job.gen
    g = grid_size(skeleton)
    fresh: dict[str, torch.Tensor] = {}

    def fill(name: str, layer: MixedLayer, r: int, c: int, member: torch.Tensor) -> torch.Tensor:
        if name not in fresh:  # one draw at the wide layer's shape: its initial distribution
            g_out, g_in = layer.grid
            o, i = layer.tile_shape[:2]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
                fresh[name] = init_weight_(torch.empty(g_out * o, g_in * i,
                                                       *layer.tile_shape[2:]))
        o, i = layer.tile_shape[:2]
        return fresh[name][r * o:(r + 1) * o, c * i:(c + 1) * i]

    srcs = block_sources(g, len(states))
    tensors = {**common(states, skeleton, srcs, head_name(skeleton)),
               **tile_weights(skeleton, states, fill)}
    return Result(tensors, mixed=False, sources=srcs)


def net2net(job: Job) -> Result:
    """Every unit replicated g times, tiles divided by the input replication, + noise."""
    state, skeleton, gen = plain_state(job.members[0]), job.skeleton, job.gen
    g = grid_size(skeleton)

    def fill(name: str, layer: MixedLayer, r: int, c: int, member: torch.Tensor) -> torch.Tensor:
        jitter = torch.randn(member.shape, generator=gen) * (job.noise * float(member.std()))
        return member + jitter

    srcs = block_sources(g, 1)
    out = {**common([state], skeleton, srcs, head_name(skeleton)),
           **tile_weights(skeleton, [state], fill)}
    for name, layer in mixed_layers(skeleton).items():
        if layer.grid[1] > 1:  # inputs replicated g times: divide to keep the function
            out[f"{name}.weight"] = out[f"{name}.weight"] / layer.grid[1]
    return Result(out, mixed=False, sources=srcs)
