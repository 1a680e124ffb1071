"""The `mgrow` command line: one function a subcommand; parse, call the library, print."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from . import MgrowError, __version__
from . import limits as L

# `mgrow --help` lists the commands in the order a user runs them
PIPELINE = ("convert", "train", "train-sibling", "fuse", "finetune", "eval", "flops", "info",
            "cka", "export")


class _Pipeline(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        """Return the command names in pipeline order (any other command last)."""
        rank = {name: i for i, name in enumerate(PIPELINE)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(cls=_Pipeline, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Grow a trained network into a wider one (MixtureGrowth). Every file "
                       "mgrow reads or writes is a safetensors bundle with a manifest.")
class _Console(Console):
    """rich's Console, leaving a broken pipe to main() (rich would exit 1 silently)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


# pipes and logs: no wrapping; a closed stdout (None) prints nothing
out = _Console(width=None if sys.stdout is not None and sys.stdout.isatty() else 160)


def _number(low: float, high: float, positive: bool = False):
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


def _choices(name: str, *values: str) -> type[Enum]:
    """Return a str Enum whose members are `values` (Typer shows them as choices)."""
    return Enum(name, {v: v for v in values}, type=str)


# Kept in step with mgrow.growth.INITS/METHODS and the manifest's Literals (a test checks),
# so that `mgrow --help` does not have to import torch.
Tiling = _choices("Tiling", "vertical", "horizontal")
Init = _choices("Init", "orthogonal", "random", "copy", "zero")
Method = _choices("Method", "mixture", "random", "net2net", "gradmax", "firefly")
Sharing = _choices("Sharing", "pairs", "none")
Norm = _choices("Norm", "every", "block")
Spare = _choices("Spare", "random", "permuted")
DataModes = _choices("DataModes", "auto", "memory", "stream")  # mgrow.data.MODES
StatsModes = _choices("StatsModes", "imagenet", "sample")
Schedules = _choices("Schedules", "cosine", "step")  # mgrow.engine.TrainConfig.schedule


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
Width = Annotated[float, typer.Option("--width", callback=_number(0, L.MAX_WIDTH, True),
                                      help="Channel multiplier (0.5: the half-width net "
                                      "that grows into width 1).")]
RefEpochs = Annotated[float, typer.Option(
    "--reference-epochs", callback=_number(0, L.MAX_REFERENCE_EPOCHS, True),
    help="Epochs of one full from-scratch run (the 1.00X).")]


