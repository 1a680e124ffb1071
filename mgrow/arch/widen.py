"""Width growth of any traced network: discover every channel layout, then grow every axis.

A network written as ordinary PyTorch code (a torchvision or timm classifier) wires its
layers in Python: residual additions, concatenations, channel shuffles, flattens,
squeeze-excitation products. Rather than model each of those ops, `plan` *observes* them.
It runs a probe copy of the network (random weights, so that every channel is distinct)
twice: once as it is, recording what every leaf layer reads, and once while growing it
layer by layer in call order (a forward pre-hook grows a layer just before it runs). Every
layer's output channels are duplicated g times, interleaved (new channel j is old j // g);
its input layout is whatever arrives, and it is *found* by matching each arriving channel
to the old channel it equals. A concatenation, a shuffle or a flatten between two layers
is thereby handled without being named. Attention grows by whole heads at the same head
size. The result is a `Plan`: for every tensor, which old index each new index copies along
each grown axis, and whether that axis is read (fan-in: the copies share the old weight)
or produced (fan-out). `apply` carries any network of the same architecture through a plan
with a growth method; `plan` checks the duplicated probe computes the old logits and
refuses, naming the layer, where it does not.

Owns `plan` (the observation). Imports mgrow.errors, limits (the memory check) and
arch.plans (Plan, and the copy rule the probe is grown by).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MgrowError
from ..limits import check_memory
from .plans import Axis, Plan, grow_tensor, interleave

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ATTRS = ("hidden_dim", "embed_dim", "num_features", "head_hidden_size")  # widths read in forward
_BATCH = 4  # probe images
_SAMPLE = 512  # activation values per channel compared when matching


def _randomise(model: nn.Module, seed: int) -> None:
    """Give every tensor distinct random values, so that no two channels compute the same
    thing and none is dead after a ReLU: weights at fan-in scale with rows summing to zero,
    norm scales and variances positive, shifts small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if t.dim() >= 2:  # rows of zero sum: a channel stays centred on positive
                r = r - r.flatten(1).mean(1).view(-1, *[1] * (t.dim() - 1))  # inputs
                r = r / math.sqrt(t[0].numel())
            elif name.endswith(("running_var", "weight")):
                r = 0.5 + 0.5 * r.abs()
            else:
                r = 0.1 * r
            t.copy_(r)


class _NoDeadUnits(TorchFunctionMode):
    """Run rectifiers as leaky ones, and smooth gates (GELU, SiLU, ...) with a leaky term
    added: a probe channel that an activation flattens to (nearly) zero everywhere could
    not be told from another (Swin V2's MLP: GELU units at -1e-20 matched the wrong
    channel). Elementwise either way, so copies stay copies."""

    RECTIFIERS = {F.relu, torch.relu, torch.Tensor.relu, F.relu6, F.hardtanh}
    IN_PLACE = {torch.relu_, F.relu_, torch.Tensor.relu_, F.hardtanh_}
    SMOOTH = {F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.selu, F.celu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SMOOTH and not (kwargs or {}).get("inplace", False):
            return func(*args, **(kwargs or {})) + 0.1 * args[0]
        if func in self.RECTIFIERS or func in self.IN_PLACE:
            x = args[0]
            inplace = func in self.IN_PLACE or (kwargs or {}).get("inplace", False) or (
                func in (F.relu, F.relu6, F.hardtanh) and len(args) > 1 and args[-1] is True)
            return F.leaky_relu(x, 0.1, inplace=bool(inplace))
        return func(*args, **(kwargs or {}))


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)) or _packed(module):
        return x.dim() - 1
    if isinstance(module, nn.LayerNorm):
        return x.dim() - 1 if x.shape[-1] == module.normalized_shape[-1] else 1
    return 1


def _features(x: torch.Tensor, dim: int, pick: torch.Tensor | None) -> torch.Tensor:
    f = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1).double()
    return f[:, pick] if pick is not None else f


