"""Firefly (Wu, Liu, Stone, Liu, "Firefly Neural Architecture Descent: a General Approach
for Growing Neural Networks", NeurIPS 2020): its growth of new neurons, with the
optimisation google-research/growneuron's `growers.AddFirefly` runs, on mgrow's groups
(growth.units).

1. Over-grow: every group gets `overgrow` (default 2) x as many *candidate* channels as it
   will keep; the over-grown net is A with those candidates added (a real network, A's
   architecture at width x (1 + overgrow (g - 1)), built and checked like any other). A
   candidate reads A's channels (its fan-in in every writer of its group) and writes into
   A's units (its fan-out in every reader); candidates never read each other, so each one's
   effect on the loss is its own.
2. Start small: random directions, fan-in at SCALE (0.5) x A's mean fan-in norm, fan-out
   at `eps` (`--noise`, default 0.01) x A's mean fan-out norm (growneuron's
   `is_outgoing_zero` scales with Firefly's eps-small output: the over-grown net starts
   close to A whatever BN lies between). The directions are normal (isotropic);
   growneuron's AddRandom draws uniform [0, 1) entries, which, when as many
   units as A has are added at once, all push A's units the same way: measured (WRN-16-1
   x0.5 --norm block trained 3 epochs on 4,000 CIFAR-10 images, 8 batches of 64, loss on
   256 other images in training mode, A 1.682): uniform at eps 0.1 2.226, normal at eps
   0.1 1.701, at 0.01 1.681.
3. Optimise as AddFirefly does: Adam on the candidates' fan-in and fan-out only, one step
   per growth batch, each step followed by projecting every candidate's fan-in and fan-out
   back to its target norm (its initial one). Adam's step is FIREFLY_LR (0.3) x the target
   norm / sqrt(dims), so the few steps turn directions; measured as above, the over-grown
   net's loss on the growth batches went 1.718 -> 1.702, 1.697, 1.702 at 0.1, 0.3, 1.
4. Score (Firefly's first-order criterion): over all the growth batches again, the
   gradient g of the loss with respect to each candidate's fan-out, summed over the
   batches; a candidate's first-order gain is |<g, w>| for its fan-out w (Firefly's
   |dL/d eps| for an output scaled by eps, which may take either sign).
5. Select: Firefly ranks candidates across layers and keeps the best for its budget
   (growneuron's AddFirefly, "Eq. 4 without extra candidates and splitting", grows a fixed
   count per layer and ranks nothing). mgrow grows every layer by the same factor, so each
   group's count is fixed and the ranking is within the group: its n best candidates are
   kept, each with the sign of its fan-out that decreases the loss to first order
   (<g, w> < 0).

Cost: two passes of the over-grown net over the growth batches (step 3, step 4), charged
to the ledger at its forward FLOPs. Owns `firefly` and its steps. Imports mgrow.arch,
mgrow.errors and growth.units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import build
from ..errors import MgrowError
from .units import SCALE, Norm, Wide, concat, fill_unread, mean_norm, place, split, unit

OVERGROW = 2  # candidates per kept unit
FIREFLY_LR = 0.3  # Adam's step, relative to a typical entry of the weight it moves


@dataclass
class Candidates:
    """Every grown group's candidates (lists by group, in wide.groups order)."""

    groups: list[int]  # indices into wide.groups
    fan_in: list[torch.Tensor]  # (K, writer dims), optimised
    fan_out: list[torch.Tensor]  # (K, reader dims), optimised
    targets: list[tuple[float, float]]  # fan-in and fan-out target norms
    dot: list[torch.Tensor]  # (K,) <g, w>: fan-out gradient (all batches) . fan-out

    def score(self, k: int) -> torch.Tensor:
        """Return the first-order gains |<g, w>| of group k's candidates."""
        return self.dot[k].abs()


