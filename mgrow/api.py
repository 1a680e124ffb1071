"""mgrow from Python: one function per command, the same functions the CLI calls.

`import mgrow` exposes them (loaded on first use, so `import mgrow` stays light):

    import mgrow
    small = mgrow.train("wrn-10-2", "small.safetensors", data="digits", width=0.5, epochs=3)
    sib = mgrow.train_sibling("small.safetensors", epochs=2)          # small-sibling.safetensors
    grown = mgrow.fuse("small.safetensors", sib.path)                  # small-grown.safetensors
    final = mgrow.finetune(grown, "final.safetensors", budget=0.45, reference_epochs=3)
    print(final.result.accuracy, mgrow.count_flops(final.path)["ledger"]["growth_norm"])
    net = mgrow.build_model(final.path)  # a torch.nn.Module, ready for inference

Training functions take the engine's knobs (`lr`, `batch_size`, `seed`, `device`, `amp`,
... : the fields of `TrainConfig`) as keyword arguments and return an `Outcome` (`.path`,
`.manifest`, `.result.accuracy`, ...). Progress is a bar on a terminal, one line per epoch
elsewhere (a notebook, a log); `progress="quiet"` silences it. Every problem with the
input raises `MgrowError` with a one-line message; every public function checks its
arguments first, before it reads or writes anything (`checked`: pydantic's validate_call,
strict, within the command line's bounds of mgrow.limits), naming the function and the
argument: "fuse: factor: Input should be a valid integer (got '2')".

Imports any library layer (bundle, data, engine, growth, phases, similarity ...), never cli.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PlainValidator, ValidationError, validate_call
from torch import nn

from . import limits as L
from .bundle import Bundle
from .bundle import load as load_bundle
from .data import DataSource
from .engine import Progress, TrainConfig
from .errors import MgrowError
from .files import check_writable, write_atomic
from .flops import ledger, param_counts
from .growth import DEEPEN_INITS, INITS, NAMES
from .history import walk
from .phases import Outcome, grown_output
from .similarity import CkaResult

PathLike = str | os.PathLike
__all__ = ["Bundle", "DataSource", "MgrowError", "Outcome", "TrainConfig", "build_model",
           "cka", "count_flops", "deepen", "evaluate", "finetune", "fuse", "info", "load", "train",
           "train_sibling", "write_heatmap"]


# -- the argument check every public function makes first ----------------------------------

def checked(fn: Callable) -> Callable:
    """Return `fn` checking its arguments against its annotations before it runs (pydantic's
    `validate_call`, strict: no str -> number, no float -> int, a bool is not a number),
    so that a wrong one raises a one-line MgrowError naming the function and the argument."""
    @validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))
    @functools.wraps(fn)
    def check(*args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs  # the arguments, checked: only then is `fn` called
    positional = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            args, kwargs = check(*args, **kwargs)
        except ValidationError as e:
            raise MgrowError(_refusal(fn.__name__, e, positional)) from None
        return fn(*args, **kwargs)
    return call


def _refusal(function: str, e: ValidationError, positional: list[str]) -> str:
    """Return the one-line refusal of pydantic's first error: function, argument, why."""
    err = e.errors(include_url=False)[0]
    arg = err["loc"][0] if err["loc"] else "arguments"
    if isinstance(arg, int):  # a positional argument, by index
        arg = positional[arg] if arg < len(positional) else f"argument {arg + 1}"
    got = "" if err["type"] == "missing_argument" else f" (got {_shown(err['input'])})"
    return f"{function}: {arg}: {err['msg'].removeprefix('Value error, ')}{got}"


def _shown(value: Any) -> str:  # repr(value) on one line, at most 60 characters
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _is_path(value: Any) -> bool:
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    return isinstance(text, str) and text != "" and "\0" not in text


def _accept(what: str, *kinds: type, path: bool = False, none: bool = False
            ) -> PlainValidator:
    """Return a validator passing on, unchanged, instances of `kinds`, a non-empty path
    (str or os.PathLike) when `path`, None when `none`."""
    def check(value: Any) -> Any:
        if isinstance(value, kinds) or (path and _is_path(value)) or (none and value is None):
            return value
        raise ValueError(f"expected {what}" + " or None" * none)
    return PlainValidator(check)


