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
`gradmax` and `firefly` read a few batches of data (see mgrow.datagrowth); their growth
step's training FLOPs become a ledger row.

Growing again: a grown bundle is accepted as the only member. Its whole grid becomes the
carried region of the next one: a mixed net of factor G grows to factor G x g (tiles keep
the original member size, owners stay j mod m, the tiling must stay the same, the
classifier is not averaged again), so `--init zero` keeps its logits exactly. The plain
methods treat it as one plain member of its own width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import MgrowError
from . import limits as L
from .arch import build
from .bundle import Bundle, check_tensors
from .manifest import ArchSpec, DatasetSpec, Growth, Manifest, MixingSpec, Phase
from .mixing import MixedLayer, init_weight_, mixed_layers, plain_state_dict, random_orthogonal

Vectors = torch.Tensor  # (n, t) float64


def carried(role: str, r: int, c: int, m: int) -> int | None:
    """Return the member whose own layer tile (r, c) is, or None for a new tile."""
    if role == "stem":
        return r if r < m else None
    if role == "head":
        return c if c < m else None
    return r if r == c and r < m else None


def owner(layer: MixedLayer, r: int, c: int, m: int) -> int:
    """Return the member whose templates tile (r, c) is generated from."""
    return (r if layer.axis == "row" else c) % m


# -- coefficient initialisers: (existing (e, t), sources (n, t), generator) -> (new (n, t), note)

def _scale(existing: Vectors) -> float:
    """Return the mean norm of the existing vectors that are not zero (a regrown net's
    `--init zero` tiles are), 1.0 when there are none."""
    norms = existing.norm(dim=1)
    norms = norms[norms > 1e-12 * float(norms.max())] if len(norms) else norms
    return float(norms.mean()) if len(norms) else 1.0


def _span(existing: Vectors, t: int) -> torch.Tensor:
    """Return an orthonormal basis (t, rank) of the existing vectors' span: by SVD with a
    rank tolerance, as the vectors may be fewer, more than t, repeated or zero."""
    if not len(existing):
        return torch.zeros(t, 0, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(existing.T.double(), full_matrices=False)
    return u[:, s > 1e-9 * t * float(s[0])]  # none when every vector is zero


def init_orthogonal(existing: Vectors, sources: Vectors, gen: torch.Generator
                    ) -> tuple[Vectors, str | None]:
    """New vectors orthonormal to each other and to the existing ones, at the existing norm.

    When more vectors are needed than the t - rank(existing) free directions, the rest are
    rows of fresh random orthogonal matrices (mutually orthogonal in chunks of t, not to
    the existing vectors), and a note says so.
    """
    n, t = sources.shape
    basis = _span(existing, t)
    a = torch.randn(t, t, dtype=torch.float64, generator=gen)
    a = a - basis @ (basis.T @ a)
    q, r = torch.linalg.qr(a)
    free = [q[:, k] for k in range(t) if abs(r[k, k]) > 1e-9 * t][: t - basis.shape[1]]
    vecs = free[:n]
    note = None
    while len(vecs) < n:
        note = (f"{n} new vectors but only {len(free)} free directions in R^{t}: "
                f"{n - len(free)} drawn as random orthogonal rows")
        vecs += list(random_orthogonal(t, gen))[: n - len(vecs)]
    return torch.stack(vecs) * _scale(existing), note


def init_random(existing: Vectors, sources: Vectors, gen: torch.Generator
                ) -> tuple[Vectors, str | None]:
    """Standard normal vectors, scaled so their expected norm is the existing vectors'."""
    n, t = sources.shape
    return torch.randn(n, t, dtype=torch.float64, generator=gen) * _scale(existing) / t**0.5, None


def init_copy(existing: Vectors, sources: Vectors, gen: torch.Generator, noise: float = 0.0
              ) -> tuple[Vectors, str | None]:
    """The owner's own coefficients at that layer, plus `noise` x norm x standard normal."""
    jitter = torch.randn(sources.shape, dtype=torch.float64, generator=gen)
    return sources + noise * _scale(existing) / sources.shape[1] ** 0.5 * jitter, None


def init_zero(existing: Vectors, sources: Vectors, gen: torch.Generator
              ) -> tuple[Vectors, str | None]:
    """All zero: the grown network computes the mean of the members."""
    return torch.zeros_like(sources), None


INITS: dict[str, Callable[..., tuple[Vectors, str | None]]] = {
    "orthogonal": init_orthogonal, "random": init_random, "copy": init_copy, "zero": init_zero,
}


@dataclass
class Grown:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


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
    source: object | None = None  # phases.DataSource for the data-driven methods
    batch_size: int = 64
    steps: int = 8


@dataclass
class Result:
    """A method's output: tensors, whether they are template-mixed, notes, a ledger row."""

    tensors: dict[str, torch.Tensor]
    mixed: bool
    notes: list[str] = field(default_factory=list)
    phase: Phase | None = None  # the growth step's own training FLOPs (data methods)
    data: DatasetSpec | None = None  # the data the growth step read


def grid(bundle: Bundle) -> int:
    """Return the bundle's tile grid size: 1 for an ungrown (or plain) net."""
    mix = bundle.manifest.mixing
    return mix.factor if mix is not None else 1


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
         noise: float | None = None, source: object | None = None, batch_size: int = 64,
         steps: int = 8, bn_correct: bool = False) -> Grown:
    """Return the grown network (manifest and tensors) of one or two members.

    `source` (a phases.DataSource), `batch_size` and `steps` feed the data-driven methods;
    `bn_correct` corrects the BN running statistics without data (mgrow.norms).
    """
    check_members(members, factor, method)
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
              torch.Generator().manual_seed(seed), seed, source, batch_size, steps)
    result = METHODS[method](job)
    mixing = mixing if result.mixed else None
    check_tensors(build(arch, mixing, meta=True), result.tensors, "grown network")  # invariant
    if bn_correct:
        result.tensors = _bn_corrected(arch, mixing, result.tensors, members,
                                       torch.Generator().manual_seed(seed))
    growth = Growth(method=method, init=init if method == "mixture" else None, factor=g,
                    members=m, tiling=tiling, seed=seed, noise=noise,
                    rank_notes=tuple(result.notes), bn_correct=bn_correct)
    phases = list(first.phases)
    for b in members[1:]:
        phases += [p.model_copy(update={"stage": "growth"}) for p in b.manifest.phases]
    phases += [result.phase] if result.phase is not None else []
    data = next((b.manifest.data for b in members if b.manifest.data is not None), result.data)
    options = {"factor": g, "tiling": tiling, "init": init, "method": method, "seed": seed,
               "noise": noise, "bn_correct": bn_correct}
    if result.phase is not None:
        options |= {"batch_size": batch_size, "growth_steps": steps}
    manifest = first.derived("fuse", options, tuple(b.parent() for b in members), arch=arch,
                             mixing=mixing, data=data, phases=tuple(phases), growth=growth)
    return Grown(manifest, result.tensors, result.notes)