def over_grown(wide: Wide, arch, overgrow: int) -> nn.Module:
    """Return the over-grown net (shapes checked against A + overgrow x the new units)."""
    big = build(arch).train()
    for m in big.modules():
        if isinstance(m, Norm):
            m.momentum = 0.0
    for p in big.parameters():
        p.requires_grad_(False)
    for group in wide.groups:
        o, n = wide.old[group.writers[0]][0], wide.new(group)
        for w in group.writers:
            if big.get_submodule(w).weight.shape[0] != o + overgrow * n:
                raise MgrowError(f"firefly: cannot over-grow {w} to {o + overgrow * n} "
                                 f"channels at width {arch.width:g}")
    return big


def normal_rows(n: int, dims: int, gen: torch.Generator) -> torch.Tensor:
    """Return n random unit rows of isotropic (normal) direction."""
    return unit(torch.randn(n, dims, generator=gen))


def candidates(wide: Wide, eps: float, overgrow: int, gen: torch.Generator) -> Candidates:
    """Return fresh candidates: growneuron's random init at the target norms."""
    out = Candidates([], [], [], [], [])
    for i, g in enumerate(wide.groups):
        n = wide.new(g)
        if n == 0:
            continue
        a_in, a_out = concat(wide.fan_in(g), 0), concat(wide.fan_out(g), 1)
        t_in, t_out = SCALE * mean_norm(a_in), eps * mean_norm(a_out)
        out.groups.append(i)
        out.fan_in.append((normal_rows(overgrow * n, a_in.shape[1], gen) * t_in)
                          .requires_grad_())
        out.fan_out.append((normal_rows(overgrow * n, a_out.shape[1], gen) * t_out)
                           .requires_grad_())
        out.targets.append((t_in, t_out))
        out.dot.append(torch.zeros(overgrow * n))
    return out


