"""`fuse`: grow one or two trained members into a network `factor` times wider.

Every grown layer is a g x g grid of member-size tiles (the stem g x 1, the classifier 1 x g).
Channel block j of every grown layer belongs to member j mod m, so the *carried* tiles are
the members' own layers: inner tile (j, j), stem tile (j, 0), classifier tile (0, j), for
j < m. Method `mixture` (MixtureGrowth) keeps the members' templates and coefficients for
carried tiles, bit-equal, and makes every other tile from the owner's existing templates
with a new coefficient vector; the owner of tile (r, c) is member r mod m under vertical
tiling (tiles of one output row share templates) and c mod m under horizontal tiling. The
stem's tiles are always owned by their row, the classifier's by their column.

Norm layers and biases: block j is member (j mod m)'s. The classifier averages the
members: its coefficients (or plain weights) are divided by m and its bias is the members'
mean, so with `--init zero` the grown logits are exactly the mean of the members' logits.

Baselines (plain outputs): `random` keeps the carried tiles and draws every other tile as a
fresh plain weight (the wide layer's initial distribution); `net2net` widens one member
function-preservingly: every unit is replicated g times and every tile is the member's
weight divided by the input replication g (stem: not divided), plus `noise` on new tiles.
`gradmax` and `firefly` read a few batches of data (see growth.datadriven); their growth
step's training FLOPs become a ledger row.

Builders' networks (torchvision:, timm:) and `zero` growth go another way: growth.traced
grows along the plan mgrow.arch.widen observes (net2net, zero, random), whatever code wires
the layers.

Growing again: a grown bundle is accepted as the only member. Its whole grid becomes the
carried region of the next one: a mixed net of factor G grows to factor G x g (tiles keep
the original member size, owners stay j mod m, the tiling must stay the same, the
classifier is not averaged again), so `--init zero` keeps its logits exactly. The plain
methods treat it as one plain member of its own width.
Owns the method table `METHODS`, `check_members` and the dispatcher `fuse`. Imports the
growth modules below it and mgrow.arch, mgrow.bundle, mgrow.limits, mgrow.manifest; data
(for gradmax and firefly) comes in as an argument, loaded by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import limits as L
from ..arch import build, empty, is_traced
from ..bundle import Bundle, check_tensors
from ..data import Data
from ..errors import MgrowError
from ..manifest import ArchSpec, Growth, Manifest, MixingSpec
from . import datadriven, traced
from .grid import (Job, Result, Sources, block_sources, common, grid, grid_size, head_name,
                   plain_state)
from .inits import INITS
from .mixture import mixture
from .norms import correct_norms
from .plain import net2net, random_growth


@dataclass
class Grown:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    sources: Sources | None = None  # where each channel block's norms came from


def check_members(members: list[Bundle], factor: int, method: str) -> None:
    """Raise MgrowError (one line) unless the members can be fused this way."""
    if method not in METHODS:
        raise MgrowError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if factor < 2:
        raise MgrowError(f"--factor must be at least 2 (got {factor})")
    if not 1 <= len(members) <= 2:
        raise MgrowError("fuse takes one or two members")
    if method in ("net2net", "gradmax", "firefly") and len(members) > 1:
        raise MgrowError(f"--method {method} widens one network; give only A")
    for b in members:
        mix = b.manifest.mixing
        if len(members) > 1 and (b.manifest.growth is not None or grid(b) > 1):
            raise MgrowError(f"{b.path}: already grown; grow a grown bundle alone (omit B)")
        if method == "mixture" and mix is None:
            raise MgrowError(f"{b.path}: a plain network; --method mixture needs template-"
                             "mixed members (run `mgrow convert` first)")
    if len(members) == 2 and members[0].sha256 == members[1].sha256:
        raise MgrowError(f"cannot fuse {members[1].path} with itself: the new half would be "
                         f"a twin of the old (train a sibling with `train-sibling`)")
    if len(members) == 2:
        a, b = (m.manifest for m in members)
        for what, x, y in (("architectures", a.arch.model_copy(update={"num_classes": 0}),
                            b.arch.model_copy(update={"num_classes": 0})),
                           ("class counts", a.arch.num_classes, b.arch.num_classes),
                           ("mixing specs (templates, sharing)", a.mixing, b.mixing)):
            if x != y:
                raise MgrowError(f"cannot fuse: the members have different {what}: {x} vs {y}")
        if a.data is not None and b.data is not None and a.data != b.data:
            def seen(d):  # name the difference: the spec, else the images actually used
                return d.spec if a.data.spec != b.data.spec else \
                    f"{d.spec}, {d.train_size} training images"
            raise MgrowError(f"cannot fuse: the members were trained on different data sets "
                             f"({seen(a.data)} vs {seen(b.data)})")


def fuse(members: list[Bundle], factor: int = 2, tiling: str = "vertical",
         init: str = "orthogonal", method: str = "mixture", seed: int = 0,
         noise: float | None = None, data: Data | Callable[[], Data] | None = None,
         batch_size: int = 64, steps: int = 8, bn_correct: bool = False) -> Grown:
    """Return the grown network (manifest and tensors) of one or two members.

    `data` (or a function loading it, called once the options are checked: phases.fuse_files),
    `batch_size` and `steps` feed the data-driven methods; `bn_correct` corrects the BN
    running statistics without data (growth.norms).
    """
    traced_net = bool(members) and is_traced(members[0].manifest.arch.name)
    if method == "zero" or (traced_net and method != "mixture"):
        manifest, tensors = traced.grow(members, factor, method, DEFAULT_NOISE.get(
            method, 0.0) if noise is None else noise, seed, bn_correct)
        return Grown(manifest, tensors)
    check_members(members, factor, method)
    if traced_net and bn_correct:
        raise MgrowError("--bn-correct corrects mgrow's own families; a builder's network "
                         "grown by mixture carries every channel's statistics with it")
    if method == "mixture" and init not in INITS:
        raise MgrowError(f"unknown --init {init!r}: expected one of {', '.join(INITS)}")
    if tiling not in ("vertical", "horizontal"):
        raise MgrowError(f"unknown --tiling {tiling!r}: expected vertical or horizontal")
    if batch_size < 1 or steps < 1:
        raise MgrowError(f"--batch-size and --growth-steps must be at least 1 (got "
                         f"{batch_size} and {steps})")
    m, g = len(members), factor
    first = members[0].manifest
    noise = DEFAULT_NOISE.get(method, 0.0) if noise is None else noise
    if not (0 <= noise < float("inf")):
        raise MgrowError(f"--noise must be a finite number >= 0, not {noise:g}")
    spec = first.mixing or MixingSpec()
    arch = first.arch.widened(g)
    before = grid(members[0])
    if g * before > L.MAX_FACTOR:
        raise MgrowError(f"{members[0].path}: its {before} x {before} grid of tiles grown by "
                         f"{g} would be {g * before} x {g * before}; the limit is {L.MAX_FACTOR}")
    if method == "mixture" and before > 1 and spec.tiling != tiling:
        raise MgrowError(f"{members[0].path}: grown with --tiling {spec.tiling}; grow it "
                         f"again with the same tiling (its carried tiles keep their owners)")
    mixing = spec.model_copy(update={"factor": g * before, "members": spec.members
                                     if before > 1 else m, "tiling": tiling,
                                     "freeze_edges": False})
    skeleton_mix = mixing if method == "mixture" else spec.model_copy(update={
        "factor": g, "members": m, "tiling": tiling, "freeze_edges": False})
    try:
        skeleton = build(arch, skeleton_mix, meta=True)
    except ValueError as e:
        raise MgrowError(f"cannot grow {first.describe()} by {g}: {e}") from None
    job = Job(members, skeleton, arch, mixing, init, noise,
              torch.Generator().manual_seed(seed), seed, data, batch_size, steps)
    result = METHODS[method](job)
    mixing = mixing if result.mixed else None
    check_tensors(build(arch, mixing, meta=True), result.tensors, "grown network")  # invariant
    if bn_correct:
        result.tensors = _bn_corrected(arch, mixing, result.tensors, members,
                                       torch.Generator().manual_seed(seed), result.sources)
    growth = Growth(method=method, init=init if method == "mixture" else None, factor=g,
                    members=m, tiling=tiling, seed=seed, noise=noise,
                    rank_notes=tuple(result.notes), bn_correct=bn_correct)
    phases = list(first.phases)
    for b in members[1:]:
        phases += [p.model_copy(update={"stage": "growth"}) for p in b.manifest.phases]
    phases += [result.phase] if result.phase is not None else []
    recorded = next((b.manifest.data for b in members if b.manifest.data is not None),
                    result.data)
    options = {"factor": g, "tiling": tiling, "init": init, "method": method, "seed": seed,
               "noise": noise, "bn_correct": bn_correct}
    if result.phase is not None:  # what the growth step read
        options |= {"batch_size": batch_size, "growth_steps": steps, "data": result.data.spec,
                    "train_size": result.data.train_size}
    if recorded is not None and recorded is result.data:  # the first data recorded: the
        arch = arch.model_copy(update={"input_size": recorded.input_size})  # size counted
    manifest = first.derived("fuse", options, tuple(b.parent() for b in members), arch=arch,
                             mixing=mixing, data=recorded, phases=tuple(phases), growth=growth)
    return Grown(manifest, result.tensors, result.notes, result.sources)


def _bn_corrected(arch: ArchSpec, mixing: MixingSpec | None, tensors: dict[str, torch.Tensor],
                  members: list[Bundle], gen: torch.Generator, srcs: Sources
                  ) -> dict[str, torch.Tensor]:
    """Return `tensors` with the BN running statistics corrected (growth.norms, data-free),
    each channel block against the member block its statistics were carried from (`srcs`:
    the map the method that built the grid used)."""
    model = empty(arch, mixing)
    model.load_state_dict(tensors, strict=True)
    correct_norms(model, [b.model() for b in members],
                  (arch.in_channels, arch.input_size, arch.input_size), gen, sources=srcs)
    stats = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.endswith((".running_mean", ".running_var"))}
    return {**tensors, **stats}


def _data_driven(name: str) -> Callable[[Job], Result]:
    def run(job: Job) -> Result:
        state, srcs = plain_state(job.members[0]), block_sources(grid_size(job.skeleton), 1)
        result = datadriven.grow(name, job, state, common([state], job.skeleton, srcs,
                                                          head_name(job.skeleton)))
        result.sources = srcs
        return result
    run.__doc__ = f"{name}: see mgrow.growth.datadriven."
    return run


METHODS: dict[str, Callable[[Job], Result]] = {
    "mixture": mixture, "random": random_growth, "net2net": net2net,
    "gradmax": _data_driven("gradmax"), "firefly": _data_driven("firefly"),
}
NAMES = (*METHODS, "zero")  # zero growth follows an observed plan (growth.traced), as every
# method does on a builder's network
DATA_METHODS = ("gradmax", "firefly")  # the methods that read training data
DEFAULT_NOISE = {"net2net": 0.01, "gradmax": 1e-5, "firefly": 0.01}  # --noise when not given