def _progress(value: Any) -> Any:
    if value in ("bar", "quiet", "json") if isinstance(value, str) else callable(value):
        return value
    raise ValueError("expected 'bar', 'quiet', 'json' or a callable given each epoch's record")


_P = "a non-empty path (str or os.PathLike)"
BundleIn = Annotated[PathLike | Outcome, _accept(f"{_P} or an Outcome", Outcome, path=True)]
MaybeBundleIn = Annotated[PathLike | Outcome | None, _accept(f"{_P}, an Outcome", Outcome,
                                                             path=True, none=True)]
ModelIn = Annotated[PathLike | Outcome | Bundle, _accept(f"{_P}, an Outcome or a Bundle",
                                                         Outcome, Bundle, path=True)]
PathOut = Annotated[PathLike, _accept(_P, path=True)]
MaybePathOut = Annotated[PathLike | None, _accept(_P, path=True, none=True)]
DataIn = Annotated[str | DataSource, _accept("a data spec (str) or a DataSource", str, DataSource)]
MaybeDataIn = Annotated[str | DataSource | None, _accept("a data spec (str), a DataSource", str,
                                                         DataSource, none=True)]
ConfigIn = Annotated[TrainConfig | None, _accept("a TrainConfig", TrainConfig, none=True)]
CkaIn = Annotated[CkaResult, _accept("a CkaResult (what cka returns)", CkaResult)]
ProgressIn = Annotated[Progress, PlainValidator(_progress)]
# numbers within the command line's bounds (typer's min/max and cli.options.in_range)
Epochs = Annotated[float, Field(gt=0, le=L.MAX_EPOCHS, allow_inf_nan=False)]
Width = Annotated[float, Field(gt=0, le=L.MAX_WIDTH, allow_inf_nan=False)]
Templates = Annotated[int, Field(ge=1, le=L.MAX_TEMPLATES)]
Subset = Annotated[int, Field(ge=1, le=L.MAX_IMAGES)]
Seed = Annotated[int, Field(ge=0, le=L.MAX_SEED)]
Factor = Annotated[int, Field(ge=2, le=L.MAX_FACTOR)]
Noise = Annotated[float, Field(ge=0, le=L.MAX_NOISE, allow_inf_nan=False)]
Batch = Annotated[int, Field(ge=1, le=L.MAX_BATCH)]
Steps = Annotated[int, Field(ge=1, le=1_000_000)]  # fuse --growth-steps
Budget = Annotated[float, Field(gt=0, le=L.MAX_BUDGET, allow_inf_nan=False)]
RefEpochs = Annotated[float, Field(gt=0, le=L.MAX_REFERENCE_EPOCHS, allow_inf_nan=False)]
Batches = Annotated[int, Field(ge=0, le=1_000_000)]  # finetune --bn-recalibrate
InputSize = Annotated[int, Field(ge=8, le=L.MAX_INPUT_SIZE)]
CkaImages = Annotated[int, Field(ge=2, le=L.MAX_IMAGES)]
Norm = Literal["every", "block"]
Sharing = Literal["pairs", "none"]
Tiling = Literal["vertical", "horizontal"]
Init = Literal[tuple(INITS)]  # type: ignore[valid-type]  # the growth layer's own tables
Method = Literal[NAMES]  # type: ignore[valid-type]
DeepInit = Literal[tuple(DEEPEN_INITS)]  # type: ignore[valid-type]
Blocks = Annotated[int, Field(ge=1, le=L.MAX_DEPTH)]
Stage = Annotated[int, Field(ge=1, le=L.MAX_DEPTH)] | Literal["all", "last"]
Options = dict[str, str | bool | int | float]  # a builder's keyword arguments
# the command line's upper bounds of the knobs, which TrainConfig leaves open
_KNOB_MAX = {"epochs": L.MAX_EPOCHS, "lr": L.MAX_LR, "batch_size": L.MAX_BATCH, "seed": L.MAX_SEED,
             "weight_decay": L.MAX_WEIGHT_DECAY, "warmup_epochs": L.MAX_EPOCHS}


