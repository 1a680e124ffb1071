"""Data-driven growth baselines on plain wide networks: GradMax and Firefly.

Both grow member A alone into the plain g-times-wider net (as Random and Net2Net do; the
paper compares them as plain baselines, and their objectives are about individual units,
which template mixing would tie together). Layout: the carried tile (0, 0) is A's layer,
the *fan-out* tiles of every new unit into A's units, (0, c >= 1) and the classifier's
columns c >= 1, start at zero, and the new rows (r >= 1: every new unit's *fan-in*, all
input columns) are the method's. Zero fan-out preserves A's function exactly: no old
channel reads a new one (this is growneuron's `is_outgoing_zero` variant; the other one,
zero fan-in, would rely on f(0) = 0 and f'(0) != 0, which BatchNorm's shift and ReLU's
zero derivative at 0 break). Norm layers and biases of new channels are copies of A's.

Units are grown in *pairs*, as in growneuron: a layer L whose output channels reach
exactly one next layer C through channel-wise BatchNorm/ReLU only (WRN and ResNet block
convs, VGG's same-shape convs and classifier layers; found by walking the autograd graph).
Channels of a residual stream, written by several layers and read by several, and the
stem, are not a pair: their new fan-in rows are random unit directions at A's mean row
norm (growneuron grows such layers at random too), still with zero fan-out.

- GradMax (Evci et al. 2022): the new fan-in rows X of L maximise the norm of the
  gradient of the loss with respect to the new units' zero fan-out weights in C. With the
  pair linearised (BN and ReLU as identity, the paper's assumption), that gradient is
  X T, where T = sum over the batch and positions of (L's input patches) x (C's output
  gradient), accumulated over `steps` batches; so X's rows are T's top left singular
  vectors, each scaled to the mean norm of A's fan-in rows in L (growneuron's
  `mean_norm`, scale 1).
- Firefly (Wu et al. 2020): two candidates per new unit slot s of a pair: a *split* copy
  of A's unit s mod o (its fan-in row plus `noise` x its norm of random perturbation,
  fan-out along that unit's fan-out) and a *new* unit (random fan-in and fan-out
  directions at A's mean norms). Each candidate's fan-out into A's units is eps x its
  direction, eps its scale parameter, starting at 0. `steps` Adam steps on the batches
  optimise the eps of every candidate (candidates of one kind together); the first-order
  loss decrease of a candidate is -g0 x eps, g0 the loss gradient with respect to its eps
  at 0. Each slot keeps the better of its two candidates, with its optimised eps, so the
  grown net starts a little better than A on the data, not equal to it.

Cost: every step is one forward and backward pass of the wide net on `batch_size`
training images (Firefly: `steps` for each of its two candidate kinds); the ledger gets a
growth-stage row `fuse` with 3 x forward FLOPs x those images, like any training phase
(finding the pairs costs one forward pass of 2 blank images, not counted).

Owns `grow` (gradmax, firefly) and their pieces. Imports mgrow.errors, arch, data (batches
only: the data itself is handed in), flops, manifest, mixing and growth.grid.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import build
from ..data import batches
from ..errors import MgrowError
from ..flops import forward_flops
from ..manifest import Phase
from ..mixing import mixed_layers
from .grid import Job, Result

CHANNELWISE = {"ReluBackward0", "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
               "MiopenBatchNormBackward0"}
FIREFLY_LR = 0.01  # Adam's step on the scale parameters eps (1 = a full-size unit)


@dataclass
class Wide:
    """The plain wide net under construction and the split of every layer's units."""

    model: nn.Module  # plain, g times wider, new fan-out zero
    old: dict[str, tuple[int, int]]  # layer -> (A's output units, A's input channels)
    pairs: list[tuple[str, str]]  # (producer L, its only consumer C)
    normed: set[tuple[str, str]]  # pairs with a BatchNorm between L and C

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def new_rows(self, name: str) -> int:
        """Return how many new units (rows) layer `name` has."""
        return self.layer(name).weight.shape[0] - self.old[name][0]