def _match(old: torch.Tensor, new: torch.Tensor, dim: int, where: str) -> torch.Tensor:
    """Return, for each channel of `new` along `dim`, the channel of `old` it equals.

    The probe runs in float64, so a copy differs from its source by ~1e-15 and two distinct
    channels by far more. Channels that are equal everywhere in the probe (the positions an
    adaptive pooling replicates, then flattened) are one class: its new channels are dealt
    to its old ones in order, round robin, which keeps a flatten's layout and every count.
    """
    per = old.numel() // old.shape[dim]
    if new.dim() != old.dim() or new.numel() // new.shape[dim] != per:
        raise MgrowError(f"{where}: its input changed shape beyond the channels "
                         f"({tuple(old.shape)} -> {tuple(new.shape)}); cannot grow it")
    pick = None
    if per > _SAMPLE:
        pick = torch.randperm(per, generator=torch.Generator().manual_seed(0))[:_SAMPLE]
    a, b = _features(old, dim, pick), _features(new, dim, pick)
    tol = 1e-9 * float(a.norm(dim=1).max().clamp_min(1e-300))
    # candidates by one random projection (sorted keys, a window of +-tol), then checked
    r = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(1), dtype=a.dtype)
    keys, order = (a @ r).sort()
    probe = b @ r
    lo = torch.searchsorted(keys, probe - tol)
    hi = torch.searchsorted(keys, probe + tol, right=True)
    index = order[lo.clamp_max(len(order) - 1)]
    ok = (hi > lo) & ((b - a[index]).norm(dim=1) <= tol)
    dealt: dict[int, int] = {}  # new channels dealt so far, by class (its first old channel)
    for j in (hi - lo > 1).nonzero().flatten().tolist():  # several keys in the window:
        cands = order[lo[j]:hi[j]]  # keep the old channels this one equals
        cands = cands[(a[cands] - b[j]).norm(dim=1) <= tol].sort().values
        ok[j] = len(cands) > 0
        if len(cands):  # a class of channels equal on the probe (replicated positions):
            k = dealt.get(int(cands[0]), 0)  # its new channels dealt to its old ones, in
            dealt[int(cands[0])] = k + 1  # order
            index[j] = cands[k % len(cands)]
    if not bool(ok.all()):
        lost = int((~ok).nonzero()[0])
        raise MgrowError(f"{where}: its grown input channel {lost} copies none of its old "
                         "input (an operation between layers mixes channels in a way mgrow "
                         "cannot follow); cannot grow this network")
    return index