def tensors(wide: Wide, big: nn.Module, cand: Candidates) -> dict[str, torch.Tensor]:
    """Return the over-grown net's tensors: A's, the candidates (differentiably), candidate
    rows x candidate columns 0, candidates' norms cycled from A's, their biases 0."""
    fan_in: dict[str, torch.Tensor] = {}
    fan_out: dict[str, torch.Tensor] = {}
    for k, i in enumerate(cand.groups):
        g = wide.groups[i]
        fan_in |= dict(zip(g.writers, split(cand.fan_in[k], wide.fan_in(g), 0)))
        fan_out |= {r: f if f.dim() == 4 else f.reshape(len(f), -1)
                    for r, f in zip(g.readers, split(cand.fan_out[k], wide.fan_out(g), 1))}
    out = {}
    wide_state = wide.model.state_dict()
    factor = max(wide.weight(n).shape[0] // o for n, (o, _) in wide.old.items())
    for key, ref in big.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if name in wide.old and leaf == "weight":
            o, i = wide.old[name]
            a = wide_state[key][:o, :i]
            k_out, k_in = ref.shape[0] - o, ref.shape[1] - i
            top = torch.cat([a, fan_out.get(name, a.new_zeros(o, k_in, *a.shape[2:]))], 1)
            rows = fan_in.get(name, a.new_zeros(k_out, i, *a.shape[2:]))
            bottom = torch.cat([rows, a.new_zeros(k_out, k_in, *a.shape[2:])], 1)
            out[key] = torch.cat([top, bottom], 0)
        elif ref.dim() == 0:
            out[key] = wide_state[key].clone()
        else:  # norms and biases: A's, cycled (as growth.grid.common lays out the wide net)
            old = wide.old[name][0] if name in wide.old else len(wide_state[key]) // factor
            a = wide_state[key][:old]
            t = torch.cat([a] * math.ceil(len(ref) / old))[:len(ref)].clone()
            if name in wide.old and leaf == "bias":
                t[old:] = 0
            out[key] = t
    return out


def _loss(big: nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(torch.func.functional_call(big, params, (x,)), y)


def optimise(wide: Wide, big: nn.Module, cand: Candidates, data_batches) -> None:
    """Run Adam on the candidates' fan-in and fan-out, one step per batch, each step
    followed by the projection back to the target norms (growneuron's AddFirefly)."""
    groups = []
    for (t_in, t_out), f_in, f_out in zip(cand.targets, cand.fan_in, cand.fan_out):
        groups.append({"params": [f_in], "lr": FIREFLY_LR * t_in / math.sqrt(f_in.shape[1])})
        groups.append({"params": [f_out],
                       "lr": FIREFLY_LR * t_out / math.sqrt(f_out.shape[1])})
    groups = [g for g in groups if g["lr"] > 0]
    opt = torch.optim.Adam(groups) if groups else None
    for batch in data_batches:
        for f in cand.fan_in + cand.fan_out:
            f.grad = None
        _loss(big, tensors(wide, big, cand), batch).backward()
        if opt is not None:
            opt.step()
        with torch.no_grad():
            for (t_in, t_out), f_in, f_out in zip(cand.targets, cand.fan_in, cand.fan_out):
                f_in.copy_(unit(f_in) * t_in)
                f_out.copy_(unit(f_out) * t_out)


def score(wide: Wide, big: nn.Module, cand: Candidates, data_batches) -> None:
    """Set every candidate's <g, w>: g the loss gradient of its fan-out summed over all the
    batches (one forward and backward pass each), w its fan-out."""
    for f in cand.fan_in + cand.fan_out:
        f.grad = None
    for batch in data_batches:
        _loss(big, tensors(wide, big, cand), batch).backward()
    cand.dot = [(f.grad * f).sum(1).detach() if f.grad is not None else torch.zeros(len(f))
                for f in cand.fan_out]


def select(wide: Wide, cand: Candidates) -> list[torch.Tensor]:
    """Return, per grown group, the indices of its n best candidates by first-order gain."""
    return [cand.score(k).argsort(descending=True, stable=True)[:wide.new(wide.groups[i])]
            for k, i in enumerate(cand.groups)]


def search(wide: Wide, data_batches, job, overgrow: int = OVERGROW) -> Candidates:
    """Return every group's candidates, over-grown, optimised and scored (steps 1-4)."""
    big = over_grown(wide, over_arch(job, overgrow), overgrow)
    cand = candidates(wide, job.noise, overgrow, job.gen)
    optimise(wide, big, cand, data_batches)
    score(wide, big, cand, data_batches)
    return cand


def keep(wide: Wide, cand: Candidates) -> tuple[float, float]:
    """Place each group's best candidates in the wide net, each with the sign of its fan-out
    that decreases the loss to first order (step 5); return the first-order gains kept and
    dropped."""
    kept = dropped = 0.0
    for k, idx in enumerate(select(wide, cand)):
        sign = torch.where(cand.dot[k][idx] > 0, -1.0, 1.0).view(-1, 1)
        place(wide, wide.groups[cand.groups[k]], cand.fan_in[k][idx],
              cand.fan_out[k][idx] * sign)
        gain = cand.score(k)
        kept += float(gain[idx].sum())
        dropped += float(gain.sum() - gain[idx].sum())
    return kept, dropped


def firefly(wide: Wide, data_batches, job, overgrow: int = OVERGROW) -> list[str]:
    """Grow every group's new channels by Firefly (module docstring); return notes."""
    cand = search(wide, data_batches, job, overgrow)
    kept, dropped = keep(wide, cand)
    n = sum(wide.new(wide.groups[i]) for i in cand.groups)
    notes = [(f"firefly kept {n} of {overgrow * n} candidates in {len(cand.groups)} channel "
              f"groups, each group's best by first-order gain (sum kept {kept:.3g}, dropped "
              f"{dropped:.3g})")]
    unread = fill_unread(wide, job.gen)
    if unread:
        notes.append(f"{unread} new units of layers no layer reads: random fan-in, fan-out 0")
    return notes


def over_arch(job, overgrow: int):
    """Return the over-grown architecture: A's, (1 + overgrow (g - 1)) times wider."""
    a = job.members[0].manifest.arch
    g = round(job.arch.width / a.width)
    return a.widened(1 + overgrow * (g - 1))
