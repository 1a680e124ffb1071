"""GradMax (Evci et al., "GradMax: Growing Neural Networks using Gradient Information",
ICLR 2022) as google-research/growneuron implements it (`growers.AddGradmax`), on mgrow's
groups (growth.units).

The statistic (growneuron's `get_growth_directions`: the gradient of an auxiliary zero
layer from L's input straight to C's output, its patches `process_conv_aux_gradient`): for
a writer k and a reader j of a group, M_kj = sum over the images and positions of k's
input patches (A's input channels) x j's output gradient (A's units), laid out as (k's
fan-in dims, j's fan-out dims). It is the gradient of the loss with respect to the product
of a new channel's fan-in and fan-out with the path between them taken as the identity
(BN and ReLU linearised), so a new channel with fan-in X and fan-out V has fan-in gradient
M V and fan-out gradient X M. A group's M stacks the blocks of all its writers (rows) and
readers (columns); a block is 0 where the reader does not see the writer. It is measured on
the wide net with every new weight 0, whose old units compute exactly A's function, summed
over the `steps` batches (one forward and backward pass each, in training mode).

Three forms, by the path between a group's writers and readers:

- No BatchNorm between (a WRN's block pairs under `--norm block`, the paper's and
  growneuron's CIFAR configuration, and linear classifier pairs): the published AddGradmax.
  New fan-in near zero: growneuron's 'random' rows (uniform [0, 1) entries, unit norm) at
  `eps` x A's mean fan-in norm (growneuron's `grow_epsilon`; its WRN has a ReLU whose
  gradient at 0 is 1, PyTorch's is 0, so `eps` > 0 opens the gate: positive rows on
  post-ReLU inputs give z > 0, where the path is linear). New fan-out: the top right
  singular vectors of M (largest fan-in gradient), each at SCALE (0.5, growneuron's
  `updater.scale`) x A's mean fan-out norm (`scale_method='mean_norm'`). A's function is
  kept up to `eps`.
- A BatchNorm between (every residual stream: pre-activation BN; block pairs under
  `--norm every`; ResNet and VGG pairs): growneuron gives such a BN identity channels
  (`add_neurons_identity`: mean 0, var 1, gamma 1, beta 0); mgrow carries A's BN
  statistics onto new channels (growth.grid.common, which `--bn-correct` fits against), so
  a near-zero channel would leave its BN at beta - gamma mu / sigma, not 0, and a non-zero
  fan-out would change the function. These take GradMax's outgoing-zero form (growneuron's
  `is_outgoing_zero`, which AddGradmaxOptim solves by optimisation): fan-out 0 and fan-in
  the top left singular vectors of M (largest linearised fan-out gradient), at SCALE x A's
  mean fan-in norm. A's function is kept exactly. A singular vector's sign is arbitrary;
  through BN and ReLU it matters, but the last batch's true gradient picked the sign that
  was better over all 8 batches for 58% of the units (25-100% by group; WRN-16-1 x0.5
  trained 3 epochs on CIFAR-10, both norms), and a choice over all batches needs a second
  pass over the data, so none is made.
- No statistic (a max pool or a spatial flatten on the path): fan-out 0, fan-in random as
  above at SCALE x A's mean norm (growneuron grows heterogeneous pairs at random).

Owns `gradmax`, `statistics`, `singular`. Imports growth.units.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .units import (SCALE, Group, Wide, concat, fill_unread, mean_norm, patches, place,
                    probe, reader_gradient, uniform_rows, unit)

FORMS = ("zero fan-in, gradient fan-out (published)",
         "zero fan-out, gradient fan-in (a BatchNorm between)",
         "zero fan-out, random fan-in (no statistic)")


def statistics(wide: Wide, data_batches) -> dict[int, torch.Tensor]:
    """Return every group's M, summed over the batches, by index into wide.groups (the
    groups with a statistic)."""
    model = probe(wide.model)
    groups = {i: g for i, g in enumerate(wide.groups) if g.stat}
    writers = {w for g in groups.values() for w in g.writers}
    readers = {r for g in groups.values() for r in g.readers}
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Callable:
        def hook(mod, i, o) -> None:
            inputs[name] = i[0][:, :wide.old[name][1]].detach()
        return hook

    def keep_grad(name: str) -> Callable:
        def hook(mod, i, o) -> None:
            o.register_hook(lambda g: grads.__setitem__(name, g[:, :wide.old[name][0]]))
        return hook

    hooks = [model.get_submodule(w).register_forward_hook(keep_input(w)) for w in writers]
    hooks += [model.get_submodule(r).register_forward_hook(keep_grad(r)) for r in readers]
    next(iter(model.parameters())).requires_grad_(True)  # a graph to backpropagate through
    stats: dict[int, torch.Tensor] = {}
    try:
        for x, y in data_batches:
            F.cross_entropy(model(x), y).backward()
            for i, g in groups.items():
                stats[i] = group_statistic(wide, g, model, inputs, grads, stats.get(i))
    finally:
        for h in hooks:
            h.remove()
    return stats


def group_statistic(wide: Wide, g: Group, model: nn.Module, inputs: dict, grads: dict,
                    m: torch.Tensor | None = None) -> torch.Tensor:
    """Return `m` (None: zeros) plus one batch's M of group g: rows the writers' fan-in
    dims, columns the readers' fan-out dims (each writer's patches made once)."""
    rows = [concat([a], 0).shape[1] for a in wide.fan_in(g)]
    cols = [concat([a], 1).shape[1] for a in wide.fan_out(g)]
    m = torch.zeros(sum(rows), sum(cols)) if m is None else m
    r0 = 0
    for w, nr in zip(g.writers, rows):
        p = patches(inputs[w], model.get_submodule(w))
        c0 = 0
        for r, nc in zip(g.readers, cols):
            if w in g.reach[r]:
                m[r0:r0 + nr, c0:c0 + nc] += reader_gradient(p, grads[r],
                                                             model.get_submodule(r))
            c0 += nc
        r0 += nr
    return m


def singular(m: torch.Tensor, n: int, side: str) -> torch.Tensor:
    """Return up to n unit rows: m's top left (side 'in': fan-in) or right ('out': fan-out)
    singular vectors, at most its numerical rank. Found as eigenvectors of the smaller Gram
    matrix (m m^T or m^T m), so the cost follows m's smaller side."""
    m = m.double() if m.numel() <= 50_000_000 else m.float()
    if side == "in":
        m = m.T  # the left vectors of m are the right vectors of m^T
    if m.shape[1] <= m.shape[0]:
        values, vectors = torch.linalg.eigh(m.T @ m)  # ascending
    else:
        values, left = torch.linalg.eigh(m @ m.T)
        vectors = m.T @ left
    rank = int((values > float(values[-1]) * 1e-10).sum()) if float(values[-1]) > 0 else 0
    k = min(n, rank)
    top = vectors[:, len(values) - k:].flip(1).T  # (k, dims), largest first
    return unit(top).float()


