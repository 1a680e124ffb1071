"""Commands that look into bundles: `flops`, `info`, `cka`.

Imports cli.app, cli.options and (inside each command) mgrow.api.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import limits as L
from .app import app
from .options import (Bundle, Data, DataDir, Device, Download, RefEpochs, check_positive,
                      data_source, out, print_json)


@app.command()
def flops(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", min=8, max=L.MAX_INPUT_SIZE,
        help="Count at this input side instead of the manifest's.")] = None,
    reference_epochs: RefEpochs = None,
):
    """Forward FLOPs (fvcore) per layer, parameter counts and the training-FLOPs ledger."""
    from ..api import count_flops
    report = count_flops(bundle, reference_epochs, input_size)
    if as_json:
        print_json(report)
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
    scale = (f"1.00X = {led['reference_epochs']:g} epochs of this architecture from scratch "
             f"= {led['reference_flops']:.3e} FLOPs" if led["reference_flops"] else
             "1.00X unknown: the bundle records no training data (convert --data names it)")
    ledger = Table(title=f"training-FLOPs ledger ({scale})")
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
    if led.get("growth_steps"):
        out.print("grown by: " + "; then ".join(led["growth_steps"]), soft_wrap=True)


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}X"


@app.command()
def info(
    bundle: Bundle,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    reference_epochs: RefEpochs = None,
):
    """What a bundle holds: manifest, lineage (parents, operations, options), ledger, parameters."""
    from ..api import info as run
    check_positive("--reference-epochs", reference_epochs)
    res = run(bundle, reference_epochs)
    if as_json:
        print_json(res)
        return
    out.print(f"{res['bundle']}: {res['description']}, {res['bytes']:,} bytes, sha256 "
              f"{res['sha256'][:16]}..., format {res['format_version']}", soft_wrap=True)
    for key in ("arch", "mixing", "data", "growth"):
        if res[key] is not None:
            out.print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in res[key].items()),
                      soft_wrap=True, highlight=False)
    if res["stages"]:
        out.print("  stages (deepen --stage N): " + ", ".join(
            f"{i} {s['where']} ({s['blocks']} blocks)" for i, s in enumerate(res["stages"], 1)),
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
        if p.get("seen_above"):  # the same file as a parent shown in full above: short
            node.add(f"parent {p['path']} (sha256 {p['sha256'][:12]}..., the same as above)")
            continue
        where = {"found": f"found at {p.get('found_at')}", "missing": "not found",
                 "changed": "changed since (sha256 differs)",
                 "unreadable": f"unreadable: {p.get('reason')}"}.get(p["status"], p["status"])
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
    debiased: Annotated[bool, typer.Option(
        "--debiased/--biased", help="The unbiased HSIC estimator (Song et al. 2012, "
        "Kornblith's debiased=True): about 0 for unrelated features, where the biased one "
        "(the paper's) reads up to 0.4 on conv features; needs 4 images.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite the --png file if it exists.")] = False,
):
    """Linear CKA between the layers' features of two bundles (the paper's Figs. 4-5), with
    its floor: the same with B's images shuffled."""
    from ..api import cka as run
    from ..api import write_heatmap
    if png is not None:
        from ..files import check_writable
        check_writable(png, force, inputs=(a, b))
    res = run(a, b, data_source(data, data_dir, download, None), images, device, debiased)
    matched, floor = res.matched(), res.matched(res.floor)
    if png is not None:
        write_heatmap(res, png, str(a), str(b), force)
    if as_json:
        print_json({"a": str(a), "b": str(b), "images": res.images, "debiased": debiased,
                     "layers_a": res.layers_a, "layers_b": res.layers_b,
                     "matrix": res.matrix, "matched": matched, "floor": res.floor,
                     "matched_floor": floor, "renamed": res.renamed,
                     "png": None if png is None else str(png)})
        return
    kind = "debiased linear CKA" if debiased else "linear CKA"
    same = "same-block" if res.renamed else "same-name"  # a deepened net pairs by block
    table = Table(title=f"{kind} of {same} layers, {a.name} vs {b.name} "
                  f"({res.images} test images)")
    table.add_column("layer")
    table.add_column("CKA", justify="right")
    table.add_column("floor", justify="right")
    table.add_column("best match in B", justify="left")
    for i, name in enumerate(res.layers_a):
        row = res.matrix[i]
        j = max(range(len(row)), key=lambda k: -1 if row[k] != row[k] else row[k])
        table.add_row(name, "" if name not in matched else f"{matched[name]:.3f}",
                      "" if name not in floor else f"{floor[name]:.3f}",
                      f"{res.layers_b[j]} ({row[j]:.3f})")
    out.print(table)
    if matched:
        mean = sum(matched.values()) / len(matched)
        base = sum(floor.values()) / len(floor)
        out.print(f"mean over {len(matched)} {same} layers: {mean:.3f} (floor {base:.3f})")
    out.print("floor: the same CKA with B's features of the images in a shuffled order, "
              "what no similarity reads" + ("" if debiased else "; --debiased puts it "
                                            "at about 0"), soft_wrap=True)
    if png is not None:
        out.print(f"wrote {png}")
