"""The command line's shared pieces, defined once: option types (Typer `Annotated` aliases),
choice enums, range checks, the console, and the small converters from options to the
library's objects (TrainConfig, DataSource, MixingSpec).

The choice enums are kept in step with mgrow.growth.INITS/METHODS and the manifest's
Literals (a test checks), so that `mgrow --help` does not have to import torch.

Owns every `Annotated` option alias the commands share. Imports mgrow.errors and
mgrow.limits at module level; the library (pydantic models, data, engine) inside functions.
"""

from __future__ import annotations

import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .. import limits as L
from ..errors import MgrowError


class _Console(Console):
    """rich's Console, leaving a broken pipe to main() (rich would exit 1 silently)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


# pipes and logs: no wrapping; a closed stdout (None) prints nothing
out = _Console(width=None if sys.stdout is not None and sys.stdout.isatty() else 160)


def in_range(low: float, high: float, positive: bool = False):
    """Return a typer callback refusing values outside [low, high] ((low, high] when
    `positive`), NaN and infinities in one line naming the option."""
    def check(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
        if value is None:
            return value
        opt = max(param.opts, key=len)
        if not math.isfinite(value) or value < low or (positive and value <= low):
            kind = "a positive number" if positive else f"a finite number >= {low:g}"
            raise MgrowError(f"{opt} must be {kind}, not {value:g}")
        if value > high:
            raise MgrowError(f"{opt} must be at most {high:g}, not {value:g}")
        return value
    return check


def choices(name: str, *values: str) -> type[Enum]:
    """Return a str Enum whose members are `values` (Typer shows them as choices)."""
    return Enum(name, {v: v for v in values}, type=str)


# Kept in step with mgrow.growth.INITS/METHODS and the manifest's Literals (a test checks),
# so that `mgrow --help` does not have to import torch.
Tiling = choices("Tiling", "vertical", "horizontal")


Init = choices("Init", "orthogonal", "random", "copy", "zero")
Method = choices("Method", "mixture", "random", "net2net", "gradmax", "firefly", "zero")
DeepInit = choices("DeepInit", "zero", "copy", "mixture", "identity")  # growth.DEEPEN_INITS
Sharing = choices("Sharing", "pairs", "none")
Norm = choices("Norm", "every", "block")
Spare = choices("Spare", "random", "permuted")
DataModes = choices("DataModes", "auto", "memory", "stream")  # mgrow.data.MODES
StatsModes = choices("StatsModes", "imagenet", "sample")
Schedules = choices("Schedules", "cosine", "step")  # mgrow.engine.TrainConfig.schedule
ArchName = Annotated[str, typer.Option(
    "--arch", help="wrn-D-K, resnet18, resnet34, resnet50, vgg11_bn, or a builder's network: "
    "torchvision:NAME (any torchvision classifier), timm:NAME (the timm extra).",
    show_default=False)]
BuilderOptions = Annotated[Optional[list[str]], typer.Option(
    "--builder-option", help="KEY=VALUE: a keyword argument of a torchvision:/timm: "
    "builder, recorded in the manifest (repeat for more); VALUE is read as an integer, a "
    "number, true/false, or else text. Example: --builder-option drop_path_rate=0.1.",
    show_default=False)]


def builder_options(values: list[str] | None) -> dict[str, str | bool | int | float]:
    """Return --builder-option KEY=VALUE pairs as a dict, or raise a one-line MgrowError."""
    out: dict[str, str | bool | int | float] = {}
    for text in values or []:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise MgrowError(f"--builder-option {text!r}: expected KEY=VALUE with KEY a "
                             "keyword argument's name")
        value: str | bool | int | float = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        if isinstance(value, float) and not math.isfinite(value):
            raise MgrowError(f"--builder-option {text!r}: not a finite number")
        out[key.strip()] = value
    return out


Output = Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (.safetensors).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")]
Bundle = Annotated[Path, typer.Argument(help="An mgrow bundle (.safetensors).", show_default=False)]


Templates = Annotated[int, typer.Option(
    "--templates", min=1, max=L.MAX_TEMPLATES,
    help="Templates per layer: a bank shared by L layers holds L x T. "
    "The default 2 makes a grown 2x net hold as many parameters as the plain wide net.")]


SharingOpt = Annotated[Sharing, typer.Option(
    "--sharing", help="pairs: a bank serves up to two consecutive same-shape layers (the "
    "paper's scheme); none: one bank per layer.")]


SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=L.MAX_SEED,
                                       help="Random seed (initialisation, data order).")]


def seed_of(what: str) -> type:
    """Return the --seed option of a command that reads no training data in order."""
    return Annotated[int, typer.Option("--seed", min=0, max=L.MAX_SEED,
                                       help=f"Random seed of {what}.")]


Width = Annotated[float, typer.Option("--width", callback=in_range(0, L.MAX_WIDTH, True),
                                      help="Channel multiplier (0.5: the half-width net "
                                      "that grows into width 1).")]


RefEpochs = Annotated[Optional[float], typer.Option(
    "--reference-epochs", callback=in_range(0, L.MAX_REFERENCE_EPOCHS, True),
    help="Epochs of one full from-scratch run (the 1.00X) [default: the one the bundle's "
    "--budget was set against, recorded in it; else 200].", show_default=False)]


def mixing_spec(templates: int, sharing: Sharing, edge_templates: int, freeze_edges: bool):
    from ..manifest import MixingSpec
    return MixingSpec(templates=templates, sharing=sharing.value, edge_templates=edge_templates,
                      freeze_edges=freeze_edges)


Data = Annotated[Optional[str], typer.Option(
    "--data", help="digits (built in), npz:FOLDER (train*.npz + test.npz), cifar10, "
    "cifar100, mnist, fashion-mnist, svhn (torchvision), imagefolder:FOLDER. Default: the "
    "bundle's own.")]


DataDir = Annotated[Optional[str], typer.Option(
    "--data-dir", help="Root of torchvision data sets [default: $MGROW_DATA, else "
    "~/.cache/mgrow/data].", show_default=False)]


Download = Annotated[bool, typer.Option("--download", help="Let torchvision fetch the data "
                                        "set (needs a network).")]


Subset = Annotated[Optional[int], typer.Option(
    "--subset", min=1, max=L.MAX_IMAGES,
    help="Train on the first N training images, class-balanced.")]


Epochs = Annotated[Optional[float], typer.Option(
    "--epochs", callback=in_range(0, L.MAX_EPOCHS, True),
    help="Epochs to train; fractional values train that share of an epoch's "
    "steps.")]


Lr = Annotated[float, typer.Option("--lr", callback=in_range(0, L.MAX_LR, True),
                                   help="Peak learning rate (linear warm-up, then "
                                   "cosine to 0).")]


BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=L.MAX_BATCH,
                                        help="Global batch size.")]


Warmup = Annotated[float, typer.Option("--warmup", min=0, callback=in_range(0, L.MAX_EPOCHS),
                                       help="Warm-up epochs (at most "
                                       "10% of the run).")]


Schedule = Annotated[Schedules, typer.Option(
    "--schedule", help="After the warm-up: cosine to 0, or step (0.1x at 1/3, 2/3 and 8/9 "
    "of the run: the paper's ImageNet epochs 30, 60, 80 of 90).")]


WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", min=0, callback=in_range(0, L.MAX_WEIGHT_DECAY),
    help="On templates and plain weights; never on coefficients, norms, biases.")]


Smoothing = Annotated[float, typer.Option("--label-smoothing", min=0, max=0.99,
                                          callback=in_range(0, 0.99),
                                          help="Label smoothing of the cross-entropy.")]


Device = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda, "
                                     "cuda:N.")]


Amp = Annotated[bool, typer.Option("--amp", help="bf16 autocast (CUDA only).")]


ChannelsLast = Annotated[Optional[bool], typer.Option(
    "--channels-last/--no-channels-last", help="Memory format [default: on for conv nets].",
    show_default=False)]


Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]


Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, max=L.MAX_WORKERS, help="Streamed data: DataLoader worker processes "
    "that decode and augment images (0: in this process) [default: the CPUs, at most 8]. "
    "In-memory data is batched in-process and uses none.", show_default=False)]


DataMode = Annotated[DataModes, typer.Option(
    "--data-mode", help="auto: stream image folders from disk, hold every other data set in "
    "memory; memory: decode an image folder once into memory (small folders); stream: "
    "stream it (image folders only).")]


InputSize = Annotated[Optional[int], typer.Option(
    "--input-size", min=8, max=L.MAX_INPUT_SIZE, help="Image folders: the side S the network "
    "sees (train: RandomResizedCrop(S) + flip; eval: Resize(S/0.875) + CenterCrop(S)) "
    "[default: the bundle's, else 224].", show_default=False)]


Stats = Annotated[StatsModes, typer.Option(
    "--stats", help="Streamed data: normalise by the ImageNet mean/std, or by those measured "
    "on 1,000 training images; recorded in the bundle either way.")]


Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose "
                                      "checkpoint is OUTPUT.ckpt.")]


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


AsJson = Annotated[bool, typer.Option("--json", help="Progress and result as JSON lines on "
                                      "stdout.")]


def check_positive(option: str, value: float | None) -> None:
    """Raise MgrowError unless `value` (when given) is a finite positive number."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise MgrowError(f"{option} must be a positive number, not {value:g}")


