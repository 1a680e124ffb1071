"""Training phases: every command that trains runs one phase through the engine and records
it as a row of the bundle's training-FLOPs ledger.

A phase's stage is `base` while the user's starting network is being made (train,
finetune of an ungrown net) and `growth` for what is spent to grow it (train-sibling, and
finetune of a grown net); `fuse` re-labels the sibling's phases as growth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import MgrowError
from .arch import build, check_name
from .bundle import check_writable, load, save_model
from .data import Data, load_data
from .engine import (Progress, TrainConfig, TrainResult, barrier, evaluate, is_main_process,
                     train)
from .flops import epochs_for_budget, forward_flops
from .manifest import ArchSpec, DatasetSpec, Lineage, Manifest, MixingSpec, Phase


@dataclass
class Outcome:
    path: Path
    manifest: Manifest
    result: TrainResult
    epochs: float


@dataclass
class DataSource:
    """Where data comes from: a --data spec (or the bundle's), plus the loading options."""

    spec: str | None = None
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None

    def load(self, recorded: DatasetSpec | None = None) -> Data:
        """Return the data: the given spec, else the one a bundle recorded (same subset)."""
        if self.spec is None and recorded is None:
            raise MgrowError("no data set: pass --data (the bundle does not record one)")
        spec = self.spec if self.spec is not None else recorded.spec
        subset = self.subset
        if subset is None and self.spec is None:
            full = load_data(spec, self.data_dir, self.download)
            if recorded.train_size < len(full.train_y):
                subset = recorded.train_size
            else:
                return full
        return load_data(spec, self.data_dir, self.download, subset)


def check_fits(arch: ArchSpec, data: Data) -> None:
    """Raise MgrowError unless the network's classes and input channels fit the data."""
    d = data.spec
    if arch.num_classes != d.num_classes:
        raise MgrowError(f"the network has {arch.num_classes} classes, {d.spec} has "
                         f"{d.num_classes}")
    if arch.in_channels != d.channels:
        raise MgrowError(f"the network takes {arch.in_channels} input channels, {d.spec} has "
                         f"{d.channels}")


def side_files(output: Path) -> tuple[Path, Path]:
    """Return the (resumable checkpoint, metrics JSON lines) paths that go with an output."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt"), output.with_name(output.name + ".metrics.jsonl")


def run_phase(manifest: Manifest, model: nn.Module, data: Data, cfg: TrainConfig,
              output: Path, operation: str, stage: str, *, resume: bool = False,
              progress: Progress = "bar", force: bool = False) -> Outcome:
    """Train `model` through the engine, add the ledger row and write the bundle atomically."""
    check_writable(output, force)
    check_fits(manifest.arch, data)
    ckpt, metrics = side_files(output)
    if not resume and ckpt.exists():
        raise MgrowError(f"{ckpt} exists from an unfinished run: pass --resume to continue it "
                         "or delete it to start over")
    result = train(model, data, cfg, checkpoint=ckpt, resume=resume, progress=progress,
                   metrics_path=metrics)
    fwd = forward_flops(manifest.arch)
    phase = Phase(operation=operation, arch=manifest.describe(), stage=stage,
                  images=result.images, forward_flops=fwd, train_flops=3 * fwd * result.images,
                  wall_s=round(result.wall_s, 3), device=result.device,
                  accuracy=result.accuracy)
    manifest = manifest.with_phase(phase).model_copy(update={"data": data.spec})
    if is_main_process():  # under torchrun rank 0 alone writes the bundle
        save_model(output, manifest, model, force)
        ckpt.unlink(missing_ok=True)
    barrier()  # and every rank returns once it is written
    return Outcome(Path(output), manifest, result, cfg.epochs)


def train_new(arch_name: str, source: DataSource, cfg: TrainConfig, output: Path, *,
              mixing: MixingSpec | None = MixingSpec(), width: float = 1.0,
              norm: str = "every", **run) -> Outcome:
    """Train a network from scratch (stage base); its classes and input follow the data."""
    check_name(arch_name)
    check_writable(output, run.get("force", False))
    data = source.load()
    d = data.spec
    arch = ArchSpec(name=arch_name, width=width, num_classes=d.num_classes,
                    in_channels=d.channels, input_size=d.input_size, norm=norm)
    model = build(arch, mixing, seed=cfg.seed)
    lineage = Lineage(operation="train", options={"seed": cfg.seed, "epochs": cfg.epochs,
                                                  "lr": cfg.lr, "batch_size": cfg.batch_size})
    manifest = Manifest(arch=arch, mixing=mixing, data=d, lineage=lineage)
    return run_phase(manifest, model, data, cfg, output, "train", "base", **run)


def free_output(source: Path, tag: str) -> Path:
    """Return `<source>-<tag>.safetensors` next to source, numbered (`-2`, `-3` ...) so as
    never to name an existing file."""
    source = Path(source)
    stem = source.name.removesuffix(".safetensors")
    for n in range(1, 1000):
        path = source.with_name(f"{stem}-{tag}{'' if n == 1 else f'-{n}'}.safetensors")
        if not path.exists():
            return path
    raise MgrowError(f"too many {tag} outputs of {source} already")


def sibling_output(small: Path) -> Path:
    """Return the default sibling output of `small`: `<small>-sibling.safetensors`, numbered."""
    return free_output(small, "sibling")


def grown_output(a: Path) -> Path:
    """Return the default output of `fuse A`: `<A>-grown.safetensors`, numbered."""
    return free_output(a, "grown")


def train_sibling(small_path: Path, source: DataSource, cfg: TrainConfig,
                  output: Path | None = None, **run) -> Outcome:
    """Train a fresh network of SMALL's exact architecture and mixing spec (stage growth)."""
    small = load(small_path)
    man = small.manifest
    if man.growth is not None or (man.mixing is not None and man.mixing.factor > 1):
        raise MgrowError(f"{small_path}: already grown; a sibling is trained for an ungrown net")
    output = Path(output) if output is not None else sibling_output(Path(small_path))
    check_writable(output, run.get("force", False))
    data = source.load(man.data)
    model = build(man.arch, man.mixing, seed=cfg.seed)
    manifest = Manifest(arch=man.arch, mixing=man.mixing, data=data.spec, lineage=Lineage(
        operation="train-sibling", options={"seed": cfg.seed, "epochs": cfg.epochs,
                                            "lr": cfg.lr, "batch_size": cfg.batch_size},
        parents=(small.parent(),)))
    return run_phase(manifest, model, data, cfg, output, "train-sibling", "growth", **run)


def finetune(path: Path, source: DataSource, cfg: TrainConfig, output: Path, *,
             budget: float | None = None, reference_epochs: float = 200, **run) -> Outcome:
    """Continue training a bundle (stage growth once grown); a `budget` replaces cfg.epochs."""
    bundle = load(path)
    check_writable(output, run.get("force", False))
    data = source.load(bundle.manifest.data)
    man = bundle.manifest.model_copy(update={"data": data.spec})
    if budget is not None:
        cfg = cfg.model_copy(update={"epochs": epochs_for_budget(man, budget, reference_epochs)})
    model = bundle.model()
    stage = "growth" if man.growth is not None else "base"
    options = {"seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
               "batch_size": cfg.batch_size, "budget": budget}
    manifest = man.derived("finetune", options, (bundle.parent(),))
    return run_phase(manifest, model, data, cfg, output, "finetune", stage, **run)


def evaluate_bundle(path: Path, source: DataSource, device: str = "auto",
                    batch_size: int = 512) -> dict:
    """Return top-1 and loss of a bundle on the test split of its (or the given) data."""
    bundle = load(path)
    data = source.load(bundle.manifest.data)
    check_fits(bundle.manifest.arch, data)
    acc, loss = evaluate(bundle.model(), data, batch_size=batch_size, device=device)
    return {"bundle": str(path), "data": data.spec.spec, "test_images": len(data.test_y),
            "top1": acc, "loss": loss}


def describe_outcome(o: Outcome) -> str:
    """Return a one-line summary of a finished phase."""
    r = o.result
    return (f"wrote {o.path}: top-1 {100 * r.accuracy:.2f}%, test loss {r.loss:.4f}, "
            f"{r.steps} steps, {r.images:,} images in {r.wall_s:.1f} s on {r.device}")


def metrics_json(o: Outcome) -> str:
    """Return the outcome as one JSON line."""
    r = o.result
    return json.dumps({"output": str(o.path), "top1": r.accuracy, "loss": r.loss,
                       "train_loss": r.train_loss, "steps": r.steps, "images": r.images,
                       "wall_s": r.wall_s, "device": r.device, "epochs": o.epochs})
