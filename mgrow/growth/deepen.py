"""Depth growth: new blocks in a trained WRN, ResNet or VGG, its function kept.

New blocks go at the end of a stage, where input and output widths agree and the stride is
1, so their shortcut is the identity; each starts as the identity map because its residual
branch outputs exactly zero, and the logits are unchanged bit for bit:
- zero: the block freshly initialised (as `build` initialises), its last weight zero:
  WRN's pre-activation block ends in a conv (its weight, or coefficients, zero); ResNet's
  post-activation block ends in a BN (scale and shift zero, torchvision's
  zero_init_residual: a zero conv before a BN would give its shift, not zero);
- copy (plain networks): the stage's last block copied, then its residual output zeroed
  as above (LEMON's depth expansion; in a WRN that zeroes the copy's second conv);
- mixture (template-mixed networks): each new layer mixes templates its stage already
  learned with a new coefficient vector per tile, orthogonal to the vectors of the layers
  that use them and at their mean norm; the residual output zeroed as above;
- identity (VGG, the one init of a plain stack: Net2DeeperNet): a new conv, BN, ReLU after
  the stage's last one, the conv a centred one-hot kernel (template-mixed: one of its own
  templates, on the diagonal tiles), the BN the identity in eval mode. Its input is a
  ReLU's output, so the ReLU keeps it: the eval-mode function is kept to rounding (about
  1e-7). In training mode the new BN normalises by the batch's statistics, so the first
  training step does not start from the same function (what Net2DeeperNet notes for BN).

Banks: the deeper net is built from its ArchSpec, so its banks are what Builder's rule
makes (pairs of consecutive same-shape layers). A new layer that follows an unpaired old
layer of its shape joins that layer's bank (the bank gains the new layer's templates; the
old layer's coefficients over them are zero); other new layers get banks of their own,
under mixture filled with copies of the templates of the stage's nearest bank of their
shape (the rest, if larger, fresh).

Builders' residual networks (torchvision:, timm:) deepen by zero or copy along the stages
arch.stages finds; a template-mixed twin deepens as the plain network it computes, then is
decomposed again (mixing.decompose) keeping every bank whose layers are unchanged, and its
coefficients, bit-equal (a bank that now also serves a new layer is decomposed afresh).
A twin's default, mixture, then gives the new blocks' layers coefficients over the stage's
templates as above and zeroes those of each layer that ends a residual branch.

Owns `deepen`, `INITS`. Imports mgrow.arch, bundle, errors, footprint, limits, manifest,
mixing and growth.traced (a twin's plain network).
"""

from __future__ import annotations

import torch

from ..arch import block_paths, build, deepened, depths, empty, is_traced, same_blocks
from ..arch.stages import extend, find_stages, zero_residual
from ..bundle import Bundle
from ..errors import MgrowError
from ..footprint import estimate
from ..limits import check_memory
from ..manifest import Manifest
from ..mixing import MixedLayer, decompose, mixed_layers
from .traced import plain_network, probe_logits

INITS = ("zero", "copy", "mixture", "identity")
TOLERANCE = 1e-5  # logits' relative error a deepened net may show (residual nets: 0)
MAX_NOTES = 32  # of what was zeroed (or could not be orthogonal), kept in the lineage


