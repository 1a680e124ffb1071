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
input raises `MgrowError` with a one-line message.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from torch import nn

from .bundle import Bundle, load
from .data import DataSource
from .engine import Progress, TrainConfig
from .errors import MgrowError
from .files import check_writable, sha256_file, write_atomic
from .flops import REFERENCE_EPOCHS, ledger, param_counts
from .manifest import Lineage
from .phases import Outcome, grown_output

PathLike = str | os.PathLike
__all__ = ["Bundle", "DataSource", "MgrowError", "Outcome", "TrainConfig", "build_model",
           "cka", "count_flops", "evaluate", "finetune", "fuse", "info", "load", "train",
           "train_sibling"]


def _config(config: TrainConfig | None, epochs: float | None, knobs: dict[str, Any],
            default_epochs: float = 1.0) -> TrainConfig:
    """Return `config`, or one made of `epochs` and the keyword knobs (not both: a knob
    given beside a config would be silently ignored)."""
    if config is not None:
        given = sorted(knobs) + ["epochs"] * (epochs is not None)
        if given:
            raise TypeError(f"give config or keyword knobs, not both: {given}")
        return config
    from pydantic import ValidationError
    try:
        return TrainConfig(epochs=epochs if epochs is not None else default_epochs, **knobs)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "config"
        raise MgrowError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None


def _source(data: str | DataSource | None, subset: int | None = None) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, subset=subset)


def _path(bundle: PathLike | Outcome) -> Path:
    return bundle.path if isinstance(bundle, Outcome) else Path(bundle)


def build_model(bundle: PathLike | Outcome | Bundle) -> nn.Module:
    """Return the network a bundle describes (template-mixed or plain), weights loaded, on CPU."""
    return (bundle if isinstance(bundle, Bundle) else load(_path(bundle))).model()


def train(arch: str, output: PathLike, *, data: str | DataSource = "digits",
          epochs: float | None = None, width: float = 1.0, mixed: bool = True,
          norm: str = "every", templates: int = 2, sharing: str = "pairs",
          subset: int | None = None,
          config: TrainConfig | None = None, progress: Progress = "bar",
          resume: bool = False, force: bool = False, **knobs: Any) -> Outcome:
    """Train a network from scratch (`mgrow train`; epochs default 10); return the outcome."""
    from .manifest import MixingSpec
    from .phases import train_new
    mixing = MixingSpec(templates=templates, sharing=sharing) if mixed else None
    return train_new(arch, _source(data, subset), _config(config, epochs, knobs, 10),
                     Path(output), mixing=mixing, width=width, norm=norm, resume=resume,
                     progress=progress, force=force)


def train_sibling(small: PathLike | Outcome, output: PathLike | None = None, *,
                  epochs: float | None = None, data: str | DataSource | None = None,
                  seed: int | None = None, config: TrainConfig | None = None,
                  progress: Progress = "bar", resume: bool = False, force: bool = False,
                  **knobs: Any) -> Outcome:
    """Train SMALL's sibling (`mgrow train-sibling`); default output SMALL-sibling, numbered."""
    from .phases import small_seed
    from .phases import train_sibling as run
    small = _path(small)
    if config is None and epochs is None:
        raise MgrowError("missing epochs: how long to train the sibling")
    if seed is not None:
        knobs["seed"] = seed
    elif config is None:  # a different seed from SMALL's: fresh, independent templates
        knobs["seed"] = small_seed(small) + 1
    return run(small, _source(data), _config(config, epochs, knobs),
               None if output is None else Path(output), resume=resume, progress=progress,
               force=force)


def fuse(a: PathLike | Outcome, b: PathLike | Outcome | None = None,
         output: PathLike | None = None, *, data: str | DataSource | None = None,
         force: bool = False, **options: Any) -> Path:
    """Grow A (and its sibling B), or a grown A again, into a wider bundle (`mgrow fuse`);
    return its path.

    `options` are fuse's: factor, tiling, init, method (mixture, random, net2net, gradmax,
    firefly), seed, noise, and for the methods that read data batch_size and steps; `data`
    is their data set (default: A's). The default output is A-grown.safetensors next to A,
    numbered so as never to overwrite.
    """
    if data is not None:
        options["source"] = _source(data)
    return fuse_bundles(a, b, output, force=force, **options)[0]


def fuse_bundles(a: PathLike | Outcome, b: PathLike | Outcome | None = None,
                 output: PathLike | None = None, *, force: bool = False, **options: Any):
    """Return (path, growth result with notes) of `fuse`; what the CLI calls."""
    from .phases import fuse_files
    a = _path(a)
    output = grown_output(a) if output is None else Path(output)
    return fuse_files(a, None if b is None else _path(b), output, force=force, **options)


def finetune(bundle: PathLike | Outcome, output: PathLike, *, epochs: float | None = None,
             budget: float | None = None, reference_epochs: float = REFERENCE_EPOCHS,
             data: str | DataSource | None = None, config: TrainConfig | None = None,
             bn_recalibrate: int = 0, progress: Progress = "bar", resume: bool = False,
             force: bool = False, **knobs: Any) -> Outcome:
    """Continue training a bundle (`mgrow finetune`) for `epochs` or up to a FLOPs `budget`
    (first re-estimating BN statistics on `bn_recalibrate` batches when > 0)."""
    from .phases import finetune as run
    if config is None and (epochs is None) == (budget is None):
        raise MgrowError("give exactly one of epochs and budget")
    return run(_path(bundle), _source(data), _config(config, epochs, knobs), Path(output),
               budget=budget, reference_epochs=reference_epochs,
               bn_recalibrate=bn_recalibrate, resume=resume, progress=progress, force=force)


