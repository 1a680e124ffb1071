"""Commands that make a bundle from others without training: `convert`, `fuse`, `deepen`,
`export`.

Imports cli.app, cli.options and (inside each command) mgrow.api and the library.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import limits as L
from ..errors import MgrowError
from .app import app
from .options import (ArchName, BuilderOptions, Bundle, DeepInit, Force, Init, Method, Norm,
                      Output, seed_of, Sharing, SharingOpt, Spare, Templates, Tiling, Width,
                      builder_options, in_range, mixing_spec)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Plain checkpoint: .pt/.pth state_dict (or a dict "
                                        "holding one under 'state_dict' or 'model'), or a "
                                        "plain .safetensors.", show_default=False)],
    arch: ArchName,
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
    seed: seed_of("the spare templates (their random directions, or the shuffles)") = 0,
    force: Force = False,
    builder_option: BuilderOptions = None,
):
    """Recast a plain PyTorch checkpoint as a template-mixed bundle computing the same function."""
    from ..convert import convert_checkpoint
    path, manifest = convert_checkpoint(
        src, arch_name=arch, num_classes=num_classes, width=width, in_channels=in_channels,
        input_size=input_size, norm=norm.value, mixing=None if plain else mixing_spec(
            templates, sharing, edge_templates, freeze_edges),
        data=data, seed=seed, spare=spare.value, normalisation=_normalisation(mean, std),
        options=builder_options(builder_option), output=output, force=force)
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
def export(bundle: Bundle, output: Output, force: Force = False):
    """Write the plain network (weights generated, no templates) for deployment: a
    safetensors state_dict, or with an output ending in .pt2 a torch.export program that
    loads without mgrow (torch.export.load(OUTPUT).module()). A grown builder's network
    that the builder itself makes under a wider width option (mobilenet_v2 x2:
    width_mult=2.0) is named: its state_dict loads strictly into that network."""
    from ..bundle import export_plain, export_program
    if Path(output).suffix == ".pt2":
        path = export_program(bundle, output, force)
        print(f"wrote {path} (torch.export program at batch 1; load with "
              "torch.export.load(path).module())")
        return
    path = export_plain(bundle, output, force)
    print(f"wrote {path} (plain state_dict; load with safetensors.torch.load_file)")
    from ..arch.zoo import wider_builder
    from ..bundle import read_manifest
    arch = read_manifest(path).arch
    options = wider_builder(arch)
    if options is not None:  # the builder's own wider network takes it as it is
        kind, _, name = arch.name.partition(":")
        call = "torchvision.models.get_model" if kind == "torchvision" else "timm.create_model"
        args = ", ".join(f"{k}={v!r}" for k, v in {"num_classes": arch.num_classes,
                                                   **options}.items())
        print(f"it loads strictly into {call}({name!r}, {args})")


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
        "zero (grown net = mean of the members; the better start where little finetuning "
        "follows, see docs/any-network.md).")] = Init.orthogonal,
    method: Annotated[Method, typer.Option(
        "--method", help="mixture (MixtureGrowth); baselines with plain outputs: random "
        "(fresh plain weights for new tiles), net2net (function-preserving widening of A), "
        "gradmax (GradMax, Evci et al. 2022: near-zero fan-in, fan-out from the SVD of a "
        "gradient statistic; reads data), firefly (Firefly, Wu et al. 2020: 2x candidates, "
        "a few Adam steps, the best by first-order gain; reads data), zero (new units' fan-out "
        "zero; plain nets). A torchvision:/timm: net grows by net2net, zero or random.")
    ] = Method.mixture,
    noise: Annotated[Optional[float], typer.Option(
        "--noise", callback=in_range(0, L.MAX_NOISE),
        help="Relative noise on new tiles: copy (default 0), net2net (default "
        "0.01); gradmax: new units' near-zero fan-in, x A's mean norm (default 1e-5); "
        "firefly: candidates' fan-out, x A's mean norm (default 0.01).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="gradmax/firefly: the data their growth step reads (spec as for "
        "train) [default: A's own].", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, max=L.MAX_BATCH,
        help="gradmax/firefly: images per growth step.")] = 64,
    growth_steps: Annotated[int, typer.Option(
        "--growth-steps", min=1, max=1_000_000,
        help="gradmax: batches of gradient statistics; firefly: Adam steps, one a "
        "batch, then the same batches again to score. Charged to the ledger as a growth "
        "phase.")] = 8,
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
        "statistics; see docs/growing.md).")] = False,
    seed: seed_of("what growth draws: new coefficients or weights, --noise, and the "
                  "growth step's batches (gradmax, firefly)") = 0,
    force: Force = False,
):
    """Grow one or two trained bundles, or a grown one again, into a wider one.

    mixture, random and net2net need no data; gradmax and firefly read a few batches.
    """
    from ..api import fuse_bundles
    from ..data import DataSource
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


def _stage(value: str) -> str:
    """Check --stage: a stage number from 1, last or all."""
    value = value.strip()
    if not (value in ("last", "all") or value.isdigit() and int(value) >= 1):
        raise typer.BadParameter(f"{value!r}: expected a stage number (1, 2, ...), last or all")
    return value


@app.command()
def deepen(
    bundle: Bundle,
    blocks: Annotated[int, typer.Option(
        "--blocks", min=1, max=L.MAX_DEPTH, help="New residual blocks per chosen stage.")] = 1,
    stage: Annotated[str, typer.Option(
        "--stage", callback=_stage, help="The stage that gets them: 1 (the first) .. the "
        "last, last, or all (every stage).")] = "last",
    init: Annotated[Optional[DeepInit], typer.Option(
        "--init", help="New blocks: zero (fresh, the residual output zeroed), copy (the "
        "stage's last block copied, its residual output zeroed; plain nets and builders' "
        "twins), mixture "
        "(new coefficients over the stage's learned templates, orthogonal to its layers'; "
        "template-mixed nets), identity (VGG: Net2DeeperNet's identity layers) [default: "
        "identity for VGG, mixture for a template-mixed net, else zero].",
        show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Bundle to write [default: BUNDLE-deep.safetensors next to "
        "it, numbered, never overwriting].", show_default=False)] = None,
    seed: seed_of("the new blocks' weights") = 0,
    force: Force = False,
):
    """Insert blocks at the end of a stage of a WRN, ResNet, VGG or a builder's residual
    network, keeping its function (each new block starts as the identity). No data is
    read; `mgrow info` lists the stages."""
    from ..api import deepen as run
    from ..bundle import load
    path = run(bundle, output, blocks=blocks, stage=int(stage) if stage.isdigit() else stage,
               init=None if init is None else init.value, seed=seed, force=force)
    man = load(path).manifest
    notes = man.lineage.options["notes"]
    for note in notes[:3]:
        print(f"note: {note}", file=sys.stderr)
    if len(notes) > 3:
        print(f"note: (+{len(notes) - 3} more in the manifest's lineage options)",
              file=sys.stderr)
    print(f"wrote {path} ({man.describe()}, init {man.lineage.options['init']}, blocks per "
          f"stage {'-'.join(map(str, man.lineage.options['depths']))})")