def deepen(bundle: Bundle, blocks: int, stage: int | str | None = None,
           init: str | None = None, seed: int = 0) -> tuple[Manifest, dict[str, torch.Tensor],
                                                           list[str]]:
    """Return the manifest, tensors and notes of `bundle` with `blocks` new blocks at the end
    of stage `stage` (1-based; "all": every stage; None: the last). `init` None: identity
    for VGG, mixture for a template-mixed residual net, zero for a plain one."""
    man, where = bundle.manifest, bundle.path
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise MgrowError(f"--blocks takes a whole number >= 1, not {blocks!r}")
    if is_traced(man.arch.name):
        return _traced(bundle, blocks, stage, init or ("mixture" if man.mixing else "zero"),
                       seed)
    old = depths(man.arch)
    stack = man.arch.name == "vgg11_bn"  # no residual: only the identity keeps the function
    init = init or ("identity" if stack else "mixture" if man.mixing else "zero")
    if init not in INITS:
        raise MgrowError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    if stack != (init == "identity"):
        raise MgrowError(f"{where}: --init identity (Net2DeeperNet) is the one way to deepen a "
                         "plain stack (VGG)" if stack else "--init identity is for a plain "
                         "stack (VGG): a residual block x + f(x) is the identity when f is 0 "
                         "(use zero, copy or mixture)")
    if init == "mixture" and man.mixing is None:
        raise MgrowError(f"{where}: plain; --init mixture mixes a template-mixed net's "
                         "templates (use zero or copy, or `mgrow convert` it first)")
    if init == "copy" and man.mixing is not None:
        raise MgrowError(f"{where}: template-mixed; --init copy deepens a plain net (use "
                         "mixture: new layers from the stage's learned templates)")
    stages = _stages(stage, len(old))
    arch = deepened(man.arch, tuple(n + blocks * (s in stages) for s, n in enumerate(old)))
    source, model = bundle.model().eval(), build(arch, man.mixing, seed=seed).eval()
    olds, news = block_paths(man.arch), block_paths(arch)
    state = model.state_dict()
    _carry(source, model, state, same_blocks(man.arch, arch))
    gen = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    added = tuple(p for s in stages for p in news[s][len(olds[s]):])
    for s in stages:
        for path in news[s][len(olds[s]):]:
            if init == "identity":
                _identity(model, state, path)
                continue
            if init == "copy":
                _copy(state, news[s][len(olds[s]) - 1], path, s)
            elif init == "mixture":
                notes += _mix(model, state, path, news[s][:len(olds[s])], gen, added)
            _zero_residual(model, state, path, arch.name.startswith("wrn-"))
    with torch.no_grad():
        model.load_state_dict(state)
    _check_kept(source, model, arch)
    options = {"blocks": blocks, "stages": [s + 1 for s in stages], "init": init,
               "seed": seed, "depths": list(depths(arch)), "notes": notes[:MAX_NOTES]}
    manifest = man.derived("deepen", options, (bundle.parent(),), arch=arch)
    return manifest, {k: v.detach().clone() for k, v in model.state_dict().items()}, notes