class _Planner:
    def __init__(self, model: nn.Module, g: int) -> None:
        self.g, self.plan = g, Plan(g)
        self.names = {m: n for n, m in model.named_modules()}

    def tensor(self, module: nn.Module, attr: str, *axes: Axis) -> None:
        """Grow `module.attr` in place along `axes` and record them in the plan."""
        t = getattr(module, attr, None)
        if t is None:
            return
        name = f"{self.names[module]}.{attr}".lstrip(".")
        self.plan.axes[name] = list(axes)
        new = grow_tensor(t.detach(), list(axes), "net2net", 0.0, None)
        if isinstance(t, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            setattr(module, attr, new)

    def attrs(self, module: nn.Module, **values: object) -> None:
        self.plan.attrs.setdefault(self.names[module], {}).update(values)
        for k, v in values.items():
            setattr(module, k, v)

    def grow(self, module: nn.Module, x: torch.Tensor, old: torch.Tensor, head: bool) -> None:
        where = self.names[module] or "the network"
        dim = _channel_dim(module, old)
        inp = _match(old, x, dim, where)
        g = self.g
        cin = old.shape[dim]
        if isinstance(module, nn.MultiheadAttention):
            return self.attention(module, inp)
        if _packed(module):
            return self.packed(module, inp)
        if isinstance(module, _NORMS):
            return self.norm(module, inp, cin, where)
        if isinstance(module, nn.Linear):
            out = torch.arange(module.out_features) if head else interleave(
                module.out_features, g)
            self.tensor(module, "weight", Axis(0, out, "out"), Axis(1, inp, "in"))
            self.tensor(module, "bias", Axis(0, out, "out"))
            return self.attrs(module, in_features=len(inp), out_features=len(out))
        if isinstance(module, nn.modules.conv._ConvNd):
            return self.conv(module, inp, cin, head, where)
        raise MgrowError(f"{where}: layer type {type(module).__name__} holds weights mgrow "
                         "cannot grow")

    def conv(self, m: nn.Module, inp: torch.Tensor, cin: int, head: bool, where: str) -> None:
        if m.transposed:
            raise MgrowError(f"{where}: transposed convolutions are not grown")
        G, cout = m.groups, m.out_channels
        if G == 1:
            out = torch.arange(cout) if head else interleave(cout, self.g)
            self.tensor(m, "weight", Axis(0, out, "out"), Axis(1, inp, "in"))
            groups = 1
        else:  # grouped: every new input must come from its old group
            gi, go = cin // G, cout // G
            if head:
                raise MgrowError(f"{where}: a grouped convolution as the classifier")
            depthwise = gi == 1
            groups = len(inp) if depthwise else G
            ni = len(inp) // groups
            if not depthwise and bool(((inp // gi) != torch.arange(len(inp)) // ni).any()):
                raise MgrowError(f"{where}: its grown inputs leave their groups")
            if depthwise:  # output j reads input j // go: it follows its input
                out = (inp.repeat_interleave(go) * go + torch.arange(go).repeat(len(inp)))
            else:
                out = interleave(cout, self.g)
            local = inp % gi if not depthwise else None
            axes = [Axis(0, out, "out")]
            if local is not None:
                axes.append(Axis(1, local[:ni], "in"))
            self.tensor(m, "weight", *axes)
        self.tensor(m, "bias", Axis(0, out, "out"))
        self.attrs(m, in_channels=len(inp), out_channels=len(out), groups=groups)

    def norm(self, m: nn.Module, inp: torch.Tensor, cin: int, where: str) -> None:
        if isinstance(m, nn.GroupNorm):
            per = cin // m.num_groups
            if bool(((inp // per) != torch.arange(len(inp)) // (len(inp) // m.num_groups)).any()):
                raise MgrowError(f"{where}: its grown channels leave their groups")
            self.attrs(m, num_channels=len(inp))
        elif isinstance(m, nn.LayerNorm):
            self.attrs(m, normalized_shape=(*m.normalized_shape[:-1], len(inp)))
        else:
            self.attrs(m, num_features=len(inp))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            self.tensor(m, attr, Axis(0, inp, "chan"))

    def heads(self, h: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the head map, the inner (h x d) map and the packed q, k, v map."""
        d = e // h
        heads = torch.arange(h * self.g) // self.g  # whole heads duplicated, same head size
        inner = (heads[:, None] * d + torch.arange(d)).reshape(-1)
        return heads, inner, torch.cat([inner + k * e for k in range(3)])

    def packed(self, m: nn.Module, inp: torch.Tensor) -> None:
        e = m.qkv.in_features
        if m.qkv.out_features != 3 * e or m.proj.in_features != e:
            raise MgrowError(f"{self.names[m]}: attention whose qkv is not 3 x its width")
        heads, inner, qkv = self.heads(m.num_heads, e)
        out = interleave(m.proj.out_features, self.g)
        self.tensor(m.qkv, "weight", Axis(0, qkv, "out"), Axis(1, inp, "in"))
        self.tensor(m.qkv, "bias", Axis(0, qkv, "out"))
        self.tensor(m.proj, "weight", Axis(0, out, "out"), Axis(1, inner, "in"))
        self.tensor(m.proj, "bias", Axis(0, out, "out"))
        self.tensor(m, "relative_position_bias_table", Axis(1, heads, "chan"))
        self.tensor(m, "logit_scale", Axis(0, heads, "chan"))  # Swin V2: one per head
        cpb = getattr(m, "cpb_mlp", None)  # Swin V2: an MLP gives each head its position bias
        if isinstance(cpb, nn.Sequential) and isinstance(cpb[-1], nn.Linear):
            if cpb[-1].out_features != m.num_heads:
                raise MgrowError(f"{self.names[m]}: a position-bias MLP whose output is not "
                                 "one value per head")
            self.tensor(cpb[-1], "weight", Axis(0, heads, "out"))
            self.tensor(cpb[-1], "bias", Axis(0, heads, "out"))
            self.attrs(cpb[-1], out_features=len(heads))
        self.attrs(m.qkv, in_features=len(inp), out_features=len(qkv))
        self.attrs(m.proj, in_features=len(inner), out_features=len(out))
        self.attrs(m, num_heads=len(heads))
        if isinstance(getattr(m, "attn_dim", None), int):  # timm reads it in forward
            self.attrs(m, attn_dim=len(inner))

    def attention(self, m: nn.MultiheadAttention, inp: torch.Tensor) -> None:
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            raise MgrowError(f"{self.names[m]}: attention with separate or extra key/value "
                             "projections is not grown")
        heads, inner, qkv = self.heads(m.num_heads, m.embed_dim)
        out = interleave(m.embed_dim, self.g)
        self.tensor(m, "in_proj_weight", Axis(0, qkv, "out"), Axis(1, inp, "in"))
        self.tensor(m, "in_proj_bias", Axis(0, qkv, "out"))
        self.tensor(m.out_proj, "weight", Axis(0, out, "out"), Axis(1, inner, "in"))
        self.tensor(m.out_proj, "bias", Axis(0, out, "out"))
        self.attrs(m.out_proj, in_features=len(inner), out_features=len(out))
        self.attrs(m, embed_dim=len(out), kdim=len(out), vdim=len(out), num_heads=len(heads))


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention) + _NORMS


def _packed(m: nn.Module) -> bool:
    """Whether `m` is attention with a packed qkv Linear, a proj Linear and `num_heads`
    (torchvision's Swin and Swin V2 attention, timm's Attention): it grows as one layer,
    by heads (with a relative position table, or a per-head logit scale and position-bias
    MLP)."""
    return (isinstance(getattr(m, "num_heads", None), int) and
            isinstance(getattr(m, "qkv", None), nn.Linear) and
            isinstance(getattr(m, "proj", None), nn.Linear) and
            set(n for n, _ in m.named_parameters(recurse=False)) <=
            {"relative_position_bias_table", "logit_scale"})


def _attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or _packed(m)


def _layers(model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
    """Return the layers mgrow grows (attention counts as one) and the parameters owned by
    other modules (read by their code: class tokens, position embeddings, layer scales)."""
    inside = {id(c) for m in model.modules() if _attention(m)
              for c in m.modules() if c is not m}
    layers = [m for m in model.modules() if (isinstance(m, _LAYERS) or _packed(m))
              and id(m) not in inside]
    loose = [(m, n) for m in model.modules() if not isinstance(m, _LAYERS) and not _packed(m)
             and id(m) not in inside for n, _ in m.named_parameters(recurse=False)]
    return layers, loose


def plan(model: nn.Module, factor: int, example: torch.Tensor) -> Plan:
    """Return how `model` grows `factor` times wider, observed on a probe copy.

    Raises MgrowError, naming the layer, where a layer or an operation cannot be followed,
    or where the duplicated probe does not compute what the original computes.
    """
    if factor < 2:
        raise MgrowError(f"growth factor must be at least 2, not {factor}")
    size = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    biggest = max((sum(t.numel() for t in m.parameters()) for m in model.modules()
                   if m is not model and not any(True for _ in m.children())), default=size)
    # a float64 probe, grown one layer at a time (each layer's grown weights dropped once
    # it has run), beside the network's own float32 copy grown by the caller
    check_memory(size * 8 + biggest * 8 * factor * factor + size * 4 * factor * factor,
                 f"observing the growth of a network of {size:,} values by {factor}")
    probe = copy.deepcopy(model).double().eval()
    _randomise(probe, seed=0)
    gen = torch.Generator().manual_seed(0)  # a batch wide enough that no channel is all zero
    example = torch.randn((_BATCH, *example.shape[1:]), generator=gen, dtype=torch.float64)
    leaves, loose = _layers(probe)
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in leaves}
    hooks = [m.register_forward_pre_hook(lambda m, args, kw: seen[m].append(
        (args[0] if args else kw["query"]).detach().clone()), with_kwargs=True)
        for m in leaves]
    with torch.no_grad(), _NoDeadUnits():
        before = probe(example)
    for h in hooks:
        h.remove()
    if not isinstance(before, torch.Tensor):
        raise MgrowError("the network returns a " + type(before).__name__ + ", not logits")
    called = [m for m in leaves if seen[m]]
    twice = [m for m in called if len(seen[m]) > 1]
    names = {m: n for n, m in probe.named_modules()}
    if twice:
        raise MgrowError(f"{names[twice[0]]}: the layer runs {len(seen[twice[0]])} times per "
                         "forward pass; shared layers are not grown")
    idle = [m for m in leaves if not seen[m] and any(True for _ in m.parameters())]
    if idle:
        raise MgrowError(f"{names[idle[0]]}: holds weights but never runs as a layer "
                         "(its weights are read by its parent's code); cannot grow it")
    weighted = [m for m in called if not isinstance(m, _NORMS)]
    head = weighted[-1] if weighted else None
    planner = _Planner(probe, factor)
    for m, n in loose:  # parameters read by their parent's code: grown along their last
        t = getattr(m, n)  # axis of size > 1 (class tokens, position embeddings, scales)
        dims = [i for i, s in enumerate(t.shape) if s > 1]
        if dims:
            planner.tensor(m, n, Axis(dims[-1], interleave(t.shape[dims[-1]], factor), "chan"))
    for m in probe.modules():
        for a in _ATTRS:
            if isinstance(getattr(m, a, None), int) and m not in leaves:
                planner.attrs(m, **{a: getattr(m, a) * factor})

    def pre(m: nn.Module, args: tuple, kw: dict) -> None:
        x = args[0] if args else kw["query"]
        planner.grow(m, x, seen[m][0], head=m is head)

    def done(m: nn.Module, args: tuple, out: object) -> None:
        """Drop a layer's grown weights once it has run (it runs once): the grown probe is
        never whole in memory, only the layers not yet run and the one running."""
        for mod in m.modules():
            for n, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[n] = nn.Parameter(p.new_empty(0), requires_grad=False)

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in called] + \
        [m.register_forward_hook(done) for m in called]
    try:
        with torch.no_grad(), _NoDeadUnits():
            after = probe(example)
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise MgrowError(f"the grown network does not run: {str(e).splitlines()[0][:200]}"
                         ) from None
    finally:
        for h in hooks:
            h.remove()
    if after.shape != before.shape:
        raise MgrowError(f"the grown network returns shape {tuple(after.shape)}, not "
                         f"{tuple(before.shape)}")
    err = float((after - before).norm() / before.norm().clamp_min(1e-12))
    if not err <= 1e-9:
        raise MgrowError(f"the duplicated network does not compute the original's logits "
                         f"(relative error {err:.2g}); an operation mgrow cannot follow "
                         "sits between its layers")
    return planner.plan
