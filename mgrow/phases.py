"""Training phases: every command that trains runs one phase through the engine and records
it as a row of the bundle's training-FLOPs ledger.

A phase's stage is `base` while the user's starting network is being made (train,
finetune of an ungrown net) and `growth` for what is spent to grow it (train-sibling, and
finetune of a grown net); `fuse` re-labels the sibling's phases as growth.

Owns `train_new`, `train_sibling`, `finetune`, `fuse_files`, `evaluate_bundle`, `check_fits`.
Imports every library layer below it (arch, bundle, data, engine, flops, growth, ...),
never mgrow.api or mgrow.cli.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .arch import build, check_name, check_options
from .bundle import load, save, save_model
from .data import Data, DataSource, steps_per_epoch
from .engine import (Progress, TrainConfig, TrainResult, barrier, evaluate, is_main_process,
                     resolve_device, train)
from .errors import MgrowError
from .files import check_writable, lock_file, writer_lock
from .flops import epochs_for_budget, forward_flops, reference_epochs_of
from .footprint import estimate
from .growth import DATA_METHODS, Grown, deepen, fuse
from .limits import check_memory, dump_json
from .manifest import ArchSpec, Lineage, Manifest, MixingSpec, Phase


@dataclass
class Outcome:
    path: Path
    manifest: Manifest
    result: TrainResult
    epochs: float


def check_fits(arch: ArchSpec, data: Data, mixing: MixingSpec | None = None,
               batch_size: int | None = None, train: bool = False,
               device: str = "auto") -> None:
    """Raise MgrowError unless the network fits the data and this machine, before any step:
    classes, input channels, and (given a batch size) one meta pass of a batch of the
    data's images in train or eval mode, which refuses inputs too small for the network's
    downsampling, batches BatchNorm cannot normalise, and runs that would not fit memory."""
    d = data.spec
    if arch.num_classes != d.num_classes:
        raise MgrowError(f"the network has {arch.num_classes} classes, {d.spec} has "
                         f"{d.num_classes}")
    if arch.in_channels != d.channels:
        raise MgrowError(f"the network takes {arch.in_channels} input channels, {d.spec} has "
                         f"{d.channels}")
    if batch_size is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = max(1, batch_size // world)
    if not train:
        per_rank = min(per_rank, len(data.test_y))
    shape = (per_rank, d.channels, d.input_size, d.input_size)
    try:
        need = estimate(build(arch, mixing, meta=True), shape, train).need(train)
    except MgrowError as e:
        raise MgrowError(f"{arch.name} on {d.spec}: {e}") from None
    check_memory(need, f"{'training' if train else 'evaluating'} {arch.name} "
                 f"x{arch.width:g} at batch {per_rank} on {d.input_size} x {d.input_size} "
                 f"inputs", resolve_device(device))


def at_size(arch: ArchSpec, data: Data) -> ArchSpec:
    """Return `arch` counted at the side `data` is read at: every ledger row counts the FLOPs
    of the images its phase actually read."""
    return arch.model_copy(update={"input_size": data.spec.input_size})


def side_files(output: Path) -> tuple[Path, Path]:
    """Return the (resumable checkpoint, metrics JSON lines) paths that go with an output."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt"), output.with_name(output.name + ".metrics.jsonl")


def check_no_checkpoint(output: Path, resume: bool) -> None:
    """Refuse to start over an unfinished run's checkpoint unless resuming it."""
    ckpt = side_files(output)[0]
    if ckpt.exists() and not ckpt.is_file():
        raise MgrowError(f"{ckpt}: not a regular file, where the run's checkpoint goes; "
                         "remove it")
    if not resume and ckpt.exists():
        raise MgrowError(f"{ckpt} exists from an unfinished run: pass --resume to continue it "
                         "or delete it to start over")


def recipe(cfg: TrainConfig) -> dict:
    """Return the knobs of `cfg` that change what a run learns, as its lineage records them
    (not where or how fast it ran: device, amp, channels_last, compile)."""
    return cfg.model_dump(include={"seed", "epochs", "lr", "batch_size", "schedule",
                                   "warmup_epochs", "weight_decay", "label_smoothing",
                                   "momentum", "nesterov"})