def _bn_corrected(arch: ArchSpec, mixing: MixingSpec | None, tensors: dict[str, torch.Tensor],
                  members: list[Bundle], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Return `tensors` with the BN running statistics corrected (mgrow.norms, data-free)."""
    from .norms import correct_norms
    model = build(arch, mixing, meta=True).to_empty(device="cpu")
    model.load_state_dict(tensors, strict=True)
    before = grid(members[0])  # > 1: a grown net grown again: its blocks keep their owners
    owners = members[0].manifest.mixing.members if before > 1 else 1
    correct_norms(model, [b.model() for b in members],
                  (arch.in_channels, arch.input_size, arch.input_size), gen, before=before,
                  owners=owners)
    stats = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.endswith((".running_mean", ".running_var"))}
    return {**tensors, **stats}


def _plain(bundle: Bundle) -> dict[str, torch.Tensor]:
    if bundle.manifest.mixing is None:
        return bundle.tensors
    return plain_state_dict(bundle.model())


def _blocks(parts: list[torch.Tensor], g: int) -> torch.Tensor:
    """Return member tensors concatenated into g channel blocks, block j from member j mod m."""
    return torch.cat([parts[j % len(parts)] for j in range(g)])


def _old_block(j: int, before: int, m: int) -> int:
    """Return which of a grown net's `before` blocks (owned in turn by its m members) block j
    of the regrown net starts from: itself if carried, else one of the same owner j mod m,
    as in a first fuse (the first `before` cut to a multiple of m, repeated: a 3-block grid
    of 2 members gives 0 1 2 | 1 0 1 ...)."""
    if j < before:
        return j
    cycle = before - before % m if before >= m else before
    return j % cycle


def _common(states: list[dict[str, torch.Tensor]], skeleton: torch.nn.Module, g: int,
            head: str, before: int = 1, m: int = 1) -> dict[str, torch.Tensor]:
    """Return the grown norm layers and biases (blocks per member; the classifier's mean).

    `before` > 1: the one member is itself a grid of `before` blocks owned in turn by `m`
    members, and block j of the grown net is its block _old_block(j, before, m).
    """
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
            blocks = [c for p in parts for c in p.chunk(before)]
            out[key] = torch.cat([blocks[_old_block(j, before, m)] for j in range(g)]) \
                if before > 1 else _blocks(blocks, g)
        assert out[key].shape == ref.shape, key
    return out


def _head(skeleton: torch.nn.Module) -> str:
    return next(n for n, layer in mixed_layers(skeleton).items() if layer.role == "head")


def _mixture(job: Job) -> Result:
    """MixtureGrowth: carried tiles kept, new tiles from existing templates (module doc)."""
    members, skeleton, init = job.members, job.skeleton, job.init
    states = [b.tensors for b in members]
    before = grid(members[0])  # > 1: growing a grown net again, alone
    m = len(members) if before == 1 else members[0].manifest.mixing.members
    head = _head(skeleton)
    out = _common(states, skeleton, _g(skeleton), head, before, m)
    for n in range(len(skeleton.banks)):
        out[f"banks.{n}"] = torch.cat([s[f"banks.{n}"] for s in states])  # (m, t, o, i, *k)
    layers = mixed_layers(skeleton)

    def kept(name: str, layer: MixedLayer, r: int, c: int) -> torch.Tensor | None:
        """Return the carried coefficient vector of tile (r, c), or None for a new tile."""
        if before > 1:
            g_out, g_in = states[0][f"{name}.alpha"].shape[:2]
            return states[0][f"{name}.alpha"][r, c].double() if r < g_out and c < g_in \
                else None
        j = carried(layer.role, r, c, m)
        return None if j is None else states[j][f"{name}.alpha"][0, 0].double()

    def source(name: str, layer: MixedLayer, r: int, c: int) -> torch.Tensor:
        """Return the owner's own coefficients at this layer (what `copy` copies)."""
        if before > 1:  # an old tile of the same owner
            a = states[0][f"{name}.alpha"]
            return a[_old_block(r, a.shape[0], m), _old_block(c, a.shape[1], m)].double()
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
    return Result(out, mixed=True, notes=notes)


def _g(skeleton: torch.nn.Module) -> int:
    return next(iter(mixed_layers(skeleton).values())).grid[0]


def _tile_weights(skeleton: torch.nn.Module, states: list[dict[str, torch.Tensor]],
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


def _random(job: Job) -> Result:
    """Carried tiles kept; every other tile a fresh plain weight (the wide layer's init)."""
    states, skeleton, gen = [_plain(b) for b in job.members], job.skeleton, job.gen
    g = _g(skeleton)
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

    tensors = {**_common(states, skeleton, g, _head(skeleton)),
               **_tile_weights(skeleton, states, fill)}
    return Result(tensors, mixed=False)


def _net2net(job: Job) -> Result:
    """Every unit replicated g times, tiles divided by the input replication, + noise."""
    state, skeleton, g, gen = _plain(job.members[0]), job.skeleton, _g(job.skeleton), job.gen

    def fill(name: str, layer: MixedLayer, r: int, c: int, member: torch.Tensor) -> torch.Tensor:
        jitter = torch.randn(member.shape, generator=gen) * (job.noise * float(member.std()))
        return member + jitter

    out = {**_common([state], skeleton, g, _head(skeleton)),
           **_tile_weights(skeleton, [state], fill)}
    for name, layer in mixed_layers(skeleton).items():
        if layer.grid[1] > 1:  # inputs replicated g times: divide to keep the function
            out[f"{name}.weight"] = out[f"{name}.weight"] / layer.grid[1]
    return Result(out, mixed=False)


def _data_driven(name: str) -> Callable[[Job], Result]:
    def run(job: Job) -> Result:
        from . import datagrowth
        return datagrowth.grow(name, job, _plain(job.members[0]),
                               _common([_plain(job.members[0])], job.skeleton, _g(job.skeleton),
                                       _head(job.skeleton)))
    run.__doc__ = f"{name}: see mgrow.datagrowth."
    return run


METHODS: dict[str, Callable[[Job], Result]] = {
    "mixture": _mixture, "random": _random, "net2net": _net2net,
    "gradmax": _data_driven("gradmax"), "firefly": _data_driven("firefly"),
}
DEFAULT_NOISE = {"net2net": 0.01, "firefly": 0.1}  # --noise when not given


def fuse_files(a: str | Path, b: str | Path | None, output: str | Path, *, force: bool = False,
               **options) -> tuple[Path, Grown]:
    """Fuse bundle files into a grown bundle at `output`; return its path and the result."""
    from .bundle import check_writable, load, save, writer_lock
    check_writable(output, force)
    with writer_lock(output):  # held from the start: a second writer is refused at once
        members = [load(a)] + ([load(b)] if b is not None else [])
        grown = fuse(members, **options)
        return save(output, grown.manifest, grown.tensors, force), grown
