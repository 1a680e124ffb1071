"""Growth along an observed plan: builders' networks (torchvision:, timm:) and `zero`.

mgrow.arch.widen watches a probe copy of the network run and grows every channel axis by
g, whatever Python code wires its layers; this module turns that into `fuse`'s output:
`net2net` (every unit copied, its readers share the weight: the function is kept, also
with --noise, which perturbs the shares), `zero` (new units with zero fan-out: the function
is kept unless a LayerNorm or GroupNorm averages over grown channels), `random`; a
template-mixed member grows as the plain network it computes. Also the tensors of a
template-mixed twin's MixtureGrowth besides its coefficients and banks (`carried`: what
growth.mixture takes from the members along the plan).

Owns `grow`, `carried`, `plain_network`, `probe_logits`. Imports mgrow.arch (build, widen,
plans, twins), bundle, errors, manifest, mixing and growth.grid.
"""

from __future__ import annotations

import torch

from ..arch import build, empty
from ..arch.plans import METHODS, apply, take
from ..arch.twins import copies
from ..arch.widen import plan
from ..bundle import Bundle
from ..errors import MgrowError
from ..manifest import ArchSpec, Growth, Manifest
from ..mixing import mixed_layers, plain_state_dict
from .grid import old_block


def grow(members: list[Bundle], factor: int, method: str, noise: float, seed: int,
         bn_correct: bool) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Return the manifest and tensors of members[0] grown `factor` times wider."""
    if len(members) != 1:
        raise MgrowError(f"--method {method} widens one network; give only A")
    first = members[0]
    name = first.manifest.arch.name
    if method not in METHODS:
        raise MgrowError(f"--method {method} does not grow {name} yet: use one of "
                         f"{', '.join(METHODS)}")
    if bn_correct:
        raise MgrowError("--bn-correct corrects mixture and grid growth; --method "
                         f"{method} copies every unit's statistics with it")
    arch = first.manifest.arch
    model = first.model(share=True).eval()  # read only: apply grows a copy
    if first.manifest.mixing is not None:  # a template-mixed twin: its plain network grows
        model = plain_network(model, arch)
    example = torch.zeros(2, arch.in_channels, arch.input_size, arch.input_size)
    grown = apply(model, plan(model, factor, example), method, noise, seed)
    if method == "net2net":  # the plan was checked on a random probe; check the real net
        _check_kept(model, grown.eval(), arch)
    growth = Growth(method=method, init=None, factor=factor, members=1, tiling="none",
                    seed=seed, noise=noise)
    options = {"factor": factor, "method": method, "seed": seed, "noise": noise}
    manifest = first.manifest.derived("fuse", options, (first.parent(),),
                                      arch=arch.widened(factor), growth=growth,
                                      mixing=None)
    return manifest, {k: v.detach() for k, v in grown.state_dict().items()}  # grown is ours


def probe_logits(model: torch.nn.Module, arch: ArchSpec) -> torch.Tensor:
    """Return `model`'s logits on the probe batch (2 seeded normal images) that growth and
    deepening check a kept function on."""
    x = torch.randn(2, arch.in_channels, arch.input_size, arch.input_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


def _check_kept(model: torch.nn.Module, grown: torch.nn.Module, arch: ArchSpec) -> None:
    """Refuse a net2net growth whose logits moved (relative error > 1e-4 on the probe
    batch): the plan is observed on a random float64 probe, and a layout that holds there
    but not for the real weights must not be written."""
    want, got = probe_logits(model, arch), probe_logits(grown, arch)
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if not err <= 1e-4:
        raise MgrowError(f"{arch.name}: net2net growth moved the logits by {err:.2g} "
                         "(relative) on the real weights although the plan's probe kept them; "
                         "nothing written (please report this network)")


def plain_network(twin: torch.nn.Module, arch: ArchSpec) -> torch.nn.Module:
    """Return the plain network a template-mixed twin computes (weights generated)."""
    plain = empty(arch)
    plain.load_state_dict(plain_state_dict(twin), strict=True)
    return plain.eval()


def carried(members: list[Bundle], factor: int, skeleton: torch.nn.Module
            ) -> dict[str, torch.Tensor]:
    """Return every tensor of the grown twin `skeleton` (a grid of `factor` x `factor`)
    but its banks and coefficients, along the plan observed on the members' ungrown
    architecture. First growth: an entry whose grown axes are all the c-th copies of their
    old channels is member (c mod m)'s; an entry that crosses copies (a read axis's copy
    differs from a produced one's) is zero, so each member's channels read only their own.
    A grown twin grown again (alone, by `before`): copy k < before is carried from its own
    copy k, a new copy k from copy old_block(k) (grid.old_block: a block of the same
    owner); an entry is carried where all its copies are old or all are one, else zero.
    A tensor with no grown axis (the classifier's bias) is the members' mean; integer
    buffers are the first member's."""
    man = members[0].manifest
    before = man.mixing.factor if man.mixing is not None else 1
    if before == 1 and man.arch.width != 1:
        raise MgrowError(f"{members[0].path}: a grown plain builder's network; --method "
                         "mixture grows template-mixed twins (net2net grows it as it is)")
    arch = man.arch.model_copy(update={"width": 1.0})
    example = torch.zeros(2, arch.in_channels, arch.input_size, arch.input_size)
    base = build(arch)
    steps = plan(base, factor, example)
    old = plan(base, before, example) if before > 1 else None
    layers = mixed_layers(skeleton)
    m = len(members) if before == 1 else man.mixing.members
    out = {}
    for key, ref in skeleton.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path == "banks" or (path in layers and leaf == "alpha"):
            continue
        parts = [b.tensors[key] for b in members]
        axes = steps.axes.get(key, [])
        grown_axes = [a for a in axes if len(a.index) > int(a.index.max()) + 1]
        if not grown_axes:  # the classifier's bias: the members' mean
            out[key] = (torch.stack(parts).mean(0) if parts[0].is_floating_point()
                        else parts[0].clone())
            continue
        ks = []  # each grown axis's copy numbers, broadcast along its dim
        for a in grown_axes:
            shape = [1] * ref.dim()
            shape[a.dim] = len(a.index)
            ks.append(copies(a.index).view(shape))
        k = torch.stack(torch.broadcast_tensors(*ks))
        if old is None:
            grown = [take(t, axes) for t in parts]
            owner = torch.where(k.eq(ks[0]).all(0), ks[0] % m, -1).expand(ref.shape)
            value = torch.zeros(ref.shape, dtype=parts[0].dtype)
            for j, t in enumerate(grown):
                value = torch.where(owner == j, t, value)
        else:
            value = _regrown(parts[0], key, grown_axes, old.axes.get(key, []), before, m)
            keep = k.lt(before).all(0) | k.eq(ks[0]).all(0)
            value = torch.where(keep.expand(ref.shape), value, torch.zeros((), dtype=value.dtype))
        out[key] = value
        assert out[key].shape == ref.shape, key
    return out


def _regrown(t: torch.Tensor, key: str, axes: list, olds: list, before: int, m: int
             ) -> torch.Tensor:
    """Return a grown twin's tensor `t` (laid out by the plan of `before`, axes `olds`) in
    the layout of the plan of `axes`: new copy k of channel i is its copy old_block(k)."""
    by_dim = {a.dim: a for a in olds}
    for a in axes:
        o = by_dim.get(a.dim)
        n = int(a.index.max()) + 1
        if o is None or int(o.index.max()) + 1 != n:
            raise MgrowError(f"internal: {key} grows along dim {a.dim} at x{before} and not "
                             "in the regrown plan's way")
        at = torch.empty(len(o.index), dtype=torch.long)  # (copy, channel) -> position
        at[copies(o.index) * n + o.index] = torch.arange(len(o.index))
        k = copies(a.index)
        source = torch.tensor([old_block(int(j), before, m) for j in k], dtype=torch.long)
        t = t.index_select(a.dim, at[source * n + a.index])
    return t
