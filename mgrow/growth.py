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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import MgrowError
from .arch import build
from .bundle import Bundle, check_tensors
from .manifest import Growth, Manifest, MixingSpec
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
    return float(existing.norm(dim=1).mean()) if len(existing) else 1.0


def init_orthogonal(existing: Vectors, sources: Vectors, gen: torch.Generator
                    ) -> tuple[Vectors, str | None]:
    """New vectors orthonormal to each other and to the existing ones, at the existing norm.

    When more vectors are needed than the t - rank(existing) free directions, the rest are
    rows of fresh random orthogonal matrices (mutually orthogonal in chunks of t, not to
    the existing vectors), and a note says so.
    """
    n, t = sources.shape
    e = existing.shape[0]
    a = torch.randn(t, t, dtype=torch.float64, generator=gen)
    if e:
        q_e, _ = torch.linalg.qr(existing.T)  # (t, e): basis of the existing span
        a = a - q_e @ (q_e.T @ a)
    q, r = torch.linalg.qr(a)
    free = [q[:, k] for k in range(t) if abs(r[k, k]) > 1e-9 * t][: t - e]
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
METHODS = ("mixture", "random", "net2net")


@dataclass
class Grown:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def check_members(members: list[Bundle], factor: int, method: str) -> None:
    """Raise MgrowError (one line) unless the members can be fused this way."""
    if method not in METHODS:
        raise MgrowError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if factor < 2:
        raise MgrowError(f"--factor must be at least 2 (got {factor})")
    if not 1 <= len(members) <= 2:
        raise MgrowError("fuse takes one or two members")
    if method == "net2net" and len(members) > 1:
        raise MgrowError("--method net2net widens one network; give only A")
    for b in members:
        mix = b.manifest.mixing
        if b.manifest.growth is not None or (mix is not None and mix.factor > 1):
            raise MgrowError(f"{b.path}: already grown; fuse grows ungrown members only")
        if method == "mixture" and mix is None:
            raise MgrowError(f"{b.path}: a plain network; --method mixture needs template-"
                             "mixed members (run `mgrow convert` first)")
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
         noise: float | None = None) -> Grown:
    """Return the grown network (manifest and tensors) of one or two members."""
    check_members(members, factor, method)
    if method == "mixture" and init not in INITS:
        raise MgrowError(f"unknown --init {init!r}: expected one of {', '.join(INITS)}")
    if tiling not in ("vertical", "horizontal"):
        raise MgrowError(f"unknown --tiling {tiling!r}: expected vertical or horizontal")
    m, g = len(members), factor
    first = members[0].manifest
    noise = (0.01 if method == "net2net" else 0.0) if noise is None else noise
    if not (0 <= noise < float("inf")):
        raise MgrowError(f"--noise must be a finite number >= 0, not {noise:g}")
    spec = first.mixing or MixingSpec()
    arch = first.arch.widened(g)
    skeleton_mix = spec.model_copy(update={"factor": g, "members": m, "tiling": tiling,
                                           "freeze_edges": False})
    try:
        skeleton = build(arch, skeleton_mix, meta=True)
    except ValueError as e:
        raise MgrowError(f"cannot grow {first.describe()} by {g}: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    if method == "mixture":
        tensors, notes = _mixture(members, skeleton, init, noise, gen)
        mixing = skeleton_mix
    else:
        sources = [_plain(b) for b in members]
        tensors = (_net2net(sources[0], skeleton, g, noise, gen) if method == "net2net"
                   else _random(sources, skeleton, gen))
        notes, mixing = [], None
    check_tensors(build(arch, mixing, meta=True), tensors, "grown network")  # an invariant
    growth = Growth(method=method, init=init if method == "mixture" else None, factor=g,
                    members=m, tiling=tiling, seed=seed, noise=noise, rank_notes=tuple(notes))
    phases = list(first.phases)
    for b in members[1:]:
        phases += [p.model_copy(update={"stage": "growth"}) for p in b.manifest.phases]
    data = next((b.manifest.data for b in members if b.manifest.data is not None), None)
    options = {"factor": g, "tiling": tiling, "init": init, "method": method, "seed": seed,
               "noise": noise}
    manifest = first.derived("fuse", options, tuple(b.parent() for b in members), arch=arch,
                             mixing=mixing, data=data, phases=tuple(phases), growth=growth)
    return Grown(manifest, tensors, notes)


def _plain(bundle: Bundle) -> dict[str, torch.Tensor]:
    if bundle.manifest.mixing is None:
        return bundle.tensors
    return plain_state_dict(bundle.model())


def _blocks(parts: list[torch.Tensor], g: int) -> torch.Tensor:
    """Return member tensors concatenated into g channel blocks, block j from member j mod m."""
    return torch.cat([parts[j % len(parts)] for j in range(g)])


def _common(states: list[dict[str, torch.Tensor]], skeleton: torch.nn.Module, g: int,
            head: str) -> dict[str, torch.Tensor]:
    """Return the grown norm layers and biases (blocks per member; the classifier's mean)."""
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
            out[key] = _blocks(parts, g)
        assert out[key].shape == ref.shape, key
    return out


def _head(skeleton: torch.nn.Module) -> str:
    return next(n for n, layer in mixed_layers(skeleton).items() if layer.role == "head")


def _mixture(members: list[Bundle], skeleton: torch.nn.Module, init: str, noise: float,
             gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[str]]:
    m = len(members)
    states = [b.tensors for b in members]
    head = _head(skeleton)
    out = _common(states, skeleton, _g(skeleton), head)
    for n in range(len(skeleton.banks)):
        out[f"banks.{n}"] = torch.cat([s[f"banks.{n}"] for s in states])  # (m, t, o, i, *k)
    layers = mixed_layers(skeleton)
    alphas = {name: torch.zeros(layer.alpha.shape, dtype=torch.float64)
              for name, layer in layers.items()}  # (g_out, g_in, t)
    todo: dict[tuple[int, int], list[tuple[str, int, int]]] = {}  # (bank, owner) -> tiles
    for name, layer in layers.items():
        g_out, g_in = layer.grid
        for r in range(g_out):
            for c in range(g_in):
                j = carried(layer.role, r, c, m)
                if j is not None:
                    alphas[name][r, c] = states[j][f"{name}.alpha"][0, 0].double()
                else:
                    todo.setdefault((layer.bank_index, owner(layer, r, c, m)),
                                    []).append((name, r, c))
    notes = []
    for (n, j), tiles in sorted(todo.items()):
        names = [name for name, layer in layers.items() if layer.bank_index == n]
        existing = torch.stack([states[j][f"{name}.alpha"][0, 0].double() for name in names])
        sources = torch.stack([states[j][f"{name}.alpha"][0, 0].double()
                               for name, _, _ in tiles])
        kwargs = {"noise": noise} if init == "copy" else {}
        new, note = INITS[init](existing, sources, gen, **kwargs)
        if note:
            notes.append(f"bank {n} (member {j}, layers {', '.join(names)}): {note}")
        for (name, r, c), vec in zip(tiles, new):
            alphas[name][r, c] = vec
    for name, a in alphas.items():
        if name == head:
            a = a / m  # the classifier averages the members: exact for m = 1, 2 (powers of 2)
        out[f"{name}.alpha"] = a.float()
    return out, notes


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


def _random(states: list[dict[str, torch.Tensor]], skeleton: torch.nn.Module,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
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

    return {**_common(states, skeleton, g, _head(skeleton)), **_tile_weights(skeleton, states, fill)}


def _net2net(state: dict[str, torch.Tensor], skeleton: torch.nn.Module, g: int, noise: float,
             gen: torch.Generator) -> dict[str, torch.Tensor]:
    def fill(name: str, layer: MixedLayer, r: int, c: int, member: torch.Tensor) -> torch.Tensor:
        jitter = torch.randn(member.shape, generator=gen) * (noise * float(member.std()))
        return member + jitter

    out = {**_common([state], skeleton, g, _head(skeleton)),
           **_tile_weights(skeleton, [state], fill)}
    for name, layer in mixed_layers(skeleton).items():
        if layer.grid[1] > 1:  # inputs replicated g times: divide to keep the function
            out[f"{name}.weight"] = out[f"{name}.weight"] / layer.grid[1]
    return out


def fuse_files(a: str | Path, b: str | Path | None, output: str | Path, *, force: bool = False,
               **options) -> tuple[Path, Grown]:
    """Fuse bundle files into a grown bundle at `output`; return its path and the result."""
    from .bundle import check_writable, load, save
    check_writable(output, force)
    members = [load(a)] + ([load(b)] if b is not None else [])
    grown = fuse(members, **options)
    return save(output, grown.manifest, grown.tensors, force), grown