def grow(method: str, job: Job, state: dict[str, torch.Tensor],
         common: dict[str, torch.Tensor]) -> Result:
    """Return the growth Result of `method` (gradmax or firefly) for member state `state`,
    on the training batches of `job.data` (loaded and checked by the caller)."""
    data = job.data() if callable(job.data) else job.data
    if data is None:
        raise MgrowError(f"--method {method} reads training data; none was given")
    if job.batch_size > len(data.train_y):
        raise MgrowError(f"--batch-size {job.batch_size} exceeds the {len(data.train_y)} "
                         "training images")
    start = time.perf_counter()
    wide = widen(job, state, common)
    data_batches = _Steps(data, job.batch_size, job.seed, job.steps)
    notes = (gradmax if method == "gradmax" else firefly)(wide, data_batches, job)
    images = job.steps * job.batch_size * (2 if method == "firefly" else 1)
    fwd = forward_flops(job.arch.model_copy(update={"input_size": data.spec.input_size}))
    phase = Phase(operation="fuse", arch=f"{job.arch.name} x{job.arch.width:g} plain "
                  f"({method} growth step)", stage="growth", images=images,
                  forward_flops=fwd, train_flops=3 * fwd * images,
                  wall_s=round(time.perf_counter() - start, 3), device="cpu")
    tensors = {k: v.detach().clone() for k, v in wide.model.state_dict().items()}
    return Result(tensors, mixed=False, notes=notes, phase=phase, data=data.spec)