def run_phase(manifest: Manifest, model: nn.Module, data: Data, cfg: TrainConfig,
              output: Path, operation: str, stage: str, *, resume: bool = False,
              progress: Progress = "bar", force: bool = False) -> Outcome:
    """Train `model` through the engine, add the ledger row and write the bundle atomically."""
    check_writable(output, force)
    ckpt, metrics = side_files(output)
    with contextlib.ExitStack() as locks:
        if is_main_process():  # one writer of the output and its side files at a time
            locks.enter_context(writer_lock(output))
            locks.enter_context(writer_lock(ckpt))
        check_fits(manifest.arch, data, manifest.mixing, cfg.batch_size, True, cfg.device)
        return _run_locked(manifest, model, data, cfg, output, operation, stage, ckpt,
                           metrics, resume, progress, force)


def _run_locked(manifest: Manifest, model: nn.Module, data: Data, cfg: TrainConfig,
                output: Path, operation: str, stage: str, ckpt: Path, metrics: Path,
                resume: bool, progress: Progress, force: bool) -> Outcome:
    """run_phase with the output's writer locks held."""
    check_no_checkpoint(output, resume)
    fwd = forward_flops(at_size(manifest.arch, data))  # before training: memory refusal first
    result = train(model, data, cfg, checkpoint=ckpt, resume=resume, progress=progress,
                   metrics_path=metrics)
    if not (math.isfinite(result.loss) and math.isfinite(result.accuracy)):
        kept = f"; the checkpoint {ckpt} is kept" if ckpt.exists() else ""
        raise MgrowError(f"the final evaluation is not finite (test loss {result.loss}); "
                         f"{output} was not written{kept}")
    phase = Phase(operation=operation, arch=manifest.describe(), stage=stage,
                  images=result.images, forward_flops=fwd, train_flops=3 * fwd * result.images,
                  wall_s=round(result.wall_s, 3), device=result.device,
                  accuracy=result.accuracy)
    # a bundle keeps the data it recorded first: its normalisation and the ledger's reference
    manifest = manifest.with_phase(phase).model_copy(update={"data": manifest.data or data.spec})
    if is_main_process():  # under torchrun rank 0 alone writes the bundle
        save_model(output, manifest, model, force)
        ckpt.unlink(missing_ok=True)
    barrier()  # and every rank returns once it is written
    return Outcome(Path(output), manifest, result, cfg.epochs)


def train_new(arch_name: str, source: DataSource, cfg: TrainConfig, output: Path, *,
              mixing: MixingSpec | None = MixingSpec(), width: float = 1.0,
              norm: str = "every", options: dict | None = None, **run) -> Outcome:
    """Train a network from scratch (stage base); its classes and input follow the data;
    `options`: a builder's keyword arguments (torchvision:/timm: networks)."""
    check_name(arch_name)
    check_writable(output, run.get("force", False))
    check_no_checkpoint(output, run.get("resume", False))
    data = source.load()
    d = data.spec
    arch = ArchSpec(name=arch_name, width=width, num_classes=d.num_classes,
                    in_channels=d.channels, input_size=d.input_size, norm=norm,
                    options=options or {})
    check_options(arch)
    model = build(arch, mixing, seed=cfg.seed)
    lineage = Lineage(operation="train", options=recipe(cfg))
    manifest = Manifest(arch=arch, mixing=mixing, data=d, lineage=lineage)
    return run_phase(manifest, model, data, cfg, output, "train", "base", **run)


@contextlib.contextmanager
def free_output(source: Path, tag: str) -> Iterator[Path]:
    """Hold the writer lock of `<source>-<tag>.safetensors` next to source, numbered (`-2`,
    `-3` ...), while the block runs, and yield its path: a name that exists, or whose lock
    another writer holds, is passed over, so concurrent runs never choose the same one.
    Under torchrun a rank other than 0 (which writes nothing) takes no lock."""
    source = Path(source)
    stem = source.name.removesuffix(".safetensors")
    for n in range(1, 1000):
        path = source.with_name(f"{stem}-{tag}{'' if n == 1 else f'-{n}'}.safetensors")
        if path.exists():
            continue
        if not is_main_process():
            yield path
            return
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(writer_lock(path))
            except MgrowError:  # held by another writer (or its output written meanwhile)
                if path.exists() or os.path.lexists(lock_file(path)):
                    continue
                raise
            if not path.exists():  # not written by a writer that held it until now
                yield path
                return
    raise MgrowError(f"too many {tag} outputs of {source} already")