def gradmax(wide: Wide, data_batches, job) -> list[str]:
    """Fill every group's new channels by its form (module docstring); return notes."""
    stats = statistics(wide, data_batches)
    eps, notes, counts = job.noise, [], [0, 0, 0]
    with torch.no_grad():
        for i, g in enumerate(wide.groups):
            n = wide.new(g)
            if n == 0:
                continue
            a_in, a_out = concat(wide.fan_in(g), 0), concat(wide.fan_out(g), 1)
            form = 0 if g.stat and not g.normed else 1 if g.stat else 2
            counts[form] += n
            side = ("out", "in", None)[form]
            dims = a_out.shape[1] if form == 0 else a_in.shape[1]
            found = singular(stats[i], n, side) if side else torch.zeros(0, dims)
            if len(found) < n and form < 2:
                notes.append(f"{g.writers[0]}: {n} new channels but {len(found)} gradient "
                             f"directions; {n - len(found)} random")
            rest = uniform_rows(n - len(found), dims, job.gen)
            chosen = unit(torch.cat([found, rest]))
            if form == 0:
                fan_out = chosen * (SCALE * mean_norm(a_out))
                fan_in = uniform_rows(n, a_in.shape[1], job.gen) * (eps * mean_norm(a_in))
                place(wide, g, fan_in, fan_out)
            else:
                place(wide, g, chosen * (SCALE * mean_norm(a_in)), None)
    counts[2] += fill_unread(wide, job.gen)
    total = max(1, sum(counts))
    notes.insert(0, f"gradmax grew {sum(counts)} units: " + ", ".join(
        f"{100 * c / total:.0f}% {f}" for c, f in zip(counts, FORMS)))
    if eps == 0 and counts[0]:
        notes.append("--noise 0: zero fan-in units get no gradient through PyTorch's ReLU "
                     "(0 at 0) and never train; use a small eps")
    return notes