class _BothGiven(MgrowError, TypeError):
    """config and keyword knobs given together (a TypeError too, as Python's own)."""


def _config(function: str, config: TrainConfig | None, epochs: float | None,
            knobs: dict[str, Any], default_epochs: float = 1.0) -> TrainConfig:
    """Return `config`, or one made of `epochs` and the keyword knobs (not both: a knob
    given beside a config would be silently ignored), checked as strictly as the arguments
    and within the command line's bounds; a bad knob is a one-line MgrowError naming it."""
    if config is not None:
        given = sorted(knobs) + ["epochs"] * (epochs is not None)
        if given:
            raise _BothGiven(f"{function}: give config or keyword knobs, not both: {given}")
    else:
        try:
            config = TrainConfig.model_validate({"epochs": default_epochs if epochs is None
                                                 else epochs, **knobs}, strict=True)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(map(str, err["loc"])) or "config"
            raise MgrowError(f"{function}: {where}: {err['msg']} (got "
                             f"{_shown(err.get('input'))})") from None
    for knob, top in _KNOB_MAX.items():
        if getattr(config, knob) > top:
            raise MgrowError(f"{function}: {knob}: Input should be less than or equal to "
                             f"{top:g} (got {getattr(config, knob)!r})")
    return config


def _source(data: str | DataSource | None, subset: int | None = None) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, subset=subset)


def _path(bundle: PathLike | Outcome) -> Path:
    return bundle.path if isinstance(bundle, Outcome) else Path(bundle)


@checked
def load(path: BundleIn) -> Bundle:
    """Return the bundle at `path` (or an outcome's), fully validated: manifest and tensors."""
    return load_bundle(_path(path))


@checked
def build_model(bundle: ModelIn) -> nn.Module:
    """Return the network a bundle describes (template-mixed or plain), weights loaded, on CPU."""
    return (bundle if isinstance(bundle, Bundle) else load(_path(bundle))).model()


@checked
def train(arch: str, output: PathOut, *, data: DataIn = "digits",
          epochs: Epochs | None = None, width: Width = 1.0, mixed: bool = True,
          norm: Norm = "every", templates: Templates = 2, sharing: Sharing = "pairs",
          subset: Subset | None = None, config: ConfigIn = None, progress: ProgressIn = "bar",
          resume: bool = False, force: bool = False, options: Options | None = None,
          **knobs: Any) -> Outcome:
    """Train a network from scratch (`mgrow train`; epochs default 10); return the outcome.
    `options`: a torchvision:/timm: builder's keyword arguments (recorded)."""
    from .manifest import MixingSpec
    from .phases import train_new
    cfg = _config("train", config, epochs, knobs, 10)
    mixing = MixingSpec(templates=templates, sharing=sharing) if mixed else None
    return train_new(arch, _source(data, subset), cfg, Path(output), mixing=mixing,
                     width=width, norm=norm, resume=resume, progress=progress, force=force,
                     options=options or {})


@checked
def train_sibling(small: BundleIn, output: MaybePathOut = None, *,
                  epochs: Epochs | None = None, data: MaybeDataIn = None,
                  seed: Seed | None = None, config: ConfigIn = None,
                  progress: ProgressIn = "bar", resume: bool = False, force: bool = False,
                  **knobs: Any) -> Outcome:
    """Train SMALL's sibling (`mgrow train-sibling`); default output SMALL-sibling, numbered,
    and seed SMALL's + 1 (fresh, independent templates)."""
    from .phases import small_seed
    from .phases import train_sibling as run
    small = _path(small)
    if config is None and epochs is None:
        raise MgrowError("train_sibling: missing epochs: how long to train the sibling")
    if seed is not None:
        knobs["seed"] = seed
    cfg = _config("train_sibling", config, epochs, knobs)
    if config is None and seed is None:  # a different seed from SMALL's
        cfg = cfg.model_copy(update={"seed": small_seed(small) + 1})
    return run(small, _source(data), cfg, None if output is None else Path(output),
               resume=resume, progress=progress, force=force)


