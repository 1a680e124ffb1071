"""Networks from the builders users already hold: `torchvision:NAME` and `timm:NAME`.

The builder is called with `num_classes`, `in_chans` (timm) and the manifest's builder
options, never with pretrained weights: a checkpoint is something the user gives. A network
grown by g (`ArchSpec.width` = g, an integer) is rebuilt by growing the built one along the
plan mgrow.arch.widen observes, so a bundle alone rebuilds its model; a deepened one
(`ArchSpec.depths`) has its stages extended first (arch.stages).

Owns `is_traced`, `check_traced`, `check_options`, `build_traced`, `wider_builder`.
Imports mgrow.errors, manifest, mixing, arch.widen, arch.plans, arch.stages and arch.twins
(template-mixed twins); torchvision always, timm only when a timm name is asked for (`mgrow[timm]`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

import torch
from torch import nn

from ..errors import MgrowError
from ..manifest import ArchSpec, MixingSpec
from ..mixing import decompose
from .plans import apply
from .stages import extend
from .twins import init_twin, twin
from .widen import plan

PREFIXES = ("torchvision:", "timm:")


def is_traced(name: str) -> bool:
    """Whether `name` names a builder's network (torchvision:NAME or timm:NAME)."""
    return name.startswith(PREFIXES)


def _timm():
    if importlib.util.find_spec("timm") is None:
        raise MgrowError("timm: networks need the optional extra: pip install 'mgrow[timm]'")
    import timm
    return timm


def check_traced(name: str) -> str:
    """Return `name` if its builder exists, else raise a one-line MgrowError."""
    kind, _, model = name.partition(":")
    if kind == "torchvision":
        import torchvision
        known = torchvision.models.list_models(module=torchvision.models)
        if model not in known:
            raise MgrowError(f"unknown torchvision classifier {model!r} (see "
                             "torchvision.models.list_models(); for example "
                             "torchvision:resnet18, torchvision:convnext_tiny)")
    elif not _timm().is_model(model):
        raise MgrowError(f"unknown timm model {model!r} (see timm.list_models())")
    return name


@contextlib.contextmanager
def _weights_on_meta():
    """Move every parameter and buffer to the meta device as a module registers it, so a
    builder that computes its layout with tensors (torchvision's RegNet rounds widths with
    torch ops, which the meta device cannot read back) builds a shapes-only network with at
    most one layer's weights in memory at a time."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        register_parameter(self, name, param if param is None else nn.Parameter(
            param.to("meta"), requires_grad=param.requires_grad))

    def buffer(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor if tensor is None else tensor.to("meta"), persistent)
    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, \
            register_buffer


def _on_meta(arch: ArchSpec) -> nn.Module:
    """Return the builder's network on the meta device."""
    try:
        with torch.device("meta"):
            return _construct(arch)
    except MgrowError:  # a builder that reads tensors back while it plans its layers
        with _weights_on_meta():
            return _construct(arch)


