"""The `mgrow` command line: one function a subcommand; parse, call the library, print."""

from __future__ import annotations

import json
import math
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from . import MgrowError, __version__

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
out = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs: no wrapping


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


Output = Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (.safetensors).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")]
Bundle = Annotated[Path, typer.Argument(help="An mgrow bundle (.safetensors).", show_default=False)]
Templates = Annotated[int, typer.Option(
    "--templates", min=1, help="Templates per layer: a bank shared by L layers holds L x T. "
    "The default 2 makes a grown 2x net hold as many parameters as the plain wide net.")]
SharingOpt = Annotated[Sharing, typer.Option(
    "--sharing", help="pairs: a bank serves up to two consecutive same-shape layers (the "
    "paper's scheme); none: one bank per layer.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (initialisation, data order).")]


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
    num_classes: Annotated[int, typer.Option("--num-classes", min=1, help="Classes.")] = 10,
    width: Annotated[float, typer.Option("--width", help="Channel multiplier.")] = 1.0,
    in_channels: Annotated[int, typer.Option("--in-channels", help="Input channels.")] = 3,
    input_size: Annotated[int, typer.Option("--input-size", help="Input side in pixels "
                                            "(for FLOPs).")] = 32,
    norm: Annotated[Norm, typer.Option("--norm", help="WRN only: BN before every conv, or "
                                       "only before each block.")] = Norm.every,
    templates: Templates = 2,
    sharing: SharingOpt = Sharing.pairs,
    edge_templates: Annotated[int, typer.Option("--edge-templates", min=1,
                                                help="Templates of stem and classifier.")] = 1,
    freeze_edges: Annotated[bool, typer.Option(
        "--freeze-edges/--train-edges", help="Freeze stem/classifier coefficients "
        "(the paper's default).")] = True,
    plain: Annotated[bool, typer.Option("--plain", help="Import as a plain (not "
                                        "template-mixed) bundle.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Record the data set it was "
                                                "trained on (spec as for train).")] = None,
    seed: SeedOpt = 0,
    force: Force = False,
):
    """Recast a plain PyTorch checkpoint as a template-mixed bundle computing the same function."""
    from .convert import convert_checkpoint
    path, manifest = convert_checkpoint(
        src, arch_name=arch, num_classes=num_classes, width=width, in_channels=in_channels,
        input_size=input_size, norm=norm.value, mixing=None if plain else _mixing(
            templates, sharing, edge_templates, freeze_edges),
        data=data, seed=seed, output=output, force=force)
    print(f"wrote {path} ({manifest.describe()})")


@app.command()
def flops(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", help="Count at this input side instead of the manifest's.")] = None,
    reference_epochs: Annotated[float, typer.Option(
        "--reference-epochs", help="Epochs of one full from-scratch run (the 1.00X).")] = 200,
):
    """Forward FLOPs (fvcore) per layer, parameter counts and the training-FLOPs ledger."""
    from .api import count_flops
    if input_size is not None and input_size < 8:
        raise MgrowError(f"--input-size must be at least 8, not {input_size}")
    _positive("--reference-epochs", reference_epochs)
    report = count_flops(bundle, reference_epochs, input_size)
    if as_json:
        print(json.dumps(report, indent=1))
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
    factor: Annotated[int, typer.Option("--factor", help="Growth factor g: every layer g "
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
        "--noise", help="Relative noise on new tiles: copy (default 0), net2net (default "
        "0.01); firefly: perturbation of split copies' fan-in (default 0.1).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="gradmax/firefly: the data their growth step reads (spec as for "
        "train) [default: A's own].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="gradmax/firefly: images per growth step.")] = 64,
    growth_steps: Annotated[int, typer.Option(
        "--growth-steps", min=1, help="gradmax: batches of gradient statistics; firefly: "
        "optimiser steps per candidate kind. Charged to the ledger as a growth phase.")] = 8,
    subset: Annotated[Optional[int], typer.Option(
        "--subset", min=1, help="gradmax/firefly: draw batches from the first N training "
        "images, class-balanced.")] = None,
    data_dir: Annotated[Optional[str], typer.Option(
        "--data-dir", help="Root of torchvision data sets [default: $MGROW_DATA, else "
        "~/.cache/mgrow/data].", show_default=False)] = None,
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
                                 batch_size=batch_size, steps=growth_steps, force=force)
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
    "--subset", min=1, help="Train on the first N training images, class-balanced.")]