def _version(value: bool) -> None:
    if value:
        print(f"mgrow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show Python tracebacks instead of one-line errors.")] = False,
        version: Annotated[Optional[bool], typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version.")] = None):
    pass


def _mixing(templates: int, sharing: Sharing, edge_templates: int, freeze_edges: bool):
    from .manifest import MixingSpec
    return MixingSpec(templates=templates, sharing=sharing.value, edge_templates=edge_templates,
                      freeze_edges=freeze_edges)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Plain checkpoint: .pt/.pth state_dict (or a dict "
                                        "holding one under 'state_dict' or 'model'), or a "
                                        "plain .safetensors.", show_default=False)],
    arch: Annotated[str, typer.Option("--arch", help="Registry name: wrn-D-K, resnet18, "
                                      "resnet34, resnet50, vgg11_bn.", show_default=False)],
    output: Output,
    num_classes: Annotated[Optional[int], typer.Option(
        "--num-classes", min=1, max=L.MAX_CLASSES,
        help="Classes [default: the checkpoint classifier's rows].", show_default=False)] = None,
    width: Width = 1.0,
    in_channels: Annotated[Optional[int], typer.Option(
        "--in-channels", min=1, max=L.MAX_CHANNELS,
        help="Input channels [default: the checkpoint stem's].", show_default=False)] = None,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", min=8, max=L.MAX_INPUT_SIZE, help="Input side in pixels, for FLOPs "
        "[default: 224 for resnet and vgg, 32 for wrn].", show_default=False)] = None,
    norm: Annotated[Norm, typer.Option("--norm", help="WRN only: BN before every conv, or "
                                       "only before each block.")] = Norm.every,
    templates: Templates = 2,
    sharing: SharingOpt = Sharing.pairs,
    edge_templates: Annotated[int, typer.Option("--edge-templates", min=1,
                                                max=L.MAX_TEMPLATES,
                                                help="Templates of stem and classifier.")] = 1,
    freeze_edges: Annotated[bool, typer.Option(
        "--freeze-edges/--train-edges", help="Freeze stem/classifier coefficients "
        "(the paper's default).")] = True,
    plain: Annotated[bool, typer.Option("--plain", help="Import as a plain (not "
                                        "template-mixed) bundle.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Record the data set it was "
                                                "trained on (spec as for train).")] = None,
    mean: Annotated[Optional[str], typer.Option(
        "--mean", help="With --data: the per-channel mean the checkpoint's inputs were "
        "normalised with, 0-1 scale, comma-separated or one for all (torchvision's ImageNet "
        "models: 0.485,0.456,0.406) [default: --data's own: measured on its training split; "
        "ImageNet's for a streamed image folder].",
        show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(
        "--std", help="With --data: the per-channel std, as --mean (ImageNet: "
        "0.229,0.224,0.225).", show_default=False)] = None,
    spare: Annotated[Spare, typer.Option(
        "--spare", help="What fills a bank's spare templates (the directions new tiles draw "
        "on at growth): random (fresh random tensors) or permuted (the bank's trained "
        "layers with shuffled channels).")] = Spare.random,
    seed: SeedOpt = 0,
    force: Force = False,
):
    """Recast a plain PyTorch checkpoint as a template-mixed bundle computing the same function."""
    from .convert import convert_checkpoint
    path, manifest = convert_checkpoint(
        src, arch_name=arch, num_classes=num_classes, width=width, in_channels=in_channels,
        input_size=input_size, norm=norm.value, mixing=None if plain else _mixing(
            templates, sharing, edge_templates, freeze_edges),
        data=data, seed=seed, spare=spare.value, normalisation=_normalisation(mean, std),
        output=output, force=force)
    print(f"wrote {path} ({manifest.describe()})")


def _normalisation(mean: str | None, std: str | None
                   ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Return convert's --mean and --std as float tuples (None when neither is given)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise MgrowError("--mean and --std go together: give both")

    def floats(name: str, text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            raise MgrowError(f"{name} takes comma-separated numbers, not {text!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise MgrowError(f"{name} takes finite numbers, not {text!r}")
        return values
    return floats("--mean", mean), floats("--std", std)


@app.command()
def flops(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", min=8, max=L.MAX_INPUT_SIZE,
        help="Count at this input side instead of the manifest's.")] = None,
    reference_epochs: RefEpochs = 200,
):
    """Forward FLOPs (fvcore) per layer, parameter counts and the training-FLOPs ledger."""
    from .api import count_flops
    report = count_flops(bundle, reference_epochs, input_size)
    if as_json:
        _print_json(report)
        return
    out.print(f"{report['arch']}: {report['convention']}", soft_wrap=True)
    table = Table(title="forward FLOPs per image")
    for col in ("module", "type", "FLOPs", "share", "plain params"):
        table.add_column(col, justify="left" if col in ("module", "type") else "right")
    total = report["forward_flops"]
    for row in report["layers"]:
        table.add_row(row["module"], row["type"], f"{row['flops']:,}",
                      f"{100 * row['flops'] / total:.1f}%", f"{row['params']:,}")
    table.add_row("total", "", f"{total:,}", "100%", "", style="bold")
    out.print(table)
    _print_params_and_ledger(report)


def _print_params_and_ledger(report: dict) -> None:
    """Print a report's parameter counts by kind, then its training-FLOPs ledger."""
    params = Table(title="parameters")
    params.add_column("kind")
    params.add_column("count", justify="right")
    for k, v in report["params"].items():
        params.add_row(k, f"{v:,}")
    out.print(params)
    _print_ledger(report["ledger"])


def _print_ledger(led: dict) -> None:
    """Print the training-FLOPs ledger table and its base/growth/total line."""
    ledger = Table(title=f"training-FLOPs ledger (1.00X = {led['reference_epochs']:g} epochs "
                   f"of this architecture from scratch = {led['reference_flops']:.3e} FLOPs)")
    for col in ("operation", "stage", "network", "images", "train FLOPs", "norm", "top-1",
                "wall s", "device"):
        ledger.add_column(col)
    for r in led["rows"]:
        ledger.add_row(r["operation"], r["stage"], r["arch"], f"{r['images']:,}",
                       f"{r['train_flops']:.3e}", _x(r["norm"]),
                       "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
                       f"{r['wall_s']:.1f}", r["device"])
    out.print(ledger)
    out.print(f"base (the starting checkpoint): {_x(led['base_norm'])}   growth: "
              f"{_x(led['growth_norm'])}   total: {_x(led['total_norm'])}")


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}X"