def print_json(obj: object, indent: int | None = 1) -> None:
    print(L.dump_json(obj, indent))


def train_config(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device, amp,
         channels_last, compile_, schedule):
    from pydantic import ValidationError

    from ..engine import TrainConfig
    check_positive("--epochs", epochs)
    try:
        return TrainConfig(epochs=epochs or 1.0, lr=lr, batch_size=batch_size,
                           warmup_epochs=warmup, weight_decay=weight_decay,
                           label_smoothing=label_smoothing, seed=seed, device=device, amp=amp,
                           channels_last=channels_last, compile=compile_,
                           schedule=schedule.value)
    except ValidationError as e:  # name the option, not the config field
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "option"
        option = "--" + {"warmup_epochs": "warmup"}.get(field, field).replace("_", "-")
        raise MgrowError(f"{option}: {err['msg']} (got {err.get('input')!r})") from None


def data_source(data, data_dir, download, subset, data_mode=DataModes.auto, workers=None,
            input_size=None, stats=StatsModes.imagenet):
    from ..data import DataSource
    return DataSource(data, data_dir, download, subset, data_mode.value, workers, input_size,
                      stats.value)


def progress_mode(quiet: bool, as_json: bool) -> str:
    return "json" if as_json else "quiet" if quiet else "bar"