def _batches(data, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield training batches forever (epoch after epoch, the engine's order)."""
    epoch = 0
    while True:
        yield from batches(data, True, batch_size, epoch, seed)
        epoch += 1


@dataclass
class _Steps:
    """The growth step's `steps` training batches, drawn again on every pass over them (the
    same batches: the order is the seed's), so that they are never all in memory at once."""

    data: object
    batch_size: int
    seed: int
    steps: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(_batches(self.data, self.batch_size, self.seed), self.steps)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Return the rows (n, ...) scaled to unit norm."""
    flat = rows.reshape(len(rows), -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).view_as(rows)


def mean_row_norm(w: torch.Tensor) -> float:
    """Return the mean l2 norm of a weight's rows (units' fan-in vectors)."""
    return float(w.reshape(len(w), -1).norm(dim=1).mean())


def widen(job, state: dict[str, torch.Tensor], common: dict[str, torch.Tensor]) -> Wide:
    """Return the wide plain net: A's tiles, zero fan-out, random unit fan-in rows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=job.gen)))
        model = build(job.arch)
        tensors = dict(common)
        old = {}
        for name, layer in mixed_layers(job.skeleton).items():
            a = state[f"{name}.weight"]
            o, i = a.shape[:2]
            w = torch.zeros(layer.grid[0] * o, layer.grid[1] * i, *a.shape[2:])
            w[:o, :i] = a
            if len(w) > o:  # the classifier grows no units
                w[o:] = _unit(torch.randn(w[o:].shape)) * mean_row_norm(a)
            tensors[f"{name}.weight"] = w
            old[name] = (o, i)
    model.load_state_dict(tensors, strict=True)
    pairs = find_pairs(model, job.arch)
    return Wide(model, old, list(pairs), {p for p, bn in pairs.items() if bn})


def find_pairs(model: nn.Module, arch) -> dict[tuple[str, str], bool]:
    """Return {(L, C): BN between}: layers whose every output reaches only C, through
    BN/ReLU only."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    outs, ins = {}, {}

    def record(name: str) -> Callable:
        def hook(mod, inputs, output):
            outs[output.grad_fn] = name
            ins[name] = inputs[0].grad_fn
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            y = model.eval()(torch.zeros(2, arch.in_channels, arch.input_size, arch.input_size))
    finally:
        for h in handles:
            h.remove()
    uses: Counter = Counter()  # how many nodes read each node's output
    seen, todo = {y.grad_fn}, [y.grad_fn]
    while todo:
        for nxt, _ in todo.pop().next_functions:
            if nxt is not None:
                uses[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    found = {}
    for c, node in ins.items():
        bn = False
        while node is not None and node.name() in CHANNELWISE and uses[node] == 1:
            bn |= "BatchNorm" in node.name()
            node = node.next_functions[0][0]
        producer = outs.get(node)
        if producer is not None and uses[node] == 1 and \
                type(layers[producer]) is type(layers[c]) and producer != c:
            found[producer, c] = bn
    return found


def _probe(wide: Wide) -> nn.Module:
    """Return a copy of the wide net in training mode whose BN statistics never move."""
    model = copy.deepcopy(wide.model).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def patches(x: torch.Tensor, producer: nn.Module) -> torch.Tensor:
    """Return L's input patches laid out as C's input: (B, fan-in dims, H, W) or (B, in)."""
    if isinstance(producer, nn.Linear):
        return x.reshape(len(x), -1)
    p = F.unfold(x, producer.kernel_size, producer.dilation, producer.padding,
                 producer.stride)  # (B, in*k*k, H*W): one column per output position of L
    return p.view(len(x), -1, *_out_size(x, producer))


def pair_statistic(p: torch.Tensor, delta: torch.Tensor, consumer: nn.Module
                   ) -> torch.Tensor:
    """Return T (fan-in dims of L, fan-out dims of C): the sum of L's input patches `p` x
    C's output gradient `delta`, so that the linearised fan-out gradient of new fan-in
    rows X is X T."""
    if isinstance(consumer, nn.Linear):
        return p.T @ delta  # (in, out)
    t = torch.nn.grad.conv2d_weight(p, (delta.shape[1], p.shape[1], *consumer.kernel_size),
                                    delta, consumer.stride, consumer.padding,
                                    consumer.dilation)  # (out, in*k*k, kc, kc)
    return t.transpose(0, 1).reshape(p.shape[1], -1)


def centred(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the patches minus their mean over batch and positions, and their covariance
    (fan-in dims squared): what a training-mode BatchNorm makes of a new unit's input."""
    rows = p.transpose(0, 1).reshape(p.shape[1], -1)  # (dims, B*H*W)
    mean = rows.mean(1)
    c = p - mean.view(1, -1, *[1] * (p.dim() - 2))
    rows = rows - mean[:, None]
    return c, rows @ rows.T


def _out_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(
        x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def statistics(wide: Wide, data_batches
               ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]:
    """Return every pair's (T, patch covariance or None when no BN is between), summed
    over the batches (one forward/backward pass each)."""
    model = _probe(wide)
    stats: dict = {}
    inputs, grads = {}, {}

    def keep_input(name: str) -> Callable:
        def hook(mod, i, o) -> None:
            inputs[name] = i[0].detach()
        return hook

    def keep_grad(name: str) -> Callable:
        def hook(mod, i, o) -> None:
            o.register_hook(lambda g: grads.__setitem__(name, g))
        return hook

    hooks = []
    for l_name, c_name in wide.pairs:
        hooks.append(model.get_submodule(l_name).register_forward_hook(keep_input(l_name)))
        hooks.append(model.get_submodule(c_name).register_forward_hook(keep_grad(c_name)))
    first = next(iter(model.parameters()))
    first.requires_grad_(True)  # so that the graph is built; its gradient is ignored
    try:
        for x, y in data_batches:
            F.cross_entropy(model(x), y).backward()
            for pair in wide.pairs:
                l_name, c_name = pair
                p = patches(inputs[l_name], model.get_submodule(l_name))
                cov = None
                if pair in wide.normed:  # BN standardises the new unit: centre, whiten
                    p, cov = centred(p)
                t = pair_statistic(p, grads[c_name][:, :wide.old[c_name][0]],
                                   model.get_submodule(c_name))
                t0, cov0 = stats.get(pair, (0, None if cov is None else 0))
                stats[pair] = (t0 + t, None if cov is None else cov0 + cov)
    finally:
        for h in hooks:
            h.remove()
    return stats


def gradmax(wide: Wide, data_batches, job) -> list[str]:
    """Set every pair's new fan-in rows to the top singular vectors of its statistic."""
    notes = []
    stats = statistics(wide, data_batches)
    with torch.no_grad():
        for (l_name, c_name), (t, cov) in stats.items():
            w = wide.layer(l_name).weight
            o, n = wide.old[l_name][0], wide.new_rows(l_name)
            rows = top_directions(t.double(), None if cov is None else cov.double(), n)
            if len(rows) < n:  # more new units than fan-in dimensions: the rest stay random
                notes.append(f"{l_name}: {n} new units but {len(rows)} gradient directions; "
                             f"{n - len(rows)} keep random fan-in")
            w[o:o + len(rows)] = _unit(rows.float().view(len(rows), *w.shape[1:])) * \
                mean_row_norm(w[:o])
    return notes


def top_directions(t: torch.Tensor, cov: torch.Tensor | None, n: int) -> torch.Tensor:
    """Return up to n fan-in directions (rows) maximising ||x T||^2, or with `cov`
    ||x T||^2 / (x cov x^T) (a BN-standardised unit): T's top left singular vectors, or
    the top generalised eigenvectors of (T T^T, cov)."""
    if cov is None:  # a thin SVD: its cost follows T's smaller side, never dims x dims (a
        u, s, _ = torch.linalg.svd(t, full_matrices=False)  # VGG classifier: 25,088 dims)
        rank = int((s * s > float(s[0]) ** 2 * 1e-10).sum()) if len(s) else 0
        return u[:, :min(n, rank)].T
    s, q = torch.linalg.eigh(cov)  # whiten: cov^(-1/2), tiny variances floored
    inv = q * s.clamp_min(1e-6 * float(s[-1]) + 1e-30).rsqrt()  # (dims, dims)
    values, w = torch.linalg.eigh(inv.T @ (t @ t.T) @ inv)  # ascending
    vectors = inv @ w
    rank = int((values > values[-1] * 1e-10).sum())
    return vectors[:, len(values) - min(n, rank):].flip(1).T  # the top min(n, rank)


@dataclass
class Candidates:
    """One kind of Firefly candidate for every pair: fan-in rows and fan-out directions."""

    kind: str
    rows: dict[str, torch.Tensor]  # producer -> (n, in, *k) new fan-in rows
    fanout: dict[str, torch.Tensor]  # consumer -> (o_C, n, *k) directions into A's units
    eps: dict[str, torch.Tensor]  # consumer -> (n,) scale parameters, optimised
    g0: dict[str, torch.Tensor]  # consumer -> (n,) dLoss/deps at eps = 0

    def decrease(self, c_name: str) -> torch.Tensor:
        """Return each candidate's first-order loss decrease -g0 x eps."""
        return -self.g0[c_name] * self.eps[c_name]


def candidates(wide: Wide, kind: str, noise: float, gen: torch.Generator) -> Candidates:
    """Return fresh Firefly candidates of `kind` (split or new), eps at 0."""
    rows, fanout, eps = {}, {}, {}
    for l_name, c_name in wide.pairs:
        w, cw = wide.layer(l_name).weight.detach(), wide.layer(c_name).weight.detach()
        o, n = wide.old[l_name][0], wide.new_rows(l_name)
        o_c = wide.old[c_name][0]
        if kind == "split":  # copy of A's unit s mod o, perturbed; fan-out along its own
            src = torch.arange(n) % o
            base = w[src]
            jitter = _unit(torch.randn(base.shape, generator=gen))
            rows[l_name] = base + noise * jitter * base.reshape(n, -1).norm(dim=1).view(
                -1, *[1] * (base.dim() - 1))
            fanout[c_name] = cw[:o_c, src]
        else:  # a new unit: random directions at A's mean norms
            rows[l_name] = _unit(torch.randn(w[o:].shape, generator=gen)) * mean_row_norm(w[:o])
            cols = cw[:o_c, :o].transpose(0, 1)  # A's fan-out vectors (o, o_c, *k)
            out = _unit(torch.randn((n, *cols.shape[1:]), generator=gen)) * mean_row_norm(cols)
            fanout[c_name] = out.transpose(0, 1)
        eps[c_name] = torch.zeros(n, requires_grad=True)
    return Candidates(kind, rows, fanout, eps, {})


def weights(wide: Wide, cand: Candidates, eps: dict[str, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
    """Return the pairs' layer weights with `cand` placed (eps: the candidates' or given)."""
    eps = cand.eps if eps is None else eps
    out = {}
    for l_name, c_name in wide.pairs:
        o = wide.old[l_name][0]
        w = wide.layer(l_name).weight.detach().clone()
        w[o:] = cand.rows[l_name]
        out[f"{l_name}.weight"] = w
    for l_name, c_name in wide.pairs:
        o, o_c = wide.old[l_name][0], wide.old[c_name][0]
        base = out.get(f"{c_name}.weight", wide.layer(c_name).weight.detach())
        f = cand.fanout[c_name]
        scaled = eps[c_name].view(1, -1, *[1] * (f.dim() - 2)) * f
        pad = torch.zeros_like(base)
        pad[:o_c, o:o + f.shape[1]] = scaled  # differentiable in eps
        out[f"{c_name}.weight"] = base + pad
    return out


def loss_with(model: nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """Return the cross-entropy of `model` on `batch` with some weights replaced."""
    x, y = batch
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def optimise(wide: Wide, cand: Candidates, data_batches, model: nn.Module) -> None:
    """Run Adam on the candidates' eps over the batches; record g0 at eps = 0."""
    opt = torch.optim.Adam(list(cand.eps.values()), lr=FIREFLY_LR)
    for step, batch in enumerate(data_batches):
        opt.zero_grad()
        loss_with(model, weights(wide, cand), batch).backward()
        if step == 0:
            cand.g0 = {k: e.grad.detach().clone() for k, e in cand.eps.items()}
        opt.step()


def firefly(wide: Wide, data_batches, job) -> list[str]:
    """Place, in every slot of every pair, the better of its split and new candidates."""
    model = _probe(wide)
    kinds = [candidates(wide, kind, job.noise, job.gen) for kind in ("split", "new")]
    for cand in kinds:
        optimise(wide, cand, data_batches, model)
    kept = select(wide, *kinds)
    with torch.no_grad():
        for key, w in weights(wide, kept).items():
            wide.layer(key.removesuffix(".weight")).weight.copy_(w)
    n_split = sum(int((kept.rows[l] == kinds[0].rows[l]).flatten(1).all(1).sum())
                  for l, _ in wide.pairs)
    n_all = sum(wide.new_rows(l) for l, _ in wide.pairs)
    return [f"firefly kept {n_split} split and {n_all - n_split} new units of {n_all} "
            f"slots in {len(wide.pairs)} layer pairs"]


def select(wide: Wide, a: Candidates, b: Candidates, keep_best: bool = True) -> Candidates:
    """Return per slot the candidate of `a` or `b` with the larger first-order decrease
    (keep_best=False: the smaller, i.e. the rejected ones)."""
    rows, fanout, eps, g0 = {}, {}, {}, {}
    for l_name, c_name in wide.pairs:
        better = a.decrease(c_name) >= b.decrease(c_name)
        pick = better if keep_best else ~better  # (n,) True: take a's
        shape = (-1, *[1] * (a.rows[l_name].dim() - 1))
        rows[l_name] = torch.where(pick.view(shape), a.rows[l_name], b.rows[l_name])
        f_shape = (1, -1, *[1] * (a.fanout[c_name].dim() - 2))
        fanout[c_name] = torch.where(pick.view(f_shape), a.fanout[c_name], b.fanout[c_name])
        eps[c_name] = torch.where(pick, a.eps[c_name], b.eps[c_name]).detach()
        g0[c_name] = torch.where(pick, a.g0[c_name], b.g0[c_name])
    return Candidates("kept" if keep_best else "rejected", rows, fanout, eps, g0)