Epochs = Annotated[Optional[float], typer.Option(
    "--epochs", help="Epochs to train; fractional values train that share of an epoch's "
    "steps.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, then "
                                   "cosine to 0).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Global batch size.")]
Warmup = Annotated[float, typer.Option("--warmup", min=0, help="Warm-up epochs (at most "
                                       "10% of the run).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", min=0, help="On templates and "
                                            "plain weights; never on coefficients, norms, "
                                            "biases.")]
Smoothing = Annotated[float, typer.Option("--label-smoothing", min=0, max=0.99,
                                          help="Label smoothing of the cross-entropy.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda, "
                                     "cuda:N.")]
Amp = Annotated[bool, typer.Option("--amp", help="bf16 autocast (CUDA only).")]
ChannelsLast = Annotated[Optional[bool], typer.Option(
    "--channels-last/--no-channels-last", help="Memory format [default: on for conv nets].",
    show_default=False)]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
Workers = Annotated[int, typer.Option("--workers", min=0, help="Accepted for timm "
                                      "compatibility; data is held in memory and batched "
                                      "in-process, so no loader workers are used.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run whose "
                                      "checkpoint is OUTPUT.ckpt.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
AsJson = Annotated[bool, typer.Option("--json", help="Progress and result as JSON lines on "
                                      "stdout.")]


def _positive(option: str, value: float | None) -> None:
    """Raise MgrowError unless `value` (when given) is a finite positive number."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise MgrowError(f"{option} must be a positive number, not {value:g}")


def _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device, amp,
         channels_last, compile_):
    from pydantic import ValidationError
    from .engine import TrainConfig
    _positive("--epochs", epochs)
    try:
        return TrainConfig(epochs=epochs or 1.0, lr=lr, batch_size=batch_size,
                           warmup_epochs=warmup, weight_decay=weight_decay,
                           label_smoothing=label_smoothing, seed=seed, device=device, amp=amp,
                           channels_last=channels_last, compile=compile_)
    except ValidationError as e:  # name the option, not the config field
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "option"
        option = "--" + {"warmup_epochs": "warmup"}.get(field, field).replace("_", "-")
        raise MgrowError(f"{option}: {err['msg']} (got {err.get('input')!r})") from None


def _source(data, data_dir, download, subset):
    from .phases import DataSource
    return DataSource(data, data_dir, download, subset)


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
    width: Annotated[float, typer.Option("--width", help="Channel multiplier (0.5: the "
                                         "half-width net that grows into width 1).")] = 1.0,
    norm: Annotated[Norm, typer.Option("--norm", help="WRN only: BN before every conv, or "
                                       "only before each block.")] = Norm.every,
    templates: Templates = 2,
    sharing: SharingOpt = Sharing.pairs,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0, seed: SeedOpt = 0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = 0, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Train a network from scratch: a first small net, or the Small/Large baselines."""
    from .api import train as run
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_)
    outcome = run(arch, output, data=_source(data, data_dir, download, subset), config=cfg,
                  width=width, mixed=mixed, norm=norm.value, templates=templates,
                  sharing=sharing.value, resume=resume, progress=_progress(quiet, as_json),
                  force=force)
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
        "--seed", help="Seed of the fresh templates and data order [default: SMALL's + 1].",
        show_default=False)] = None,
    data: Data = None,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = 0, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Train a same-shape sibling of SMALL with fresh, independent templates (for fuse)."""
    from .bundle import load
    from .api import train_sibling as run
    if seed is None:
        seed = int(load(small).manifest.lineage.options.get("seed", 0)) + 1
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_)
    outcome = run(small, output, data=_source(data, data_dir, download, subset), config=cfg,
                  resume=resume, progress=_progress(quiet, as_json), force=force)
    _report(outcome, as_json)


@app.command()
def finetune(
    bundle: Bundle,
    output: Output,
    epochs: Epochs = None,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="Instead of --epochs: train until the growth FLOPs (the ledger's "
        "growth stage: sibling + this run) reach X times one full from-scratch run of this "
        "architecture; prints the epochs it computes.")] = None,
    reference_epochs: Annotated[float, typer.Option(
        "--reference-epochs", help="Epochs of the full from-scratch run (1.00X).")] = 200,
    data: Data = None,
    lr: Lr = 0.1, batch_size: BatchSize = 128, warmup: Warmup = 1.0,
    weight_decay: WeightDecay = 5e-4, label_smoothing: Smoothing = 0.0, seed: SeedOpt = 0,
    device: Device = "auto", amp: Amp = False, channels_last: ChannelsLast = None,
    compile_: Compile = False,
    workers: Workers = 0, data_dir: DataDir = None, download: Download = False,
    subset: Subset = None, resume: Resume = False, quiet: Quiet = False,
    as_json: AsJson = False, force: Force = False,
):
    """Continue training any bundle, typically a grown one (everything trainable)."""
    from .api import finetune as run
    if (epochs is None) == (budget is None):
        raise MgrowError("give exactly one of --epochs and --budget")
    _positive("--budget", budget)
    _positive("--reference-epochs", reference_epochs)
    cfg = _cfg(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_)
    outcome = run(bundle, output, data=_source(data, data_dir, download, subset), config=cfg,
                  budget=budget, reference_epochs=reference_epochs, resume=resume,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Top-1 accuracy and loss of a bundle on the test split."""
    from .api import evaluate as run
    res = run(bundle, _source(data, data_dir, download, None), device, batch_size)
    if as_json:
        print(json.dumps(res))
    else:
        print(f"{res['bundle']} on {res['data']} ({res['test_images']:,} test images): "
              f"top-1 {100 * res['top1']:.2f}%, loss {res['loss']:.4f}")