def sibling_output(small: Path) -> contextlib.AbstractContextManager[Path]:
    """Hold and yield the default sibling output of `small`: `<small>-sibling.safetensors`,
    numbered (see free_output)."""
    return free_output(small, "sibling")


def grown_output(a: Path) -> contextlib.AbstractContextManager[Path]:
    """Hold and yield the default output of `fuse A`: `<A>-grown.safetensors`, numbered
    (see free_output)."""
    return free_output(a, "grown")


def fuse_files(a: str | Path, b: str | Path | None, output: str | Path, *, force: bool = False,
               source: DataSource | None = None, **options) -> tuple[Path, Grown]:
    """Fuse bundle files into a grown bundle at `output`; return its path and the result.

    gradmax and firefly read `source` (default: A's recorded data), loaded once fuse has
    checked the options, and checked as `train` checks its data: classes, input channels,
    and one training step of the plain wide net at --batch-size on those images (on the
    CPU, where the growth step runs).
    """
    check_writable(output, force, inputs=(a, b))
    with writer_lock(output):  # held from the start: a second writer is refused at once
        members = [load(a)] + ([load(b)] if b is not None else [])

        def data() -> Data:
            first = members[0].manifest
            loaded = (source or DataSource()).load(first.data, first.arch.input_size)
            wide = at_size(first.arch.widened(options.get("factor", 2)), loaded)
            check_fits(wide, loaded, None, options.get("batch_size", 64), True, "cpu")
            return loaded
        grown = fuse(members, data=data if options.get("method") in DATA_METHODS else None,
                     **options)
        return save(output, grown.manifest, grown.tensors, force), grown


def deepen_files(path: str | Path, output: str | Path | None, *, force: bool = False,
                 **options) -> tuple[Path, Manifest, list[str]]:
    """Deepen the bundle at `path` (growth.deepen's options) into `output` [default:
    <path>-deep.safetensors next to it, numbered]; return its path, manifest and notes."""
    if output is None:
        with free_output(Path(path), "deep") as claimed:
            return deepen_files(path, claimed, force=force, **options)
    check_writable(output, force, inputs=(path,))
    with writer_lock(output):
        manifest, tensors, notes = deepen(load(path), **options)
        return save(output, manifest, tensors, force), manifest, notes


def small_seed(small_path: Path) -> int:
    """Return the seed SMALL's lineage records (0 if none): the sibling's default is + 1."""
    return _seed(load(small_path).manifest)


def _seed(man: Manifest) -> int:
    return int(man.lineage.options.get("seed", 0))


def train_sibling(small_path: Path, source: DataSource, cfg: TrainConfig,
                  output: Path | None = None, **run) -> Outcome:
    """Train a fresh network of SMALL's exact architecture and mixing spec (stage growth)."""
    small = load(small_path)
    man = small.manifest
    if man.growth is not None or (man.mixing is not None and man.mixing.factor > 1):
        raise MgrowError(f"{small_path}: already grown; a sibling is trained for an ungrown net")
    if cfg.seed == _seed(man):
        raise MgrowError(f"{small_path}: the sibling's seed {cfg.seed} is the small net's own: "
                         "it would start as its twin (the same templates and data order); "
                         f"choose another seed (default {cfg.seed + 1})")
    if output is None:  # the default name, chosen under its lock, held until it is written
        with sibling_output(Path(small_path)) as claimed:
            return train_sibling(small_path, source, cfg, claimed, **run)
    output = Path(output)
    check_writable(output, run.get("force", False), inputs=(small_path,))
    check_no_checkpoint(output, run.get("resume", False))
    data = source.load(man.data, man.arch.input_size)
    model = build(man.arch, man.mixing, seed=cfg.seed)
    manifest = Manifest(arch=man.arch, mixing=man.mixing, data=data.spec, lineage=Lineage(
        operation="train-sibling", options=recipe(cfg),
        parents=(small.parent(),)))
    return run_phase(manifest, model, data, cfg, output, "train-sibling", "growth", **run)