@checked
def fuse(a: BundleIn, b: MaybeBundleIn = None, output: MaybePathOut = None, *,
         data: MaybeDataIn = None, factor: Factor = 2, tiling: Tiling = "vertical",
         init: Init = "orthogonal", method: Method = "mixture", seed: Seed = 0,
         noise: Noise | None = None, batch_size: Batch = 64, steps: Steps = 8,
         bn_correct: bool = False, force: bool = False) -> Path:
    """Grow A (and its sibling B), or a grown A again, into a wider bundle (`mgrow fuse`);
    return its path.

    The options are `mgrow fuse`'s, with its defaults: `factor` g, `tiling`, `init` (of the
    new coefficients), `method` (mixture, random, net2net, gradmax, firefly), `seed`,
    `noise` (None: the method's own, growth.DEFAULT_NOISE), `bn_correct`; gradmax and
    firefly read `steps` batches of `batch_size` images of `data` (default: A's). The
    default output is A-grown.safetensors next to A, numbered so as never to overwrite.
    """
    source = {} if data is None else {"source": _source(data)}
    return fuse_bundles(a, b, output, force=force, factor=factor, tiling=tiling, init=init,
                        method=method, seed=seed, noise=noise, batch_size=batch_size,
                        steps=steps, bn_correct=bn_correct, **source)[0]


def fuse_bundles(a: PathLike | Outcome, b: PathLike | Outcome | None = None,
                 output: PathLike | None = None, *, force: bool = False, **options: Any):
    """Return (path, growth result with notes) of `fuse`; what the CLI calls. Without
    `output`: A-grown.safetensors next to A, numbered, chosen under its writer lock."""
    from .phases import fuse_files
    a, b = _path(a), None if b is None else _path(b)
    if output is not None:
        return fuse_files(a, b, Path(output), force=force, **options)
    with grown_output(a) as claimed:  # held until written: a concurrent fuse takes the next
        return fuse_files(a, b, claimed, force=force, **options)


@checked
def deepen(bundle: BundleIn, output: MaybePathOut = None, *, blocks: Blocks = 1,
           stage: Stage = "last", init: DeepInit | None = None, seed: Seed = 0,
           force: bool = False) -> Path:
    """Insert `blocks` new blocks at the end of stage `stage` (1-based, "last" or "all") of
    a WRN, ResNet, VGG or a builder's residual network, keeping its function (`mgrow
    deepen`); return the path. `init`: zero, copy (plain residual nets), mixture
    (template-mixed ones; their default; zero for plain ones) or identity (VGG's one). The
    default output is BUNDLE-deep.safetensors next to it."""
    from .phases import deepen_files
    return deepen_files(_path(bundle), output, force=force, blocks=blocks, stage=stage,
                        init=init, seed=seed)[0]


@checked
def finetune(bundle: BundleIn, output: PathOut, *, epochs: Epochs | None = None,
             budget: Budget | None = None, reference_epochs: RefEpochs | None = None,
             data: MaybeDataIn = None, config: ConfigIn = None,
             bn_recalibrate: Batches = 0, progress: ProgressIn = "bar", resume: bool = False,
             force: bool = False, **knobs: Any) -> Outcome:
    """Continue training a bundle (`mgrow finetune`) for `epochs` or up to a FLOPs `budget`
    (first re-estimating BN statistics on `bn_recalibrate` batches when > 0)."""
    from .phases import finetune as run
    if config is None and (epochs is None) == (budget is None):
        raise MgrowError("finetune: give exactly one of epochs and budget")
    cfg = _config("finetune", config, epochs, knobs)
    return run(_path(bundle), _source(data), cfg, Path(output), budget=budget,
               reference_epochs=reference_epochs, bn_recalibrate=bn_recalibrate,
               resume=resume, progress=progress, force=force)


@checked
def evaluate(bundle: BundleIn, data: MaybeDataIn = None, device: str = "auto",
             batch_size: Batch = 512) -> dict:
    """Return top-1 and loss of a bundle on its test split (`mgrow eval`)."""
    from .phases import evaluate_bundle
    return evaluate_bundle(_path(bundle), _source(data), device, batch_size)