@app.command()
def export(bundle: Bundle, output: Output, force: Force = False):
    """Write the plain network (weights generated, no templates) for deployment."""
    from .bundle import export_plain
    path = export_plain(bundle, output, force)
    print(f"wrote {path} (plain state_dict; load with safetensors.torch.load_file)")


@app.command()
def fuse(
    a: Annotated[Path, typer.Argument(help="The trained network (member 0), or a grown "
                                      "bundle to grow again (alone).", show_default=False)],
    b: Annotated[Optional[Path], typer.Argument(
        help="Its sibling (member 1). Omit to grow from A alone (MixtureGrowth w/o fusion).",
        show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Bundle to write [default: A-grown.safetensors next to A, "
        "numbered, never overwriting].", show_default=False)] = None,
    factor: Annotated[int, typer.Option("--factor", min=2, max=L.MAX_FACTOR,
                                        help="Growth factor g: every layer g "
                                        "times wider. With m members and g > m, tile row/"
                                        "column j draws on member j mod m.")] = 2,
    tiling: Annotated[Tiling, typer.Option(
        "--tiling", help="vertical: tiles of one output row share that row's member's "
        "templates (paper's best); horizontal: tiles of one input column do.")] = Tiling.vertical,
    init: Annotated[Init, typer.Option(
        "--init", help="New coefficients: orthogonal (to each other and the existing ones, "
        "at their norm), random (normal, same scale), copy (the member's own, +--noise), "
        "zero (grown net = mean of the members).")] = Init.orthogonal,
    method: Annotated[Method, typer.Option(
        "--method", help="mixture (MixtureGrowth); baselines with plain outputs: random "
        "(fresh plain weights for new tiles), net2net (function-preserving widening of A), "
        "gradmax (zero fan-out, fan-in from gradient SVD; reads data), firefly (best of "
        "split and new candidates after a few steps; reads data).")
    ] = Method.mixture,
    noise: Annotated[Optional[float], typer.Option(
        "--noise", callback=_number(0, L.MAX_NOISE),
        help="Relative noise on new tiles: copy (default 0), net2net (default "
        "0.01); firefly: perturbation of split copies' fan-in (default 0.1).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="gradmax/firefly: the data their growth step reads (spec as for "
        "train) [default: A's own].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, max=L.MAX_BATCH,
        help="gradmax/firefly: images per growth step.")] = 64,
    growth_steps: Annotated[int, typer.Option(
        "--growth-steps", min=1, max=1_000_000,
        help="gradmax: batches of gradient statistics; firefly: "
        "optimiser steps per candidate kind. Charged to the ledger as a growth phase.")] = 8,
    subset: Annotated[Optional[int], typer.Option(
        "--subset", min=1, max=L.MAX_IMAGES,
        help="gradmax/firefly: draw batches from the first N training "
        "images, class-balanced.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(
        "--data-dir", help="Root of torchvision data sets [default: $MGROW_DATA, else "
        "~/.cache/mgrow/data].", show_default=False)] = None,
    bn_correct: Annotated[bool, typer.Option(
        "--bn-correct/--no-bn-correct", help="Correct the carried BN running statistics for "
        "what the new tiles add, without data (inputs distilled from the members' own BN "
        "statistics; see README).")] = False,
    seed: SeedOpt = 0,
    force: Force = False,
):
    """Grow one or two trained bundles, or a grown one again, into a wider one.

    mixture, random and net2net need no data; gradmax and firefly read a few batches.
    """
    from .api import fuse_bundles
    from .phases import DataSource
    path, grown = fuse_bundles(a, b, output, factor=factor, tiling=tiling.value,
                               init=init.value, method=method.value, seed=seed, noise=noise,
                               source=DataSource(data, data_dir, False, subset),
                               batch_size=batch_size, steps=growth_steps,
                               bn_correct=bn_correct, force=force)
    for note in grown.notes[:3]:
        print(f"note: {note}", file=sys.stderr)
    if len(grown.notes) > 3:
        print(f"note: (+{len(grown.notes) - 3} more banks alike; all listed in the manifest's "
              "growth.rank_notes)", file=sys.stderr)
    print(f"wrote {path} ({grown.manifest.describe()}, method {method.value}"
              + (f", init {init.value}, tiling {tiling.value})" if method == Method.mixture
          else ")"))


# -- training commands: one shared set of options (timm's names), one engine ------------------

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
    "--epochs", callback=_number(0, L.MAX_EPOCHS, True),
    help="Epochs to train; fractional values train that share of an epoch's "
    "steps.")]
