"""`convert`: recast a plain checkpoint as a template-mixed network computing the same function.

Decomposition, per bank group of L layers (L = 1 or 2) with t >= L templates: stack the
group's weights and t - L random tensors of the same norm into X (t, o, i, *k), draw a
random orthogonal Q (t x t) and set

    templates T = Q^T X,   coefficients alpha_l = Q[l]   so   sum_k Q[l, k] T_k = X_l = W_l.

It is exact up to float32 round-off (computed in float64). Every template then carries a
share of every layer's weight, the layers' coefficient vectors are orthonormal, and the
directions orthogonal to them hold the t - L spare tensors: at growth, new orthogonal
coefficient vectors draw exactly those (sum_k a_k T_k = sum_j (Q a)_j X_j, and a orthogonal
to the rows Q[l] of the layers gives (Q a)_l = 0), so the spares decide what new tiles hold.
`spare`:
- `random` (default): standard normal tensors at the layers' mean norm, so new tiles
  start as fresh random weights;
- `permuted`: spare j is the group's layer j mod L with its output and input channels
  shuffled by random permutations: a trained filter bank rearranged (a permuted copy of a
  trained layer is what another trained network of the same shape looks like up to the
  order of its units), so new tiles mix learned filters at the learned scale. Measured
  (docs/growing.md, "BN at growth, and growing a converted checkpoint"): it did not beat
  `random` (32.3% vs 37.2% after one epoch of finetuning, WRN-16-2 x0.5 -> x1 on 4,000
  CIFAR-10 images), so it is not the default.
Stem and classifier (t = 1) keep their weight as the single template with coefficient 1.

Owns `convert_checkpoint`, `convert_state`, `read_checkpoint` (and `read_model`,
`model_state`: the model's keys of a checkpoint holding more). Imports mgrow.errors,
manifest, mixing, arch, bundle, files, and (to record a data set) data.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from .arch import build, check_options
from .bundle import COUNTER, check_tensors, conform, integer_buffers
from .errors import MgrowError
from .files import read_buffer, read_bytes
from .manifest import ArchSpec, DatasetSpec, Lineage, Manifest, MixingSpec, Parent
from .tensorfile import load_tensors
from .mixing import SPARES, decompose

def read_checkpoint(path: str | Path, expected: Collection[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Return the state_dict in a .pt/.pth (plain, or under 'state_dict'/'model') or
    .safetensors, without its wrappers' prefixes (see model_state for `expected`)."""
    return read_model(path, expected)[0]