def evaluate(bundle: PathLike | Outcome, data: str | DataSource | None = None,
             device: str = "auto", batch_size: int = 512) -> dict:
    """Return top-1 and loss of a bundle on its test split (`mgrow eval`)."""
    from .phases import evaluate_bundle
    return evaluate_bundle(_path(bundle), _source(data), device, batch_size)


def count_flops(bundle: PathLike | Outcome, reference_epochs: float = REFERENCE_EPOCHS,
                input_size: int | None = None) -> dict:
    """Return `mgrow flops`'s report: forward FLOPs per layer, parameters, the ledger."""
    from .flops import report
    return report(_path(bundle), input_size, reference_epochs)


def info(bundle: PathLike | Outcome, reference_epochs: float = REFERENCE_EPOCHS) -> dict:
    """Return what `mgrow info` shows: manifest, lineage tree, ledger, parameter counts.

    `lineage` is the bundle's own lineage (operation, options, parents) with `history`,
    the earlier operations recorded in the manifest (oldest first); each parent found on
    disk with the recorded sha256 (at its recorded path, or beside this bundle) carries its
    own lineage, recursively; otherwise its `status` says `missing` or `changed`.
    """
    path = _path(bundle)
    b = load(path)
    man = b.manifest
    return {
        "bundle": str(path), "sha256": b.sha256, "bytes": path.stat().st_size,
        "description": man.describe(), "format_version": man.format_version,
        "arch": man.arch.model_dump(), "mixing": None if man.mixing is None
        else man.mixing.model_dump(), "data": None if man.data is None else man.data.model_dump(),
        "growth": None if man.growth is None else man.growth.model_dump(),
        "lineage": _lineage(man.lineage, path.parent, depth=0),
        "params": param_counts(b.tensors, man.arch, man.mixing),
        "ledger": ledger(man, reference_epochs),
    }


MAX_DEPTH = 32  # lineage levels followed on disk


def _lineage(lin: Lineage, folder: Path, depth: int) -> dict:
    """Return a lineage as a dict whose parents carry their own lineage when found on disk."""
    return {"operation": lin.operation, "options": lin.options,
            "parents": [_parent(p.path, p.sha256, folder, depth) for p in lin.parents],
            "history": [{k: v for k, v in h.items() if k != "history"} for h in lin.history]}


def _parent(recorded: str, sha256: str, folder: Path, depth: int) -> dict:
    """Return a parent: its recorded path and hash, where it was found and its lineage."""
    entry: dict[str, Any] = {"path": recorded, "sha256": sha256}
    candidates = [Path(recorded), folder / Path(recorded).name]

    def is_file(p: Path) -> bool:  # a recorded path this system cannot even look up
        try:  # (too long, say) is as missing as one that is not there
            return p.is_file()
        except OSError:
            return False
    found = [p for p in candidates if is_file(p)]
    match = next((p for p in found if sha256_file(p) == sha256), None)
    if match is None:
        return entry | {"status": "changed" if found else "missing"}
    if depth + 1 >= MAX_DEPTH:
        return entry | {"status": "found", "found_at": str(match)}
    parent = load(match)
    return entry | {"status": "found", "found_at": str(match),
                    "description": parent.manifest.describe(),
                    "lineage": _lineage(parent.manifest.lineage, match.parent, depth + 1)}


def cka(a: PathLike | Outcome, b: PathLike | Outcome, data: str | DataSource | None = None,
        images: int | None = None, device: str = "cpu"):
    """Return linear CKA between every feature layer of A and of B (`mgrow cka`).

    Both run on the first `images` test images of `data` (default: A's data set; default
    count: 512, or the whole test split if it is smaller), each normalised as it records.
    The result's `.matrix[i][j]` compares A's layer `.layers_a[i]` with B's
    `.layers_b[j]`; `.matched()` gives the layers present in both under one name.
    """
    from .data import with_normalisation
    from .engine import resolve_device
    from .phases import check_fits
    from .similarity import cka_models
    from .similarity import images as first_images
    ba, bb = load(_path(a)), load(_path(b))
    data_ = _source(data).load(ba.manifest.data)
    for x in (ba, bb):
        check_fits(x.manifest.arch, data_)
    dev = resolve_device(device)
    n = min(512, len(data_.test_y)) if images is None else images
    data_b = data_ if bb.manifest.data is None else with_normalisation(data_, bb.manifest.data)
    x, xb = first_images(data_, n).to(dev), first_images(data_b, n).to(dev)
    return cka_models(ba.model().to(dev), bb.model().to(dev), x, xb)


def write_heatmap(result, path: PathLike, a_label: str, b_label: str,
                  force: bool = False) -> Path:
    """Write a CKA result as a PNG heat map (rows A, columns B) atomically; needs the `plot`
    extra."""
    from .similarity import heatmap
    check_writable(path, force)
    buf = io.BytesIO()
    heatmap(result, buf, a_label, b_label)
    return write_atomic(path, buf.getvalue(), force)