Lr = Annotated[float, typer.Option("--lr", callback=_number(0, L.MAX_LR, True),
                                   help="Peak learning rate (linear warm-up, then "
                                   "cosine to 0).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=L.MAX_BATCH,
                                        help="Global batch size.")]
Warmup = Annotated[float, typer.Option("--warmup", min=0, callback=_number(0, L.MAX_EPOCHS),
                                       help="Warm-up epochs (at most "
                                       "10% of the run).")]
Schedule = Annotated[Schedules, typer.Option(
    "--schedule", help="After the warm-up: cosine to 0, or step (0.1x at 1/3, 2/3 and 8/9 "
    "of the run: the paper's ImageNet epochs 30, 60, 80 of 90).")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", min=0, callback=_number(0, L.MAX_WEIGHT_DECAY),
    help="On templates and plain weights; never on coefficients, norms, biases.")]
Smoothing = Annotated[float, typer.Option("--label-smoothing", min=0, max=0.99,
                                          callback=_number(0, 0.99),
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


def _positive(option: str, value: float | None) -> None:
    """Raise MgrowError unless `value` (when given) is a finite positive number."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise MgrowError(f"{option} must be a positive number, not {value:g}")


def _print_json(obj: object, indent: int | None = 1) -> None:
    print(L.dump_json(obj, indent))


def _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device, amp,
         channels_last, compile_, schedule):
    from pydantic import ValidationError
    from .engine import TrainConfig
    _positive("--epochs", epochs)
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


def _source(data, data_dir, download, subset, data_mode=DataModes.auto, workers=None,
            input_size=None, stats=StatsModes.imagenet):
    from .phases import DataSource
    return DataSource(data, data_dir, download, subset, data_mode.value, workers, input_size,
                      stats.value)


def _report(outcome, as_json: bool) -> None:
    from .engine import is_main_process
    from .phases import describe_outcome, metrics_json
    if not is_main_process():  # under torchrun rank 0 alone reports
        return
    for note in outcome.result.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        print(metrics_json(outcome))
    else:
        print(describe_outcome(outcome))


def _progress(quiet: bool, as_json: bool) -> str:
    return "json" if as_json else "quiet" if quiet else "bar"


@app.command()
def train(
    arch: Annotated[str, typer.Option("--arch", help="Registry name: wrn-D-K, resnet18, "
                                      "resnet34, resnet50, vgg11_bn.", show_default=False)],
    output: Output,
    data: Annotated[str, typer.Option("--data", help="Data set (see train-sibling --help); "
                                      "classes and input follow it.")] = "digits",
    epochs: Epochs = 10,
    mixed: Annotated[bool, typer.Option("--mixed/--plain", help="Template-mixed (growable) "
                                        "or plain network.")] = True,
    width: Width = 1.0,
    norm: Annotated[Norm, typer.Option("--norm", help="WRN only: BN before every conv, or "
                                       "only before each block.")] = Norm.every,
    templates: Templates = 2,
    sharing: SharingOpt = Sharing.pairs,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    schedule: Schedule = Schedules.cosine,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0, seed: SeedOpt = 0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = None, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, data_mode: DataMode = DataModes.auto, input_size: InputSize = None,
    stats: Stats = StatsModes.imagenet, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Train a network from scratch: a first small net, or the Small/Large baselines."""
    from .api import train as run
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = _source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(arch, output, data=source, config=cfg, width=width, mixed=mixed,
                  norm=norm.value, templates=templates, sharing=sharing.value, resume=resume,
                  progress=_progress(quiet, as_json), force=force)
    _report(outcome, as_json)


@app.command("train-sibling")
def train_sibling(
    small: Annotated[Path, typer.Argument(help="The trained small bundle whose sibling to "
                                          "train.", show_default=False)],
    epochs: Annotated[float, typer.Option(
        "--epochs", help="Epochs to train the sibling (the growth point times the small "
        "net's epochs); fractional values train that share of an epoch's steps.",
        show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Bundle to write [default: SMALL-sibling.safetensors, "
        "numbered, never overwriting].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", min=0, max=L.MAX_SEED,
        help="Seed of the fresh templates and data order [default: SMALL's + 1].",
        show_default=False)] = None,
    data: Data = None,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    schedule: Schedule = Schedules.cosine,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = None, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, data_mode: DataMode = DataModes.auto, input_size: InputSize = None,
    stats: Stats = StatsModes.imagenet, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Train a same-shape sibling of SMALL with fresh, independent templates (for fuse)."""
    from .api import train_sibling as run
    from .phases import small_seed
    if seed is None:
        seed = small_seed(small) + 1
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = _source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(small, output, data=source, config=cfg, resume=resume,
                  progress=_progress(quiet, as_json), force=force)
    _report(outcome, as_json)


@app.command()
def finetune(
    bundle: Bundle,
    output: Output,
    epochs: Epochs = None,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", callback=_number(0, L.MAX_BUDGET, True),
        help="Instead of --epochs: train until the growth FLOPs (the ledger's "
        "growth stage: sibling + this run) reach X times one full from-scratch run of this "
        "architecture; prints the epochs it computes.")] = None,
    reference_epochs: RefEpochs = 200,
    bn_recalibrate: Annotated[int, typer.Option(
        "--bn-recalibrate", min=0, max=1_000_000,
        help="Before the first step, re-estimate the BN running "
        "statistics on N training batches (forward only, no weight update; charged to the "
        "ledger). Useful right after fuse.")] = 0,
    data: Data = None,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    schedule: Schedule = Schedules.cosine,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0, seed: SeedOpt = 0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = None, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, data_mode: DataMode = DataModes.auto, input_size: InputSize = None,
    stats: Stats = StatsModes.imagenet, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Continue training any bundle, typically a grown one (everything trainable)."""
    from .api import finetune as run
    if (epochs is None) == (budget is None):
        raise MgrowError("give exactly one of --epochs and --budget")
    _positive("--budget", budget)
    _positive("--reference-epochs", reference_epochs)
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = _source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(bundle, output, data=source, config=cfg, budget=budget,
                  reference_epochs=reference_epochs, bn_recalibrate=bn_recalibrate, resume=resume,
                  progress=_progress(quiet, as_json), force=force)
    from .engine import is_main_process
    if budget is not None and not as_json and is_main_process():
        out.print(f"--budget {budget:g}X -> {outcome.epochs:.3f} epochs")
    _report(outcome, as_json)


@app.command("eval")
def evaluate(
    bundle: Bundle,
    data: Data = None,
    batch_size: BatchSize = 512,
    device: Device = "auto",
    data_dir: DataDir = None,
    download: Download = False,
    workers: Workers = None,
    data_mode: DataMode = DataModes.auto,
    input_size: InputSize = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Top-1 accuracy and loss of a bundle on the test split."""
    from .api import evaluate as run
    res = run(bundle, _source(data, data_dir, download, None, data_mode, workers, input_size),
              device, batch_size)
    if as_json:
        _print_json(res, indent=None)
    else:
        print(f"{res['bundle']} on {res['data']} ({res['test_images']:,} test images): "
              f"top-1 {100 * res['top1']:.2f}%, loss {res['loss']:.4f}")


@app.command()
def info(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    reference_epochs: RefEpochs = 200,
):
    """What a bundle holds: manifest, lineage (parents, operations, options), ledger, parameters."""
    from .api import info as run
    _positive("--reference-epochs", reference_epochs)
    res = run(bundle, reference_epochs)
    if as_json:
        _print_json(res)
        return
    out.print(f"{res['bundle']}: {res['description']}, {res['bytes']:,} bytes, sha256 "
              f"{res['sha256'][:16]}..., format {res['format_version']}", soft_wrap=True)
    for key in ("arch", "mixing", "data", "growth"):
        if res[key] is not None:
            out.print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in res[key].items()),
                      soft_wrap=True, highlight=False)
    from rich.tree import Tree
    tree = Tree(f"lineage of {res['bundle']}", highlight=False)
    _lineage_tree(tree, res["lineage"])
    out.print(tree)
    _print_params_and_ledger(res)


def _step(lineage: dict) -> str:
    """Return 'operation: option value, ...' for one lineage step."""
    opts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in lineage["options"].items() if v is not None)
    return f"{lineage['operation']}: {opts}" if opts else lineage["operation"]


def _lineage_tree(tree, lineage: dict) -> None:
    """Add a lineage (earlier history, then the last operation and its parents) to a tree."""
    for h in lineage["history"]:
        tree.add(f"(earlier) {_step(h)}")
    node = tree.add(_step(lineage))
    for p in lineage["parents"]:
        where = {"found": f"found at {p.get('found_at')}", "missing": "not found",
                 "changed": "changed since (sha256 differs)"}[p["status"]]
        child = node.add(f"parent {p['path']} ({p.get('description', '')}"
                         f"{', ' if 'description' in p else ''}sha256 {p['sha256'][:12]}..., "
                         f"{where})")
        if "lineage" in p:
            _lineage_tree(child, p["lineage"])


@app.command()
def cka(
    a: Annotated[Path, typer.Argument(help="First bundle (rows of the matrix).",
                                      show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second bundle (columns); may be of another "
                                      "width, e.g. the grown net.", show_default=False)],
    data: Data = None,
    images: Annotated[Optional[int], typer.Option(
        "--images", min=2, max=L.MAX_IMAGES, help="Test images the features are computed on: "
        "the first N of the test split [default: 512, or the whole split if smaller].",
        show_default=False)
    ] = None,
    device: Device = "cpu",
    data_dir: DataDir = None,
    download: Download = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every layer pair).")
                       ] = False,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Also write the layer x layer CKA matrix as a heat map (needs "
        "matplotlib: the `plot` extra).", show_default=False)] = None,
    force: Force = False,
):
    """Linear CKA between the layers' features of two bundles (the paper's Figs. 4-5)."""
    from .api import cka as run, write_heatmap
    if png is not None:
        from .bundle import check_writable
        check_writable(png, force)
    res = run(a, b, _source(data, data_dir, download, None), images, device)
    matched = res.matched()
    if png is not None:
        write_heatmap(res, png, str(a), str(b), force)
    if as_json:
        _print_json({"a": str(a), "b": str(b), "images": res.images,
                     "layers_a": res.layers_a, "layers_b": res.layers_b,
                     "matrix": res.matrix, "matched": matched,
                     "png": None if png is None else str(png)})
        return
    table = Table(title=f"linear CKA of same-name layers, {a.name} vs {b.name} "
                  f"({res.images} test images)")
    table.add_column("layer")
    table.add_column("CKA", justify="right")
    table.add_column("best match in B", justify="left")
    for i, name in enumerate(res.layers_a):
        row = res.matrix[i]
        j = max(range(len(row)), key=lambda k: -1 if row[k] != row[k] else row[k])
        table.add_row(name, "" if name not in matched else f"{matched[name]:.3f}",
                      f"{res.layers_b[j]} ({row[j]:.3f})")
    out.print(table)
    if matched:
        mean = sum(matched.values()) / len(matched)
        out.print(f"mean over {len(matched)} same-name layers: {mean:.3f}")
    if png is not None:
        out.print(f"wrote {png}")


def main() -> None:
    """Run the CLI; user errors print one line on stderr and exit 2 (with --debug: raise).

    Anything unforeseen also ends in one line (exit 1) naming the command and the
    exception, pointing to --debug for the traceback. A closed stdout prints nothing; one
    closed by its reader (broken pipe) ends in one line and exit 141, as SIGPIPE would.
    """
    _reopen_closed_fds()
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 prints
        with contextlib.suppress(AttributeError, ValueError):  # escaped, not as a crash
            stream.reconfigure(errors="backslashreplace")
    # Ctrl-C or SIGTERM outside a training loop (which saves a checkpoint on them): one
    # line, locks released, temporary files removed; not a silent kill
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)
    try:
        code = _run()
        _flush_stdout()
    except BrokenPipeError:
        code = _broken_pipe()
    sys.exit(code)


def _run() -> int:
    """Return the exit status of the command line, after printing any error in one line."""
    try:
        code = app(standalone_mode=False, prog_name="mgrow")
        if _SIGNALS:  # typer returns KeyboardInterrupt as a silent exit status 130
            return _interrupted()
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except BrokenPipeError:
        raise
    except typer.TyperException as e:  # usage errors: one line naming the command's --help
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `mgrow`: the help, not an error
            print(e.format_message())
            return 0
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _error(f"{' '.join(e.format_message().split())}{hint}", e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a training loop
        return _interrupted()
    except MgrowError as e:
        if "--debug" in sys.argv:
            raise
        if type(e).__name__ == "Interrupted":  # engine.Interrupted: stopped by a signal
            _ignore_signals()
        return _error(str(e), getattr(e, "exit_code", 2))
    except OSError as e:
        if "--debug" in sys.argv:
            raise
        return _error(str(e), 2)
    except ValidationError as e:  # a value the schema refuses that no earlier check caught
        if "--debug" in sys.argv:
            raise
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or e.title
        return _error(f"invalid {loc}: {err['msg']} (got {err.get('input')!r:.60})", 2)
    except Exception as e:  # the last resort: one line, never a traceback
        if "--debug" in sys.argv:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "mgrow")
        what = " ".join(str(e).split())[:200]
        return _error(f"{command} failed unexpectedly: {type(e).__name__}"
                      f"{': ' + what if what else ''} (run again with --debug for the "
                      "traceback)", 1)


_SIGNALS: list[int] = []  # the signals that interrupted a command outside training


def _on_signal(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM outside a training loop: unwind from wherever the program is."""
    _SIGNALS.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    """Return the exit status of Ctrl-C or SIGTERM outside training, after one line."""
    _ignore_signals()
    if _SIGNALS and _SIGNALS[0] == signal.SIGTERM:
        return _error("terminated by SIGTERM; nothing was written", 143)
    return _error("interrupted; nothing was written", 130)


def _error(message: str, code: int) -> int:
    """Print `mgrow: error: MESSAGE` on stderr and return `code`."""
    print(f"mgrow: error: {message}", file=sys.stderr)
    return code


def _reopen_closed_fds() -> None:
    """Put /dev/null on a closed stdin, stdout or stderr, so that no file mgrow opens takes
    their descriptor (and C libraries writing to fd 1 or 2 write nowhere)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: this one
    if sys.stderr is None:  # else print(file=sys.stderr) would write to stdout
        sys.stderr = open(2, "w", closefd=False)


def _flush_stdout() -> None:
    """Flush stdout now, so a broken pipe is reported here rather than at interpreter exit."""
    if sys.stdout is not None:
        sys.stdout.flush()


def _broken_pipe() -> int:
    """Return 141 after one line, once the reader of stdout went away (see main)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush finds no pipe
    return _error("stdout was closed by its reader (broken pipe)", 141)


def _ignore_signals() -> None:
    """Ignore further Ctrl-C/SIGTERM while exiting after an interruption: a user pressing
    Ctrl-C again would otherwise get tracebacks from interpreter shutdown after the one-line
    message."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