def read_model(path: str | Path, expected: Collection[str] | None = None,
               integers: frozenset[str] = frozenset()
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return (the model's state_dict in a checkpoint file, the keys left out as outside
    the model): see model_state; `integers`: the model's integer buffers (bundle.conform)."""
    p = Path(path)
    state, outside = model_state(_load_state(p), expected)
    return with_bn_counters(conform(state, p, integers)), outside


# Classes a checkpoint may hold beside its tensors, allowed to torch's weights-only loader
# while mgrow reads it (nothing runs code): torchvision's reference scripts save `args`.
SAFE_CLASSES = (argparse.Namespace,)


def _load_state(p: Path) -> dict[str, torch.Tensor]:
    """Return the dict of tensors in a .pt/.pth (plain, or under 'state_dict' or 'model')
    or .safetensors file, keys as saved; or raise MgrowError (a pickle needing a class
    outside SAFE_CLASSES and torch's plain types is refused, naming it)."""
    if p.suffix == ".safetensors":
        return load_tensors(read_buffer(p), p)
    data = read_bytes(p)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it did not write
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(SAFE_CLASSES)):  # undone on exit
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MgrowError(f"{p}: refused to load: {_unpickling_reason(e)}") from None
    except Exception as e:
        raise MgrowError(f"{p}: not a PyTorch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MgrowError(f"{p}: no state_dict found (expected a dict of tensors, or one under "
                         "'state_dict' or 'model')")
    return obj


def with_bn_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return `state` with a zero `num_batches_tracked` beside every BN's running mean that
    lacks one, as torch's BatchNorm loader adds it (so torchvision loads them): checkpoints
    saved before PyTorch 0.4.1 have no such counters."""
    missing = {f"{k[:-len('running_mean')]}num_batches_tracked" for k in state
               if k.endswith("running_mean")} - state.keys()
    return {**state, **{k: torch.tensor(0) for k in sorted(missing)}}


WRAPPERS = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning, torch.compile
NAMED = WRAPPERS + ("net.",)  # also Lightning's other habit, where the architecture says so


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state_dict without the prefixes wrappers add to every key (any nesting of
    DDP's `module.`, Lightning's `model.` and torch.compile's `_orig_mod.`)."""
    while state:
        prefix = next((w for w in WRAPPERS if all(k.startswith(w) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def model_state(state: dict[str, torch.Tensor], expected: Collection[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return (the model's entries of a checkpoint's state_dict, prefix stripped; the keys
    left out, sorted).

    Without `expected` (the architecture's keys): strip_wrappers, nothing left out. With
    it: the prefix (any nesting of NAMED, or none) whose keys hold most of `expected` wins,
    and every key under it is kept, so the tensor check names any the model lacks or does
    not know; keys outside it (a Lightning module's loss weights beside `model.`) are left
    out. None holding any: strip_wrappers.
    """
    needed = {k for k in expected or () if k.rpartition(".")[2] != COUNTER}
    prefixes, frontier = [""], [""]
    while frontier:  # every nesting of NAMED that some key starts with, shortest first
        frontier = [p + w for p in frontier for w in NAMED
                    if any(k.startswith(p + w) for k in state)]
        prefixes += frontier

    def held(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in needed)
    best = max(prefixes, key=held)  # the first, shortest, of equals
    if not needed or held(best) == 0:
        return strip_wrappers(state), []
    return ({k[len(best):]: v for k, v in state.items() if k.startswith(best)},
            sorted(k for k in state if not k.startswith(best)))


def outside_note(keys: list[str]) -> str:
    """Return 'ignored N keys outside the model: a, b, ...' (the first few named)."""
    shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
    return f"ignored {len(keys)} key{'s' * (len(keys) > 1)} outside the model: {shown}"


def _blocks(state: dict[str, torch.Tensor], stage: str) -> int:
    """Return how many residual blocks a torchvision ResNet stage (`layer3`) holds."""
    found = {int(k.split(".")[1]) for k in state if k.startswith(stage + ".")
             and k.split(".")[1].isdigit()}
    return max(found) + 1 if found else 0


def _resnet_family(state: dict[str, torch.Tensor]) -> str | None:
    """Return the torchvision ResNet-family name of a state_dict (None if not a ResNet)."""
    if "layer1.0.conv1.weight" not in state or "fc.weight" not in state:
        return None
    depth_of = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
    blocks = tuple(_blocks(state, f"layer{i}") for i in range(1, 5))
    if "layer1.0.conv3.weight" not in state:  # basic blocks
        if blocks in depth_of:
            return f"resnet{depth_of[blocks]}"
        return f"a basic-block ResNet with {'-'.join(map(str, blocks))} blocks"
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(blocks)
    name = str(depth) if depth else f" with {'-'.join(map(str, blocks))} bottleneck blocks"
    conv2, conv3 = state["layer1.0.conv2.weight"], state["layer1.0.conv3.weight"]
    if conv2.shape[1] != conv2.shape[0]:  # grouped 3x3 convolutions
        groups = conv2.shape[0] // max(1, conv2.shape[1])
        return f"resnext{name}_{groups}x{conv2.shape[1]}d"
    if conv3.shape[0] == 2 * conv2.shape[0]:  # bottleneck twice as wide as ResNet's
        return f"wide_resnet{name}_2"
    return f"resnet{name}"


def _vgg_family(state: dict[str, torch.Tensor]) -> str | None:
    """Return the torchvision VGG name of a state_dict (None if not a VGG)."""
    if not any(k.startswith("features.") for k in state) or "classifier.6.weight" not in state:
        return None
    convs = sum(1 for k, v in state.items() if k.startswith("features.") and v.dim() == 4)
    bn = any(k.startswith("features.") and k.endswith("running_mean") for k in state)
    depth = {8: "11", 10: "13", 13: "16", 16: "19"}.get(convs, f" with {convs} convolutions")
    return f"vgg{depth}{'_bn' if bn else ''}"


_OTHER_FAMILIES = {  # a key fragment only this torchvision family's state_dicts hold
    "denseblock1": "densenet", "encoder_layer_0": "vit", "attn.qkv": "swin",
    "layer_scale": "convnext", "trunk_output": "regnet", "Mixed_5b": "inception_v3",
    "inception3a": "googlenet", "squeeze.weight": "squeezenet", "stage2.0.branch": "shufflenet_v2",
    "block.0.0.weight": "mobilenet_v3 / efficientnet", "conv.0.0.weight": "mobilenet_v2",
    "layers.0.weight": "mnasnet",
}


def torchvision_family(state: dict[str, torch.Tensor]) -> str | None:
    """Return the torchvision model family a state_dict looks like, from its keys and shapes
    (resnet50, wide_resnet50_2, resnext50_32x4d, vgg16_bn, densenet, ...), or None."""
    for rule in (_resnet_family, _vgg_family):
        name = rule(state)
        if name is not None:
            return name
    return next((name for frag, name in _OTHER_FAMILIES.items()
                 if any(frag in k for k in state)), None)


def check_family(state: dict[str, torch.Tensor], arch_name: str, src: object) -> None:
    """Raise MgrowError when the checkpoint is a torchvision family other than `arch_name`:
    one mgrow does not build (named), or another one it does (pass that --arch)."""
    from .arch import NAMES
    family = torchvision_family(state)
    if family is None or family == arch_name or arch_name.startswith(("wrn-", "torchvision:",
                                                                          "timm:")):
        return  # a builder's network: the tensor check against it names any mismatch
    if family in NAMES:
        raise MgrowError(f"{src}: looks like torchvision's {family}, not {arch_name}: pass "
                         f"--arch {family}")
    import torchvision
    name = family if family in torchvision.models.list_models() else "NAME"
    raise MgrowError(f"{src}: looks like torchvision's {family}, which mgrow does not build "
                     f"by hand: pass --arch torchvision:{name} (the builder's name, as "
                     "torchvision.models.list_models() gives it)")


FAMILY_INPUT = {"resnet": 224, "vgg": 224, "wrn": 32, "torchvision:": 224, "timm:": 224}


def default_input_size(arch_name: str) -> int:
    """Return the input side a family is usually trained at: 224 (ImageNet) or 32 (CIFAR)."""
    return next(size for prefix, size in FAMILY_INPUT.items() if arch_name.startswith(prefix))


def _edges(arch: ArchSpec) -> tuple[str, str]:
    """Return the state_dict keys of the network's first convolution and its classifier."""
    model = build(arch.model_copy(update={"num_classes": 1}), meta=True)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    heads = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and m.weight.shape[0] == 1]  # the classifier: one class asked for
    return convs[0] + ".weight", heads[-1] + ".weight"


def read_shape(state: dict[str, torch.Tensor], arch: ArchSpec) -> tuple[int | None,
                                                                        int | None]:
    """Return (classes, input channels) as the checkpoint's classifier and stem say; None
    for what it lacks (the tensor check then names the missing or misshapen key)."""
    stem, head = _edges(arch)
    classes = state[head].shape[0] if head in state and state[head].dim() >= 2 else None
    channels = state[stem].shape[1] if stem in state and state[stem].dim() == 4 else None
    return classes, channels


def _unpickling_reason(e: Exception) -> str:
    """Return why torch's weights-only loader refused a pickle: the class (or function) it
    needs, named, else the line of torch's message that says what was refused."""
    text = str(e)
    found = re.search(r"\bGLOBAL ([A-Za-z_][\w.]*)", text)
    if found:
        module, _, name = found.group(1).rpartition(".")
        obj = getattr(sys.modules.get(module or "builtins"), name, None)  # imports nothing
        kind = "function" if callable(obj) and not isinstance(obj, type) else "class"
        return (f"it needs {kind} {found.group(1)}, which is not a plain tensor "
                "type; mgrow runs no code from a checkpoint: save the state_dict alone "
                "(torch.save(model.state_dict(), ...))")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation",
                   "(1) In PyTorch", "(2) Alternatively")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not ln.startswith(boilerplate)),
                  lines[0] if lines else "unpickling failed")
    return ("not a plain tensor checkpoint ("
            + reason.removeprefix("WeightsUnpickler error: ")[:200] + ")")


def _check_classes(plain: nn.Module, state: dict[str, torch.Tensor], src: object) -> None:
    head = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)][-1] + ".weight"
    want = plain.state_dict()[head].shape[0]
    have = state[head].shape[0] if head in state and state[head].dim() == 2 else want
    if have != want:
        raise MgrowError(f"{src}: checkpoint has {have} classes but --num-classes is {want}")


def convert_state(state: dict[str, torch.Tensor], arch: ArchSpec, mixing: MixingSpec,
                  seed: int = 0, src: object = "checkpoint", spare: str = "random"
                  ) -> dict[str, torch.Tensor]:
    """Return the template-mixed tensors (same function) of a plain state_dict (see
    mgrow.mixing.decompose; never a float64 copy of a whole group: a vgg11_bn classifier
    bank is 0.8 GB in float32)."""
    if mixing.factor != 1 or mixing.members != 1:
        raise MgrowError("convert makes an ungrown network: factor and members must be 1")
    if spare not in SPARES:
        raise MgrowError(f"unknown --spare {spare!r}: expected one of {', '.join(SPARES)}")
    plain = build(arch, meta=True)
    _check_classes(plain, state, src)
    check_tensors(plain, state, src)
    mixed = build(arch, mixing, meta=True)  # shapes only: every tensor is computed below
    try:
        return decompose(mixed, state, torch.Generator().manual_seed(seed), spare)
    except ValueError as e:
        raise MgrowError(str(e)) from None


def convert_checkpoint(src: str | Path, arch_name: str, output: str | Path, *,
                       num_classes: int | None = None, width: float = 1.0,
                       in_channels: int | None = None, input_size: int | None = None,
                       norm: str = "every", mixing: MixingSpec | None = MixingSpec(),
                       data: str | None = None, seed: int = 0, spare: str = "random",
                       normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                       options: dict | None = None, force: bool = False
                       ) -> tuple[Path, Manifest]:
    """Convert a plain checkpoint file into a bundle; return its path and manifest.

    None: classes and input channels as the checkpoint's classifier and stem say, input
    size by family (default_input_size: 224 for resnet/vgg, 32 for wrn). `normalisation`
    (mean, std per channel, 0-1 scale): the constants the checkpoint was trained with,
    recorded for `data` instead of the statistics measured here (every later command
    normalises with what the bundle records). Keys outside the model (model_state) are
    named in one `note:` line on stderr once the bundle is written.
    """
    from .arch import check_name
    from .bundle import save
    from .files import check_writable, sha256_file, writer_lock
    check_name(arch_name)
    check_writable(output, force, inputs=(src,))
    if normalisation is not None and data is None:
        raise MgrowError("--mean/--std say how the checkpoint's data was normalised: "
                         "name that data set with --data too")
    with writer_lock(output):  # held from the start: a second writer is refused at once
        arch = ArchSpec(name=arch_name, width=width, input_size=input_size or
                        default_input_size(arch_name), norm=norm, options=options or {})
        check_options(arch)
        skeleton = build(arch, meta=True)
        state, outside = read_model(src, skeleton.state_dict().keys(),
                                    integer_buffers(skeleton))
        check_family(state, arch_name, src)
        classes, channels = read_shape(state, arch)
        arch = arch.model_copy(update={
            "num_classes": num_classes or classes or arch.num_classes,
            "in_channels": in_channels or channels or arch.in_channels})
        plain = build(arch, meta=True)
        _check_classes(plain, state, src)
        try:
            check_tensors(plain, state, src)
        except MgrowError as e:  # name what was left out too: it may be what is missing
            raise MgrowError(f"{e}{'; ' + outside_note(outside) if outside else ''}") from None
        tensors = state if mixing is None else convert_state(state, arch, mixing, seed, src,
                                                             spare)
        dataset = None
        if data is not None:  # one size: the images are read at the one the FLOPs count
            dataset = _dataset(data, arch.input_size, input_size is not None)
            arch = arch.model_copy(update={"input_size": dataset.input_size})
            if normalisation is not None:
                dataset = normalised_as(dataset, *normalisation)
        options = {"arch": arch_name, "seed": seed, "mixed": mixing is not None}
        if mixing is not None:
            options["spare"] = spare
        lineage = Lineage(operation="convert", options=options,
                          parents=(Parent(sha256=sha256_file(src), path=str(src)),))
        manifest = Manifest(arch=arch, mixing=mixing, data=dataset, lineage=lineage)
        path = save(output, manifest, tensors, force)
    if outside:
        print(f"note: {outside_note(outside)}", file=sys.stderr)
    return path, manifest


def _dataset(spec: str, size: int, size_given: bool) -> DatasetSpec:
    """Return what a bundle records of data set `spec`: an image folder read at `size` (the
    side the network is counted at); a set of fixed-size images at their own size, which
    an explicit --input-size must then equal."""
    from .data import load_data
    folder = spec.startswith("imagefolder:")
    recorded = load_data(spec, input_size=size if folder else None).spec
    if size_given and recorded.input_size != size:
        raise MgrowError(f"--input-size {size} differs from the {recorded.input_size} x "
                         f"{recorded.input_size} images of {spec}: FLOPs are counted at the "
                         "size the data is read at")
    return recorded


def normalised_as(spec: DatasetSpec, mean: tuple[float, ...], std: tuple[float, ...]
                  ) -> DatasetSpec:
    """Return `spec` recording `mean` and `std` (one value per channel, or one for all)."""
    c = spec.channels
    mean, std = (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)
    try:
        return DatasetSpec.model_validate({**spec.model_dump(), "mean": mean, "std": std})
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{x}]" if isinstance(x, int) else x for x in err["loc"]) or "value"
        raise MgrowError(f"--mean/--std for {spec.spec} ({c} channel{'s' * (c > 1)}, 0-1 "
                         f"scale): {where}: {err['msg']}") from None