def _traced(bundle: Bundle, blocks: int, stage: int | str | None, init: str,
            seed: int) -> tuple[Manifest, dict[str, torch.Tensor], list[str]]:
    """deepen for a builder's network: copies of a stage's last block (arch.stages)."""
    man = bundle.manifest
    if init not in ("zero", "copy", "mixture"):
        raise MgrowError(f"--init {init}: a builder's residual network deepens by zero "
                         "(fresh blocks), copy or mixture (a twin's)")
    if init == "mixture" and man.mixing is None:
        raise MgrowError(f"{bundle.path}: plain; --init mixture mixes a template-mixed net's "
                         "templates (use zero or copy, or `mgrow convert` it first)")
    source = bundle.model().eval()
    model = source if man.mixing is None else plain_network(source, man.arch)
    stages = find_stages(model)
    if not stages:
        raise MgrowError(f"{man.arch.name}: no stage of residual blocks (an nn.Sequential of "
                         "blocks of one class) to deepen")
    chosen = _stages(stage, len(stages), [p for p, _ in stages])
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # each chosen stage's last
    hooks = [stages[s][1][-1].register_forward_hook(  # block's input and output
        lambda _m, x, y, s=s: seen.__setitem__(s, (x[0] if len(x) == 1 else None, y)))
        for s in chosen]
    want = probe_logits(model, man.arch)
    for h in hooks:
        h.remove()
    for s in chosen:
        x, y = seen.get(s, (None, None))
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise MgrowError(f"{stages[s][0]}: its blocks do not take and give one tensor "
                             "(or the probe did not reach them); cannot deepen it")
        if x.shape != y.shape:
            last = stages[s][1][-1]
            raise MgrowError(f"{stages[s][0]}: its last block ({type(last).__name__}) changes "
                             f"the shape {tuple(x.shape[1:])} -> {tuple(y.shape[1:])}, so a "
                             "copy of it cannot follow it: choose another --stage")
    olds = [[_child(p, n) for n, _ in m.named_children()] for p, m in stages]
    new = tuple(len(m) + blocks * (s in chosen) for s, (_, m) in enumerate(stages))
    arch = man.arch.model_copy(update={"depths": new})
    size = (2, arch.in_channels, arch.input_size, arch.input_size)  # sized first: the deeper
    need = estimate(build(arch, None, meta=True), size).need(False)  # net beside the bundle
    check_memory(need + sum(t.numel() * t.element_size() for t in bundle.tensors.values()),
                 f"deepening {man.describe()} to {'-'.join(map(str, new))} blocks")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        added = extend(model, new, fresh=init != "copy")
    notes, zeroed, stage_of = [], [], {}
    for path in added:
        s = stage_of[path] = next(k for k, (p, _) in enumerate(stages)
                                  if path.startswith(p + "."))
        ends = zero_residual(model.get_submodule(path), seen[s][1], path)
        zeroed += [f"{path}.{e}" for e in ends]
        notes.append(f"{path}: zeroed {', '.join(ends)}")
    _compare(want, probe_logits(model, man.arch))
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    if man.mixing is not None:  # the deeper twin: the source's banks and coefficients kept
        deep = build(arch, man.mixing, meta=True)  # bit-equal wherever a bank serves the
        tensors = decompose(deep, tensors, torch.Generator().manual_seed(seed),  # same
                            keep=(source, bundle.tensors))  # layers; new ones decomposed
        twin = empty(arch, man.mixing, deep)
        if init == "mixture":  # new layers mixed from the stage's learned templates
            notes += _mix_twin(twin, tensors, added, [olds[stage_of[p]] for p in added],
                               zeroed, torch.Generator().manual_seed(seed))
        twin.load_state_dict(tensors)
        _compare(want, probe_logits(twin.eval(), man.arch))
    options = {"blocks": blocks, "stages": [s + 1 for s in chosen], "init": init,
               "seed": seed, "depths": list(new), "notes": notes[:MAX_NOTES]}
    manifest = man.derived("deepen", options, (bundle.parent(),), arch=arch)
    return manifest, tensors, notes


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _mix_twin(twin: torch.nn.Module, tensors: dict[str, torch.Tensor], added: list[str],
              stage_blocks: list[list[str]], zeroed: list[str], gen: torch.Generator
              ) -> list[str]:
    """--init mixture of a deeper twin: each new block's layers get coefficients over
    templates its stage learned (as _mix does for mgrow's families), then every layer that
    ends a new block's residual branch gets zero coefficients again, so the branch outputs
    zero. Only new layers' coefficients and banks serving new layers only change."""
    mixed, notes = mixed_layers(twin), []
    new = [k for k in mixed if any(k.startswith(p + ".") for p in added)]
    for name in new:  # written in place below: never the bundle's own tensors
        tensors[f"{name}.alpha"] = tensors[f"{name}.alpha"].clone()
        bank = f"banks.{mixed[name].bank_index}"
        tensors[bank] = tensors[bank].clone()
    for path, blocks in zip(added, stage_blocks):
        notes += _mix(twin, tensors, path, blocks, gen, tuple(added))
    for end in zeroed:
        if end in mixed:
            tensors[f"{end}.alpha"].zero_()
    return notes


def _stages(stage: int | str | None, count: int, names: list[str] | None = None) -> list[int]:
    """Return the 0-based stages `--stage` names."""
    if stage is None or stage == "last":
        return [count - 1]
    if stage == "all":
        return list(range(count))
    try:
        s = int(stage)
    except (TypeError, ValueError):
        s = 0
    if isinstance(stage, bool) or not 1 <= s <= count or str(s) != str(stage).strip():
        named = f" ({', '.join(names)})" if names else ""
        raise MgrowError(f"--stage {stage!r}: expected 1..{count}{named}, last or all")
    return [s - 1]


def _renamed(key: str, rename: dict[str, str]) -> str:
    """Return a module path or state key under its block's new path."""
    parts = key.split(".")
    head = ".".join(parts[:2])
    return rename[head] + key[len(head):] if head in rename else key


