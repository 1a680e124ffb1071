"""Commands that train or evaluate: `train`, `train-sibling`, `finetune`, `eval`.

All share one set of options (timm's names) and one engine; each builds a TrainConfig and
a DataSource from them (cli.options) and calls mgrow.api.

Imports cli.app, cli.options and (inside each command) mgrow.api and the library.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import limits as L
from ..errors import MgrowError
from .app import app
from .options import (Amp, ArchName, AsJson, BatchSize, BuilderOptions, Bundle, ChannelsLast,
                      Compile, Data, DataDir, DataMode, DataModes, Device, Download, Epochs,
                      Force, InputSize, Lr, Norm, Output, Quiet, RefEpochs, Resume, Schedule,
                      Schedules, SeedOpt, Sharing, SharingOpt, Smoothing, Stats, StatsModes,
                      Subset, Templates, Warmup, WeightDecay, Width, Workers, builder_options,
                      check_positive, data_source, in_range, out, print_json, progress_mode,
                      train_config)


def _report(outcome, as_json: bool) -> None:
    from ..engine import is_main_process
    from ..phases import describe_outcome, metrics_json
    if not is_main_process():  # under torchrun rank 0 alone reports
        return
    for note in outcome.result.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        print(metrics_json(outcome))
    else:
        print(describe_outcome(outcome))


@app.command()
def train(
    arch: ArchName,
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
    as_json: AsJson = False, force: Force = False, builder_option: BuilderOptions = None,
):
    """Train a network from scratch: a first small net, or the Small/Large baselines."""
    from ..api import train as run
    cfg = train_config(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = data_source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(arch, output, data=source, config=cfg, width=width, mixed=mixed,
                  norm=norm.value, templates=templates, sharing=sharing.value, resume=resume,
                  progress=progress_mode(quiet, as_json), force=force,
                  options=builder_options(builder_option))
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
    from ..api import train_sibling as run
    from ..phases import small_seed
    if seed is None:
        seed = small_seed(small) + 1
    cfg = train_config(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = data_source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(small, output, data=source, config=cfg, resume=resume,
                  progress=progress_mode(quiet, as_json), force=force)
    _report(outcome, as_json)


@app.command()
def finetune(
    bundle: Bundle,
    output: Output,
    epochs: Epochs = None,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", callback=in_range(0, L.MAX_BUDGET, True),
        help="Instead of --epochs: train until the growth FLOPs (the ledger's "
        "growth stage: sibling + this run) reach X times one full from-scratch run of this "
        "architecture; prints the epochs it computes.")] = None,
    reference_epochs: RefEpochs = None,
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
    from ..api import finetune as run
    if (epochs is None) == (budget is None):
        raise MgrowError("give exactly one of --epochs and --budget")
    check_positive("--budget", budget)
    check_positive("--reference-epochs", reference_epochs)
    cfg = train_config(epochs, lr, batch_size, warmup, weight_decay, label_smoothing, seed, device,
               amp, channels_last, compile_, schedule)
    source = data_source(data, data_dir, download, subset, data_mode, workers, input_size, stats)
    outcome = run(bundle, output, data=source, config=cfg, budget=budget,
                  reference_epochs=reference_epochs, bn_recalibrate=bn_recalibrate, resume=resume,
                  progress=progress_mode(quiet, as_json), force=force)
    from ..engine import is_main_process
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
    from ..api import evaluate as run
    res = run(bundle, data_source(data, data_dir, download, None, data_mode, workers, input_size),
              device, batch_size)
    if as_json:
        print_json(res, indent=None)
    else:
        print(f"{res['bundle']} on {res['data']} ({res['test_images']:,} test images): "
              f"top-1 {100 * res['top1']:.2f}%, loss {res['loss']:.4f}")