@app.command()
def info(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    reference_epochs: Annotated[float, typer.Option(
        "--reference-epochs", help="Epochs of one full from-scratch run (the 1.00X of the "
        "ledger).")] = 200,
):
    """What a bundle holds: manifest, lineage (parents, operations, options), ledger, parameters."""
    from .api import info as run
    _positive("--reference-epochs", reference_epochs)
    res = run(bundle, reference_epochs)
    if as_json:
        print(json.dumps(res, indent=1))
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
    params = Table(title="parameters")
    params.add_column("kind")
    params.add_column("count", justify="right")
    for k, v in res["params"].items():
        params.add_row(k, f"{v:,}")
    out.print(params)
    _print_ledger(res["ledger"])


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
        "--images", min=2, help="Test images the features are computed on: the first N of "
        "the test split [default: 512, or the whole split if smaller].", show_default=False)
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
        print(json.dumps({"a": str(a), "b": str(b), "images": res.images,
                          "layers_a": res.layers_a, "layers_b": res.layers_b,
                          "matrix": res.matrix, "matched": matched,
                          "png": None if png is None else str(png)}, indent=1))
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
    """Run the CLI; user errors print one line on stderr and exit 2 (with --debug: raise)."""
    try:
        code = app(standalone_mode=False, prog_name="mgrow")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors: one line naming the command's --help
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `mgrow`: the help, not an error
            print(e.format_message())
            sys.exit(0)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"mgrow: error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a training loop
        print("mgrow: error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except MgrowError as e:
        if "--debug" in sys.argv:
            raise
        if type(e).__name__ == "Interrupted":  # engine.Interrupted: stopped by a signal
            _ignore_signals()
        print(f"mgrow: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:
        if "--debug" in sys.argv:
            raise
        print(f"mgrow: error: {e}", file=sys.stderr)
        sys.exit(2)


def _ignore_signals() -> None:
    """Ignore further Ctrl-C/SIGTERM while exiting after an interruption: a user pressing
    Ctrl-C again would otherwise get tracebacks from interpreter shutdown after the one-line
    message."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