def _carry(source: torch.nn.Module, model: torch.nn.Module, state: dict[str, torch.Tensor],
           rename: dict[str, str]) -> None:
    """Write every tensor of `source` into `state` (the deeper net's) at its new place. A
    bank that gained new layers' templates keeps the old ones first; the old layers'
    coefficients over the new templates are zero."""
    old_mixed, new_mixed = mixed_layers(source), mixed_layers(model)

    def repaired(name: str) -> MgrowError:
        return MgrowError(f"{name}: the new blocks would change which layers share a "
                          "template bank (a bank pairs two consecutive layers of one shape "
                          "across the stage's end); deepen another stage, or the plain net")
    banks: dict[int, int] = {}  # new bank -> the old bank it extends
    for name, layer in old_mixed.items():
        new = new_mixed[_renamed(name, rename)]
        if banks.setdefault(new.bank_index, layer.bank_index) != layer.bank_index:
            raise repaired(name)  # two old banks in one new one
    for new_index, old_index in banks.items():  # an old bank split, or not leading its new one
        olds = [k for k, v in old_mixed.items() if v.bank_index == old_index]
        news = [k for k, v in new_mixed.items() if v.bank_index == new_index]
        if [_renamed(k, rename) for k in olds] != news[:len(olds)]:
            raise repaired(olds[-1])
    new_of = {old: new for new, old in banks.items()}
    for key, value in source.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner == "banks":
            target = state[f"banks.{new_of[int(leaf)]}"]
        else:
            target = state[_renamed(key, rename)]
        if owner == "banks" or owner in old_mixed and leaf == "alpha":
            axis = 1 if owner == "banks" else -1  # the templates' axis
            if owner != "banks":
                target.zero_()  # an old layer's coefficients over a new layer's templates
            target.narrow(axis, 0, value.shape[axis]).copy_(value)
        else:
            target.copy_(value)


