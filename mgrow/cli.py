"""The `mgrow` command line: one function a subcommand; parse, call the library, print."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import MgrowError, __version__

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Grow a trained network into a wider one (MixtureGrowth). Every file "
                       "mgrow reads or writes is a safetensors bundle with a manifest.")
out = Console()


class Tiling(str, Enum):
    vertical = "vertical"
    horizontal = "horizontal"


class Init(str, Enum):
    orthogonal = "orthogonal"
    random = "random"
    copy = "copy"
    zero = "zero"


class Method(str, Enum):
    mixture = "mixture"
    random = "random"
    net2net = "net2net"


class Sharing(str, Enum):
    pairs = "pairs"
    none = "none"


class Norm(str, Enum):
    every = "every"
    block = "block"


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


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show Python tracebacks instead of one-line errors.")] = False,
        version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False):
    if version:
        out.print(f"mgrow {__version__}")
        raise typer.Exit()


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
    out.print(f"wrote {path} ({manifest.describe()})")


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
    from .flops import report as flops_report
    report = flops_report(bundle, input_size, reference_epochs)
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
    led = report["ledger"]
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
    out.print(f"wrote {path} (plain state_dict; load with safetensors.torch.load_file)")


@app.command()
def fuse(
    a: Annotated[Path, typer.Argument(help="The trained network (member 0).", show_default=False)],
    b: Annotated[Optional[Path], typer.Argument(
        help="Its sibling (member 1). Omit to grow from A alone (MixtureGrowth w/o fusion).",
        show_default=False)] = None,
    output: Output = None,
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
        "(fresh plain weights for new tiles), net2net (function-preserving widening of A).")
    ] = Method.mixture,
    noise: Annotated[Optional[float], typer.Option(
        "--noise", help="Relative noise on new tiles: copy (default 0), net2net (default "
        "0.01).")] = None,
    seed: SeedOpt = 0,
    force: Force = False,
):
    """Grow one or two trained bundles into a wider one (no data pass)."""
    from .growth import fuse_files
    if output is None:
        raise MgrowError("missing --output/-o: where to write the grown bundle")
    path, grown = fuse_files(a, b, output, factor=factor, tiling=tiling.value,
                               init=init.value, method=method.value, seed=seed, noise=noise,
                               force=force)
    for note in grown.notes[:3]:
        print(f"note: {note}", file=sys.stderr)
    if len(grown.notes) > 3:
        print(f"note: (+{len(grown.notes) - 3} more banks alike; all listed in the manifest's "
              "growth.rank_notes)", file=sys.stderr)
    out.print(f"wrote {path} ({grown.manifest.describe()}, method {method.value}"
              + (f", init {init.value}, tiling {tiling.value})" if method == Method.mixture
                 else ")"))


def main() -> None:
    """Run the CLI; user errors print one line on stderr and exit 2 (with --debug: raise)."""
    try:
        app()
    except MgrowError as e:
        if "--debug" in sys.argv:
            raise
        print(f"mgrow: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:
        if "--debug" in sys.argv:
            raise
        print(f"mgrow: error: {e}", file=sys.stderr)
        sys.exit(2)