@checked
def count_flops(bundle: BundleIn, reference_epochs: RefEpochs | None = None,
                input_size: InputSize | None = None) -> dict:
    """Return `mgrow flops`'s report: forward FLOPs per layer, parameters, the ledger."""
    from .flops import report
    return report(_path(bundle), input_size, reference_epochs)


@checked
def info(bundle: BundleIn, reference_epochs: RefEpochs | None = None) -> dict:
    """Return what `mgrow info` shows: manifest, lineage tree, ledger, parameter counts.

    `lineage` is the bundle's own lineage (operation, options, parents) with `history`,
    the earlier operations recorded in the manifest (oldest first); each parent found on
    disk with the recorded sha256 (at its recorded path, or beside this bundle) carries its
    own lineage, recursively, once: met again, it has `seen_above` true instead. Otherwise
    its `status` says `missing`, `changed` or `unreadable` (with the one-line `reason`:
    not a bundle, such as the .pth a converted bundle came from, or truncated).
    """
    from .arch import stages
    path = _path(bundle)
    b = load(path)
    man = b.manifest
    return {
        "bundle": str(path), "sha256": b.sha256, "bytes": path.stat().st_size,
        "description": man.describe(), "format_version": man.format_version,
        "arch": man.arch.model_dump(), "mixing": None if man.mixing is None
        else man.mixing.model_dump(), "data": None if man.data is None else man.data.model_dump(),
        "growth": None if man.growth is None else man.growth.model_dump(),
        "stages": [{"where": w, "blocks": n} for w, n in stages(man.arch)],
        "lineage": walk(man.lineage, path.parent),
        "params": param_counts(b.tensors, man.arch, man.mixing),
        "ledger": ledger(man, reference_epochs),
    }


@checked
def cka(a: BundleIn, b: BundleIn, data: MaybeDataIn = None, images: CkaImages | None = None,
        device: str = "cpu", debiased: bool = False) -> CkaResult:
    """Return linear CKA between every feature layer of A and of B (`mgrow cka`).

    Both run on the first `images` test images of `data` (default: A's data set; default
    count: 512, or the whole test split if it is smaller), each normalised as it records.
    The result's `.matrix[i][j]` compares A's layer `.layers_a[i]` with B's
    `.layers_b[j]`; `.matched()` gives the layers present in both under one name; `.floor`
    is the matrix with B's images shuffled (what no similarity reads); `debiased` uses the
    unbiased HSIC (>= 4 images). Images whose n x n Gram matrices would not fit the memory
    are refused before any forward pass.
    """
    from .arch import build, same_blocks
    from .data import with_normalisation
    from .engine import resolve_device
    from .phases import check_fits
    from .similarity import check_cka_fits, cka_models
    from .similarity import images as first_images
    ba, bb = load(_path(a)), load(_path(b))
    data_ = _source(data).load(ba.manifest.data)
    for x in (ba, bb):
        check_fits(x.manifest.arch, data_)
    dev = resolve_device(device)
    n = min(512, len(data_.test_y)) if images is None else images
    check_cka_fits(*(build(x.manifest.arch, x.manifest.mixing, meta=True) for x in (ba, bb)),
                   data_, n, dev)
    data_b = data_ if bb.manifest.data is None else with_normalisation(data_, bb.manifest.data)
    x, xb = first_images(data_, n).to(dev), first_images(data_b, n).to(dev)
    result = cka_models(ba.model().to(dev), bb.model().to(dev), x, xb, debiased)
    result.renamed = same_blocks(ba.manifest.arch, bb.manifest.arch)
    return result



@checked
def write_heatmap(result: CkaIn, path: PathOut, a_label: str, b_label: str,
                  force: bool = False) -> Path:
    """Write a CKA result as a PNG heat map (rows A, columns B) atomically; needs the `plot`
    extra."""
    from .similarity import heatmap
    check_writable(path, force)
    buf = io.BytesIO()
    heatmap(result, buf, a_label, b_label)
    return write_atomic(path, buf.getvalue(), force)