def _construct(arch: ArchSpec) -> nn.Module:
    kind, _, model = arch.name.partition(":")
    options = dict(arch.options)
    if kind == "torchvision" and arch.in_channels != 3:
        raise MgrowError(f"{arch.name}: torchvision builders take 3 input channels, not "
                         f"{arch.in_channels}")
    if kind == "torchvision" and model.startswith("vit_"):  # the builder fixes its position
        options.setdefault("image_size", arch.input_size)  # embedding's size
    try:
        if kind == "torchvision":
            import torchvision
            return torchvision.models.get_model(model, weights=None,
                                                num_classes=arch.num_classes, **options)
        return _timm().create_model(model, pretrained=False, num_classes=arch.num_classes,
                                    in_chans=arch.in_channels, **options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise MgrowError(f"{arch.name}: the builder refused its options {options}: "
                         f"{str(e).splitlines()[0][:200]}") from None


def check_options(arch: ArchSpec) -> None:
    """Refuse (one line) a builder option that no function the builder calls takes as a
    named parameter: a builder with **kwargs (torchvision's MobileNetV3) swallows a typo,
    which would otherwise be recorded in the manifest and silently do nothing (a family's
    options are refused by build)."""
    if not arch.options or not is_traced(arch.name):
        return
    bound: set[str] = set()

    def seen(frame, event, _arg):
        if event == "call":
            code = frame.f_code
            names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            bound.update(k for k in arch.options if k in names and _same(
                frame.f_locals.get(k), arch.options[k]))
    old = sys.getprofile()
    sys.setprofile(seen)
    try:
        _on_meta(arch)
    finally:
        sys.setprofile(old)
    unused = [k for k in arch.options if k not in bound]
    if unused:
        raise MgrowError(f"{arch.name}: the builder takes no option "
                         f"{', '.join(map(repr, unused))} (it would be ignored); check the "
                         "name against the builder's signature")


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an array-like compared elementwise, say
        return a is b


# width options of builders (and their defaults): a grown net may be what one builds wider
WIDTH_OPTIONS = {"width_mult": 1.0, "alpha": 1.0, "width_per_group": 64,
                 "channel_multiplier": 1.0}


def wider_builder(arch: ArchSpec) -> dict | None:
    """Return the builder options (one width option multiplied by the growth factor) under
    which the builder itself makes a network with exactly the tensors of `arch`, a grown
    builder's network, so its plain state_dict loads strictly into the builder's own net;
    None when no width option does (torchvision's mobilenet_v2 x2 is
    mobilenet_v2(width_mult=2.0); a grown resnet18 has no such builder)."""
    if not is_traced(arch.name) or int(arch.width) < 2:
        return None
    return _wider(arch, build_traced(arch, meta=True))


def _wider(arch: ArchSpec, grown: nn.Module) -> dict | None:
    """wider_builder, given the grown network (any device)."""
    g = int(arch.width)
    if arch.depths is not None:  # the builder does not make the appended blocks
        return None
    want = {k: tuple(v.shape) for k, v in grown.state_dict().items()}
    for key, default in WIDTH_OPTIONS.items():
        options = {**arch.options, key: arch.options.get(key, default) * g}
        try:
            net = _on_meta(arch.model_copy(update={"width": 1.0, "options": options}))
        except MgrowError:
            continue
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == want:
            return options
    return None


def build_traced(arch: ArchSpec, seed: int = 0, meta: bool = False,
                 mixing: MixingSpec | None = None) -> nn.Module:
    """Return the network `arch` names, initialised by its builder (seeded) or on the meta
    device; at width g > 1, grown along the observed plan (mgrow.arch.widen) and, unless
    on the meta device, initialised afresh: as the builder's own wider network where one
    width option makes exactly these tensors (wider_builder: mobilenet_v2 x2 is
    width_mult=2.0), else by every layer's own `reset_parameters` (class tokens and
    position embeddings keep the builder's values, each copied g times).

    `mixing`: its template-mixed twin (arch.twins), with a grid of g x g tiles when
    mixing.factor is the width g (a grown net) or of one tile (factor 1). Initialised, an
    ungrown grid computes exactly the builder's initial weights (templates decomposed from
    them, mixing.decompose); a grown one is drawn as mgrow's own families are.
    """
    check_traced(arch.name)
    g = int(arch.width)
    if g != arch.width:
        raise MgrowError(f"{arch.name}: width {arch.width:g}; a builder's network is "
                         "trained at width 1 (narrower: the builder's own option, such as "
                         "--builder-option width_mult=0.5) and grown by whole factors (2, 3, "
                         "...)")
    if mixing is not None and mixing.factor not in (1, g):
        raise MgrowError(f"{arch.name}: a template-mixed builder's network at width {g} holds "
                         f"a grid of 1 or {g} x {g} tiles, not {mixing.factor}")
    shape = (1, arch.in_channels, arch.input_size, arch.input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if g == 1 and meta:
            model = _on_meta(arch).eval()
            if arch.depths is not None:
                extend(model, arch.depths, fresh=False)
            return model if mixing is None else twin(model, mixing, shape)
        model = _construct(arch).eval()
        if arch.depths is not None:  # deepened (mgrow deepen): before widening, whose plan
            extend(model, arch.depths, fresh=True)  # then grows the new blocks too
    steps = plan(model, g, torch.zeros((2, *shape[1:]))) if g > 1 else None
    grid = steps if mixing is not None and mixing.factor > 1 else None
    if meta:
        model = apply(model.to("meta"), steps, "zero")
        return model if mixing is None else twin(model, mixing, shape, grid)
    if g > 1:
        model = apply(model, steps)
        wider = _wider(arch, model) if grid is None else None
        with torch.random.fork_rng(devices=[]):  # a fresh wide net: the builder's own wider
            torch.manual_seed(seed)  # network where a width option makes it, else every
            if wider is not None:  # layer's own init (MultiheadAttention's is private)
                model = _construct(arch.model_copy(update={"width": 1.0,
                                                           "options": wider})).eval()
            for m in model.modules() if wider is None else ():
                reset = getattr(m, "reset_parameters", getattr(m, "_reset_parameters", None))
                if reset is not None and any(True for _ in m.parameters(False)):
                    reset()
    if mixing is None:
        return model
    plain = model.state_dict()
    twin(model, mixing, shape, grid)
    gen = torch.Generator().manual_seed(seed)
    if grid is None:  # the builder's own initial weights, as templates and coefficients
        model.load_state_dict(decompose(model, plain, gen))
    else:
        init_twin(model, gen)
    return model