def _identity(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Make VGG's new conv `path` (and the BN after it) the identity (Net2DeeperNet): a
    centred one-hot kernel per channel, bias 0; BN running mean 0, variance 1, scale
    sqrt(1 + eps), shift 0, so that in eval mode it passes its input through (to rounding).
    The ReLU after it keeps that input, itself the output of a ReLU, unchanged."""
    conv = model.get_submodule(path)
    head, _, i = path.rpartition(".")
    bn = model.get_submodule(f"{head}.{int(i) + 1}")
    if isinstance(conv, MixedLayer):  # the identity tile as one of its own templates
        o, _, k, _ = conv.tile_shape
        peers = [n for n, v in mixed_layers(model).items() if v.bank_index == conv.bank_index]
        t = state[f"{path}.alpha"].shape[-1] // len(peers)  # templates each layer brings
        slot = peers.index(path) * t
        state[f"banks.{conv.bank_index}"][:, slot] = _eye(o, k)
        alpha = state[f"{path}.alpha"]
        alpha.zero_()
        alpha[range(len(alpha)), range(len(alpha)), slot] = 1.0  # diagonal tiles only
    else:
        state[f"{path}.weight"].copy_(_eye(conv.out_channels, conv.kernel_size[0]))
    if conv.bias is not None:
        state[f"{path}.bias"].zero_()
    prefix = f"{head}.{int(i) + 1}"
    state[f"{prefix}.running_mean"].zero_()
    state[f"{prefix}.running_var"].fill_(1.0)
    state[f"{prefix}.weight"].fill_((1.0 + bn.eps) ** 0.5)
    state[f"{prefix}.bias"].zero_()


def _eye(channels: int, k: int) -> torch.Tensor:
    """Return the (channels, channels, k, k) kernel that passes every channel through."""
    w = torch.zeros(channels, channels, k, k)
    w[range(channels), range(channels), k // 2, k // 2] = 1.0
    return w


def _copy(state: dict[str, torch.Tensor], last: str, path: str, stage: int) -> None:
    """Copy block `last` (the stage's last old block) into the new block `path`."""
    keys = [k for k in state if k.startswith(path + ".")]
    for key in keys:
        src = last + key[len(path):]
        if src not in state or state[src].shape != state[key].shape or \
                len(keys) != sum(k.startswith(last + ".") for k in state):
            raise MgrowError(f"--init copy: stage {stage + 1}'s last block ({last}) changes "
                             "the width or resolution, so no block of the new one's shape "
                             "exists to copy; use --init zero")
        state[key].copy_(state[src])


def _zero_residual(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str,
                   pre_activation: bool) -> None:
    """Make the residual branch of block `path` output exactly zero: the last conv's weight
    of a pre-activation (WRN) block; the last BN's scale and shift of a ResNet block."""
    block = model.get_submodule(path)
    if pre_activation:
        leaf = "alpha" if isinstance(block.conv2, MixedLayer) else "weight"
        state[f"{path}.conv2.{leaf}"].zero_()
        return
    bn = "bn3" if hasattr(block, "bn3") else "bn2"
    state[f"{path}.{bn}.weight"].zero_()
    state[f"{path}.{bn}.bias"].zero_()


def _mix(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str,
         stage_blocks: list[str], gen: torch.Generator, added: tuple[str, ...] = ()
         ) -> list[str]:
    """Give the new block `path`'s layers coefficients over templates the stage learned.
    `added`: every new block (a bank shared with an old layer outside the stage is left as
    it is: its templates are that layer's)."""
    mixed, notes = mixed_layers(model), []
    new = [k for k in mixed if k.startswith(path + ".")]
    old = [k for k in mixed if any(k.startswith(p + ".") for p in stage_blocks)]
    fresh = {k for k in mixed if any(k.startswith(p + ".") for p in (path,) + added)}
    for name in new:
        layer = mixed[name]
        peers = [k for k, v in mixed.items() if v.bank_index == layer.bank_index]
        known = [k for k in peers if k in old]
        if not known and any(k not in fresh for k in peers):
            notes.append(f"{name}: shares a bank with a layer outside its stage; kept as "
                         "decomposed")
            continue
        if not known:  # a bank of new layers only: start it as the nearest learned one
            like = [k for k in old if type(mixed[k]) is type(layer)
                    and mixed[k].tile_shape == layer.tile_shape]
            if not like:
                notes.append(f"{name}: no learned bank of its shape in its stage; fresh")
                continue
            src = mixed[like[-1]].bank_index
            bank, given = state[f"banks.{layer.bank_index}"], state[f"banks.{src}"]
            n = min(bank.shape[1], given.shape[1])
            bank[:, :n] = given[:, :n]
            known = [k for k, v in mixed.items() if v.bank_index == src and k in old]
        earlier = [k for k in peers if k in new and peers.index(k) < peers.index(name)]
        alpha = state[f"{name}.alpha"]
        refs = [_fit(state[f"{k}.alpha"], alpha.shape[-1]) for k in known + earlier]
        alpha.copy_(_orthogonal(refs, alpha.shape, gen))
        if len(refs) >= alpha.shape[-1]:
            notes.append(f"{name}: its bank has no direction left orthogonal to the "
                         "layers using it; random")
    return notes


def _fit(alpha: torch.Tensor, t: int) -> torch.Tensor:
    """Return coefficients (g_out, g_in, T) as (1, g_out, g_in, t): cut or zero-padded."""
    out = alpha.new_zeros(*alpha.shape[:2], t)
    n = min(t, alpha.shape[-1])
    out[..., :n] = alpha[..., :n]
    return out.unsqueeze(0)


def _orthogonal(refs: list[torch.Tensor], shape: torch.Size, gen: torch.Generator
                ) -> torch.Tensor:
    """Return coefficients of `shape` (g_out, g_in, t): per tile a random vector
    orthogonal to the tile's vectors in `refs`, at their mean norm (1 without any)."""
    draw = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if not refs:
        return (draw / draw.norm(dim=-1, keepdim=True)).float()
    r = torch.cat(refs, 0).double().permute(1, 2, 0, 3)  # (g_out, g_in, n, t)
    norm = r.norm(dim=-1).mean(-1, keepdim=True)  # (g_out, g_in, 1)
    q, _ = torch.linalg.qr(r.transpose(-1, -2))  # (g_out, g_in, t, n): the span of refs
    rest = draw - (q @ (q.transpose(-1, -2) @ draw.unsqueeze(-1))).squeeze(-1)
    short = rest.norm(dim=-1, keepdim=True) < 1e-6 * draw.norm(dim=-1, keepdim=True)
    rest = torch.where(short, draw, rest)  # no direction left: random
    return (rest / rest.norm(dim=-1, keepdim=True) * norm.clamp_min(1e-12)).float()


def _check_kept(source: torch.nn.Module, model: torch.nn.Module, arch) -> None:
    """Refuse a deepened net whose logits differ from its source's on a probe batch."""
    _compare(probe_logits(source, arch), probe_logits(model, arch))


def _compare(a: torch.Tensor, b: torch.Tensor) -> None:
    err = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
    if not err <= TOLERANCE:
        raise MgrowError(f"internal: the deepened net's logits moved by {err:.2e} (relative); "
                         "nothing written")