def finetune(path: Path, source: DataSource, cfg: TrainConfig, output: Path, *,
             budget: float | None = None, reference_epochs: float | None = None,
             bn_recalibrate: int = 0, **run) -> Outcome:
    """Continue training a bundle (stage growth once grown); a `budget` replaces cfg.epochs.

    `bn_recalibrate` N > 0: first re-estimate the BN statistics on N training batches
    (growth.norms.recalibrate; a ledger row of N batches' forward FLOPs, counted in budgets).
    """
    check_writable(output, run.get("force", False), inputs=(path,))  # refusals first
    check_no_checkpoint(output, run.get("resume", False))
    if isinstance(bn_recalibrate, bool) or not isinstance(bn_recalibrate, int) \
            or bn_recalibrate < 0:
        raise MgrowError(f"--bn-recalibrate takes a whole number of batches >= 0, not "
                         f"{bn_recalibrate!r}")
    bundle = load(path)
    man = bundle.manifest
    data = source.load(man.data, man.arch.input_size)
    if man.data is None:  # e.g. converted without --data: the first data trained on, and
        man = adopt(man, data)  # the size it is read at, which the FLOPs are counted at
    stage = "growth" if man.grown() else "base"
    model = bundle.model()
    recalibration = None
    if bn_recalibrate:
        recalibration = _recalibrate(man, model, data, cfg, bn_recalibrate, stage)
    if budget is not None:  # an epoch trains only whole batches: count those images
        reference_epochs = reference_epochs_of(man, reference_epochs)
        per_epoch = steps_per_epoch(data, cfg.batch_size)
        epochs = epochs_for_budget(man, budget, reference_epochs, per_epoch * cfg.batch_size,
                                   data.spec.input_size, recalibration and
                                   recalibration.train_flops or 0)
        if round(epochs * per_epoch) < 1:
            raise MgrowError(f"--budget {budget:g}X leaves {epochs:.3g} epochs: less than one "
                             f"step of {cfg.batch_size} images; raise the budget")
        cfg = cfg.model_copy(update={"epochs": epochs})
        man = man.model_copy(update={"reference_epochs": reference_epochs})
    used = recalibration.images // cfg.batch_size if recalibration else 0
    if recalibration:
        man = man.with_phase(recalibration)
    options = {**recipe(cfg), "budget": budget, "data": data.spec.spec,
               "train_size": len(data.train_y), "bn_recalibrate": used}
    manifest = man.derived("finetune", options, (bundle.parent(),))
    return run_phase(manifest, model, data, cfg, output, "finetune", stage, **run)


def adopt(man: Manifest, data: Data) -> Manifest:
    """Return a manifest that recorded no data with `data` recorded, its network counted at
    the size the data is read at (one size for the images and the FLOPs)."""
    arch = man.arch.model_copy(update={"input_size": data.spec.input_size})
    return man.model_copy(update={"data": data.spec, "arch": arch})


def _recalibrate(man: Manifest, model: nn.Module, data: Data, cfg: TrainConfig, n: int,
                 stage: str) -> Phase:
    """Recalibrate the model's BN statistics in place; return the ledger row it costs
    (forward FLOPs only: no backward pass)."""
    from .engine import device_name, resolve_device
    from .growth.norms import recalibrate
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    images = recalibrate(model, data, n, cfg.batch_size, cfg.seed, dev)
    fwd = forward_flops(at_size(man.arch, data))
    return Phase(operation="bn-recalibrate", arch=man.describe(), stage=stage, images=images,
                 forward_flops=fwd, train_flops=fwd * images,
                 wall_s=round(time.perf_counter() - t0, 3), device=device_name(dev))


def evaluate_bundle(path: Path, source: DataSource, device: str = "auto",
                    batch_size: int = 512) -> dict:
    """Return top-1 and loss of a bundle on the test split of its (or the given) data."""
    bundle = load(path)
    data = source.load(bundle.manifest.data)
    check_fits(bundle.manifest.arch, data, bundle.manifest.mixing, batch_size, False, device)
    acc, loss = evaluate(bundle.model(), data, batch_size=batch_size, device=device)
    if not (math.isfinite(loss) and math.isfinite(acc)):
        raise MgrowError(f"{path}: the evaluation is not finite (test loss {loss}): the "
                         "bundle's statistics or weights are broken")
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
    return dump_json({"output": str(o.path), "top1": r.accuracy, "loss": r.loss,
                       "train_loss": r.train_loss, "steps": r.steps, "images": r.images,
                      "wall_s": r.wall_s, "device": r.device, "epochs": o.epochs})
