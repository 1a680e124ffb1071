"""The one training and evaluation loop every command uses.

- SGD with momentum (Nesterov by default) and parameter groups derived from the parameters
  themselves: weight decay on template banks and >= 2-D weights, none on coefficients
  (`.alpha`), norms and biases.
- Learning rate: linear warm-up over min(warmup_epochs, 10% of the run), then a cosine to 0
  (or, `schedule="step"`, the paper's ImageNet steps: 0.1x at 1/3, 2/3 and 8/9 of the run,
  epochs 30, 60, 80 of 90); a pure function of the global step, so a checkpoint needs no
  scheduler state.
- Deterministic: the data order and augmentation come from (seed, epoch, batch) (see
  mgrow.data), and a checkpoint holds the model, optimizer, step, images seen and the torch
  RNG states (CPU, and the GPU's for dropout), so a resumed run is bit-for-bit the
  uninterrupted one on the CPU; on a GPU, up to the round-off of kernels that sum in
  another order from run to run (cuDNN, atomics).
- After every epoch: evaluation on the test split, one JSON line in the metrics file
  (truncated by a fresh run; a resumed one drops the lines of epochs after its checkpoint,
  then appends), the same records as CSV beside it (`OUT.summary.csv`, one row per epoch,
  timm's convention) and an atomic checkpoint.
- SIGINT/SIGTERM: the current step finishes, a checkpoint is saved (mid-epoch if need be)
  and `Interrupted` is raised (exit status 128 + the signal's number: 130 for Ctrl-C); a
  second signal stops at once, keeping the last checkpoint (also `Interrupted`, so still a
  one-line error).
- A non-finite loss raises MgrowError and leaves the last checkpoint untouched. On CPU it
  is checked every step; on CUDA every SYNC_EVERY steps and at each epoch's end, without a
  host sync in between, and the first bad step is still named exactly.
- Progress: "bar" (rich, on stderr; when stderr is not a terminal, one plain line per epoch
  instead: epoch, loss, accuracy, lr, images/s, ETA), "json" (each epoch's metrics record as
  a line on stdout), "quiet", or a callable given each epoch's record.
- Distributed: under torchrun (WORLD_SIZE > 1) the process group is started if needed (nccl
  on CUDA, gloo on CPU) and kept until the process exits, the model wrapped in
  DistributedDataParallel, each rank trains on its slice of every global batch, metrics are
  all-reduced and only rank 0 prints or writes. BatchNorm stays per rank (each normalises
  its slice; SyncBatchNorm does not run on CPU), and a checkpoint holds nothing
  rank-specific, so a run may resume with another number of processes.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from . import MgrowError
from .bundle import check_tensors, read_bytes, write_atomic
from .data import Data, batches, steps_per_epoch
from .limits import dump_json
from .mixing import MixedConv2d

CHECKPOINT_FORMAT = "mgrow-train-1"
SYNC_EVERY = 50  # CUDA: steps between host syncs (non-finite check, progress, DDP stop vote)
WARMUP_MAX = 0.1  # warm-up takes at most this share of the run
STEP_AT = (1 / 3, 2 / 3, 8 / 9)  # schedule "step": shares of the run where lr drops 0.1x

Progress = Union[Literal["bar", "quiet", "json"], Callable[[dict], None]]


class Interrupted(MgrowError):
    """Training stopped by SIGINT or SIGTERM, after saving a checkpoint; `exit_code` is the
    shell's 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        super().__init__(message)
        signum = getattr(signal, signal_name or "", signal.SIGINT)
        self.exit_code = 128 + int(signum)


class TrainConfig(BaseModel):
    """Every knob of a training run."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: float = Field(gt=0)  # fractional: round(epochs * steps_per_epoch) steps
    lr: float = Field(0.1, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True  # ignored when momentum is 0
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)  # global: split over the ranks
    warmup_epochs: float = Field(1.0, ge=0)  # clipped to 10% of the run's steps
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "step"] = "cosine"  # after the warm-up (see lr_at)
    seed: int = Field(0, ge=0)  # data order, augmentation and the torch RNG
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    amp: bool = False  # bf16 autocast, CUDA only
    channels_last: bool | None = None  # None: on for conv nets
    compile: bool = False  # torch.compile
    eval_every_epoch: bool = True  # else evaluate after the last step only


@dataclass(frozen=True)
class TrainResult:
    images: int  # training images of the whole run, resumed parts included
    wall_s: float  # seconds of the whole run, resumed parts included
    accuracy: float  # top-1 on the test split, 0-1
    loss: float  # mean cross-entropy on the test split
    train_loss: float  # mean training loss over the last epoch's steps
    device: str
    steps: int  # global steps of the whole run
    notes: tuple[str, ...] = ()  # options that could not be honoured, such as --amp on CPU


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine") -> float:
    """Return the learning rate of 0-based `step` of `total`: linear warm-up, then cosine to 0
    (or steps of 0.1x at the STEP_AT shares of the run).

    Example: total=100, warmup=10, peak=0.1 gives 0.01 at step 0, 0.1 at steps 9 and 10,
    0.05 at step 55 and 3.0e-5 at step 99; it would reach 0 at step 100. With "step" and
    total=900: 0.1 up to step 299, 0.01 from 300, 0.001 from 600, 1e-4 from 800.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "step":
        return peak * 0.1 ** sum(step >= round(share * total) for share in STEP_AT)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def warmup_steps(cfg: TrainConfig, per_epoch: int, total: int) -> int:
    """Return the warm-up length in steps: warmup_epochs, at most 10% of the run."""
    return min(round(cfg.warmup_epochs * per_epoch), int(total * WARMUP_MAX))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Return SGD parameter groups: decay on banks and >= 2-D weights, none on the rest.

    No decay: coefficients (names ending in `.alpha`, whatever their shape), norm weights
    and biases (<= 1-D). Frozen parameters are left out.
    """
    decay: dict[str, nn.Parameter] = {}
    plain: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        banks = name.startswith("banks.")
        no_decay = name.endswith(".alpha") or (p.ndim <= 1 and not banks)
        (plain if no_decay else decay)[name] = p
    groups = [(decay, weight_decay), (plain, 0.0)]
    return [{"params": list(g.values()), "param_names": list(g), "weight_decay": wd}
            for g, wd in groups if g]


def resolve_device(name: str) -> torch.device:
    """Return the torch device for 'auto', 'cpu', 'cuda' or 'cuda:N'. Under torchrun
    (WORLD_SIZE > 1) 'cuda' (and auto's) is this process's own GPU, cuda:LOCAL_RANK, for
    every use (training, BN recalibration, the memory check), not GPU 0 for all."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise MgrowError(f"unknown device {name!r} (expected auto, cpu, cuda or "
                             f"cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MgrowError(f"device {name!r}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def is_main_process() -> bool:
    """Return whether this process writes files and prints: always, except a non-zero rank
    under torchrun (RANK > 0), whose results are rank 0's."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def device_name(dev: torch.device, world: int = 1) -> str:
    """Return a readable device name such as 'cpu' or '2x NVIDIA H100 80GB HBM3'."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return f"{world}x {name}" if world > 1 else name


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 512,
             device: str | torch.device | None = None, amp: bool = False,
             channels_last: bool = False, rank: int = 0, world: int = 1) -> tuple[float, float]:
    """Return (top-1 accuracy 0-1, mean cross-entropy) of `model` on the test split."""
    if device is None:
        dev = next(model.parameters()).device
    else:
        dev = resolve_device(str(device))
        model.to(dev)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # (correct, loss sum, images)
    for x, y in batches(data, False, batch_size, 0, 0, rank, world, device=dev):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            out = model(x).float()  # (b, classes)
        sums[0] += (out.argmax(1) == y).sum()
        sums[1] += F.cross_entropy(out, y, reduction="sum")
        sums[2] += len(y)
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    correct, loss, n = sums.tolist()
    return correct / n, loss / n


def train(model: nn.Module, data: Data, cfg: TrainConfig, checkpoint: Path | None = None,
          resume: bool = False, progress: Progress = "bar",
          metrics_path: Path | None = None) -> TrainResult:
    """Return the test accuracy, losses and cost of training `model` in place on `data`.

    The model is moved to the device (conv weights to channels_last when that is on) and
    stays there.
    """
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    per_epoch = steps_per_epoch(data, cfg.batch_size)
    if per_epoch == 0:
        raise MgrowError(f"--batch-size {cfg.batch_size} exceeds the {len(data.train_y)} "
                         f"training images")
    total = round(cfg.epochs * per_epoch)
    if total < 1:
        raise MgrowError(f"--epochs {cfg.epochs:g} is less than one step ({per_epoch} steps "
                         f"per epoch)")
    warmup = warmup_steps(cfg, per_epoch, total)
    amp = cfg.amp and dev.type == "cuda"
    notes = ("--amp ignored: bf16 autocast is used on CUDA only",) if cfg.amp and not amp else ()
    cl = cfg.channels_last if cfg.channels_last is not None else any(
        isinstance(m, (nn.Conv2d, MixedConv2d)) for m in model.modules())
    every = 1 if dev.type == "cpu" else SYNC_EVERY

    with contextlib.ExitStack() as stack:
        rank, world = stack.enter_context(_process_group(dev))
        if cfg.batch_size % world:
            raise MgrowError(f"--batch-size {cfg.batch_size} does not split evenly over "
                             f"{world} processes")
        model.to(dev)
        for m in model.modules() if cl else ():  # conv weights only: banks stay as they are
            if isinstance(m, nn.Conv2d):
                m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                              momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        if resume:
            saved = _load_checkpoint(checkpoint, model, opt, cfg, data)
            if metrics_path is not None and rank == 0:  # drop epochs the checkpoint lacks
                _trim_metrics(metrics_path, saved["step"])
        else:
            torch.manual_seed(cfg.seed)
            saved = {"step": 0, "images": 0, "wall_s": 0.0, "train_loss": math.nan}
            if metrics_path is not None and rank == 0:
                _write_metrics(metrics_path, None)
        step, images, train_loss = saved["step"], saved["images"], saved["train_loss"]
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
        if cfg.compile:
            net = torch.compile(net)
        stop = stack.enter_context(_stop_on_signals(checkpoint))
        report = stack.enter_context(_Reporter(progress if rank == 0 else "quiet", total, step))

        def wall() -> float:
            return saved["wall_s"] + time.perf_counter() - t0

        accuracy = loss = math.nan
        bad = torch.full((), total, device=dev)  # first step with a non-finite loss; total: none
        stopping = False
        while step < total and not stopping:
            epoch, first = divmod(step, per_epoch)
            net.train()
            loss_sum, seen, t_epoch = torch.zeros((), device=dev), 0, time.perf_counter()
            # steps of this epoch run before a resume: (mean loss, steps), from the checkpoint
            prior_mean, prior_n = saved.pop("epoch_loss", (0.0, 0)) if first else (0.0, 0)
            for x, y in batches(data, True, cfg.batch_size, epoch, cfg.seed, rank, world, first,
                                device=dev):  # uint8 to the device, normalised there
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)  # (b, C, H, W)
                lr = lr_at(step, total, warmup, cfg.lr, cfg.schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    batch_loss = F.cross_entropy(net(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                finite = torch.isfinite(batch_loss.detach())
                bad = torch.minimum(bad, torch.where(finite, total, step))
                loss_sum += batch_loss.detach().float()
                seen += 1
                step += 1
                images += cfg.batch_size
                if (step % every == 0 or step % per_epoch == 0 or step == total
                        or (world == 1 and stop.signal)):
                    first_bad, stopping = _agree(bad, stop.signal is not None, world)
                    if first_bad < total:
                        raise MgrowError(_nonfinite_message(first_bad, per_epoch, total,
                                                            checkpoint))
                    speed = seen * cfg.batch_size / (time.perf_counter() - t_epoch)
                    report.advance(step, epoch + 1,
                                   (float(loss_sum) + prior_mean * prior_n) / (seen + prior_n),
                                   speed)
                if stopping or step == total:
                    break
            epoch_done = step % per_epoch == 0 or step == total
            epoch_loss = (_mean_over_ranks(loss_sum + prior_mean * prior_n, seen + prior_n,
                                           world), seen + prior_n)
            if epoch_done:
                train_loss, epoch_loss = epoch_loss[0], (0.0, 0)
                speed = seen * cfg.batch_size / (time.perf_counter() - t_epoch)
                if cfg.eval_every_epoch or step == total:
                    if world > 1:  # evaluate rank 0's model (the one that is saved) everywhere
                        for buf in model.buffers():
                            dist.broadcast(buf, 0)
                    accuracy, loss = evaluate(model, data, device=None, amp=amp,
                                              channels_last=cl, rank=rank, world=world)
                record = {"epoch": round(step / per_epoch, 4), "step": step, "steps": total,
                          "images": images, "lr": lr, "train_loss": train_loss,
                          "test_acc": _or_none(accuracy), "test_loss": _or_none(loss),
                          "images_per_s": round(speed, 1), "wall_s": round(wall(), 3)}
                if rank == 0 and metrics_path is not None:
                    _write_metrics(metrics_path, record)
                report.epoch(record)
                if not stopping:  # a signal during evaluation stops here, not a step later
                    stopping = _agree(bad, stop.signal is not None, world)[1]
            if checkpoint is not None and rank == 0 and (epoch_done or stopping):
                _save_checkpoint(checkpoint, model, opt, step, per_epoch, images, wall(),
                                 train_loss, epoch_loss, cfg, data)
            if stopping and step < total:
                if world > 1:
                    dist.barrier()  # rank 0 has written the checkpoint before anyone exits
                where = f"epoch {epoch + 1}, step {step} of {total}"
                saved_to = (f"checkpoint saved to {checkpoint}; run again with --resume to "
                            f"continue" if checkpoint is not None
                            else "no checkpoint path was given, so nothing was saved")
                by = stop.signal or "a signal to another rank"
                raise Interrupted(f"stopped by {by} at {where}: {saved_to}", stop.signal)
        if math.isnan(accuracy):  # resumed from a finished run's checkpoint
            accuracy, loss = evaluate(model, data, device=None, amp=amp, channels_last=cl,
                                      rank=rank, world=world)
        return TrainResult(images=images, wall_s=wall(), accuracy=accuracy, loss=loss,
                           train_loss=train_loss, device=device_name(dev, world), steps=step,
                           notes=notes)


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _agree(bad: torch.Tensor, stop: bool, world: int) -> tuple[int, bool]:
    """Return (first non-finite step, whether any rank was signalled), agreed by all ranks."""
    if world == 1:
        return int(bad), stop
    votes = torch.stack([bad, torch.tensor(0 if stop else 1, device=bad.device)])
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    return int(votes[0]), int(votes[1]) == 0


def _mean_over_ranks(loss_sum: torch.Tensor, seen: int, world: int) -> float:
    """Return the mean per-step loss, averaged over the ranks."""
    mean = loss_sum / max(seen, 1)
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return float(mean)


def _nonfinite_message(first_bad: int, per_epoch: int, total: int,
                       checkpoint: Path | None) -> str:
    """Return the one-line error for a non-finite loss at 0-based step `first_bad`."""
    kept = (f"the last checkpoint {checkpoint} is unchanged" if checkpoint is not None
            and checkpoint.exists() else "no checkpoint was written")
    return (f"loss is not finite at epoch {first_bad // per_epoch + 1}, step {first_bad + 1} "
            f"of {total}; {kept}; try a lower --lr")


@contextlib.contextmanager
def _process_group(dev: torch.device) -> Iterator[tuple[int, int]]:
    """Yield (rank, world): (0, 1) alone; under torchrun, joining (or starting) the group.

    A group started here stays up until the process exits: destroying and re-creating the
    default group within one torchrun launch reuses its rendezvous keys in the launcher's
    store, and the second rendezvous can hang (seen with gloo), so a second train() in the
    same processes (a finetune after a train, say) joins the first one's group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_end_process_group)
    yield dist.get_rank(), dist.get_world_size()


def _end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank under torchrun (after rank 0 has written a file the others need)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass
class _Stop:
    signal: str | None = None  # name of the first signal received
    at_once: str | None = None  # name of a second signal: stopping without a checkpoint


@contextlib.contextmanager
def _stop_on_signals(checkpoint: Path | None = None) -> Iterator[_Stop]:
    """Yield a flag that SIGINT/SIGTERM set (main thread only); old handlers come back on exit.

    A second signal stops at once (KeyboardInterrupt wherever the loop is; an interrupted
    checkpoint write leaves the previous checkpoint) and becomes `Interrupted`, naming the
    checkpoint to resume from; further signals are ignored while stopping.
    """
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.at_once:
            return
        if stop.signal is not None:
            stop.at_once = signal.Signals(signum).name
            raise KeyboardInterrupt  # a second signal: stop at once
        stop.signal = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except KeyboardInterrupt:
        if not stop.at_once:
            raise
        kept = (f"the last checkpoint {checkpoint} is intact; run again with --resume to "
                f"continue from it" if checkpoint is not None and Path(checkpoint).exists()
                else "no checkpoint had been saved yet")
        raise Interrupted(f"stopped at once by a second signal ({stop.at_once}): {kept}",
                          stop.signal) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                     per_epoch: int, images: int, wall_s: float, train_loss: float,
                     epoch_loss: tuple[float, int], cfg: TrainConfig, data: Data) -> None:
    """Write a resumable training checkpoint atomically; `epoch_loss` is the (mean training
    loss, steps) of the unfinished epoch, so a resumed run reports the whole epoch's mean."""
    buf = io.BytesIO()
    dev = next(model.parameters()).device
    cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {}
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), **cuda_rng,
                "optimizer": opt.state_dict(), "step": step, "epoch": step // per_epoch,
                "images": images, "wall_s": wall_s, "train_loss": train_loss,
                "epoch_loss": list(epoch_loss), "rng": torch.get_rng_state(),
                "batch_size": cfg.batch_size, "train_size": len(data.train_y),
                "run": run_record(cfg, data)}, buf)
    write_atomic(path, buf.getvalue(), force=True)


# What a resumed run must share with the run it continues: option -> TrainConfig field.
RESUME_OPTIONS = {"--epochs": "epochs", "--lr": "lr", "--seed": "seed",
                  "--batch-size": "batch_size", "--warmup": "warmup_epochs",
                  "--weight-decay": "weight_decay", "--label-smoothing": "label_smoothing",
                  "momentum": "momentum", "nesterov": "nesterov", "schedule": "schedule"}


def data_identity(data: Data) -> str:
    """Return a hash of the training data as used: its recorded spec (sizes, classes, pixel
    mean and std) and every training label, in order."""
    spec = data.spec.model_dump(exclude={"spec"})  # the same images under another path match
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(data.train_y.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_record(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """Return what a run was started with, as its checkpoint records it for --resume."""
    return {**{opt: getattr(cfg, field) for opt, field in RESUME_OPTIONS.items()},
            "--data": data_identity(data)}


def _check_same_run(path: Path, ck: dict, cfg: TrainConfig, data: Data) -> None:
    """Raise MgrowError naming every option in which this run differs from the checkpoint's.

    A checkpoint written before the record existed (mgrow 0.1.0) is checked on the batch
    size and the training-set size only, as it was then; one whose record predates an
    entry is checked on the entries it has."""
    if (ck["batch_size"], ck["train_size"]) != (cfg.batch_size, len(data.train_y)):
        raise MgrowError(f"{path}: saved with batch size {ck['batch_size']} on "
                         f"{ck['train_size']} training images; this run has {cfg.batch_size} "
                         f"on {len(data.train_y)} (resume needs the same)")
    saved = ck.get("run")
    if not isinstance(saved, dict):
        return
    now = run_record(cfg, data)
    diff = [f"{k} {_shown(now[k])} (checkpoint: {_shown(saved.get(k))})"
            if k != "--data" else f"--data: other training images or labels (data hash "
            f"{now[k]}, checkpoint: {saved.get(k)})" for k in now if k in saved
            and saved[k] != now[k]]
    if diff:
        raise MgrowError(f"{path}: this run differs from the one it would resume: "
                         f"{'; '.join(diff)}; resume with the same options and data, or "
                         "delete the checkpoint to start over")


def _shown(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _load_checkpoint(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer,
                     cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a checkpoint; return its counters."""
    if path is None:
        raise MgrowError("--resume needs a checkpoint path to resume from")
    if not Path(path).exists():
        raise MgrowError(f"{path}: no checkpoint to resume from (start without --resume)")
    try:
        ck = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for foreign or corrupt files
        raise MgrowError(f"{path}: not a readable training checkpoint "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise MgrowError(f"{path}: not an mgrow training checkpoint")
    _check_same_run(path, ck, cfg, data)
    check_tensors(model, ck["model"], path)
    names = [g["param_names"] for g in ck["optimizer"]["param_groups"]]
    if names != [g["param_names"] for g in opt.param_groups]:
        raise MgrowError(f"{path}: optimizer state is for other parameters than this model's")
    model.load_state_dict(ck["model"], strict=True)
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    dev = next(model.parameters()).device
    if dev.type == "cuda" and isinstance(ck.get("cuda_rng"), torch.Tensor):  # dropout masks
        torch.cuda.set_rng_state(ck["cuda_rng"], dev)
    counters = {k: ck[k] for k in ("step", "images", "wall_s", "train_loss")}
    mean, n = ck.get("epoch_loss", (0.0, 0))  # absent from older checkpoints
    return counters | {"epoch_loss": (float(mean), int(n))}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics lines of epochs after `step` (written before a crash, not in the
    checkpoint being resumed, and about to be recorded again)."""
    try:
        lines = Path(path).read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MgrowError(f"{path}: cannot read metrics ({e.strerror})") from None
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError, RecursionError):  # a torn or foreign line
            break
        keep.append(line)
    if len(keep) < len(lines):
        write_atomic(path, "".join(keep).encode(), force=True)
    try:
        _write_summary(path)
    except OSError as e:
        raise MgrowError(f"{path}: cannot write metrics ({e.strerror})") from None


SUMMARY_FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_acc", "lr", "images_per_s",
                  "wall_s")


def summary_path(metrics_path: Path) -> Path:
    """Return the CSV summary beside a metrics file: `OUT.metrics.jsonl` -> `OUT.summary.csv`."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.name.removesuffix(".jsonl")
                                  .removesuffix(".metrics") + ".summary.csv")


def _write_metrics(path: Path, record: dict | None) -> None:
    """Append one JSON line to the metrics file (None empties it) and rewrite the CSV summary
    from it, so the summary always holds exactly the metrics file's epochs, resumes included."""
    try:
        with open(path, "a" if record is not None else "w") as f:
            if record is not None:
                f.write(dump_json(record) + "\n")
        _write_summary(path)
    except OSError as e:
        raise MgrowError(f"{path}: cannot write metrics ({e.strerror})") from None


def _write_summary(metrics: Path) -> None:
    """Write the metrics records as CSV (a header, one row per epoch) beside them, whole."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    target = summary_path(metrics)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in SUMMARY_FIELDS}
                         for r in rows)
    os.replace(tmp, target)


def epoch_line(record: dict, epochs: float, eta_s: float) -> str:
    """Return the plain progress line of one epoch's record, for logs (no terminal)."""
    acc = "-" if record["test_acc"] is None else f"{100 * record['test_acc']:.2f}%"
    minutes, secs = divmod(max(round(eta_s), 0), 60)
    eta = f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
    return (f"epoch {record['epoch']:g}/{epochs:g}  loss {record['train_loss']:.4f}  "
            f"acc {acc}  lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  ETA {eta}")


class _Reporter:
    """Shows progress on rank 0: a rich bar (stderr; plain lines when stderr is not a
    terminal), JSON lines (stdout), a callback or nothing."""

    def __init__(self, progress: Progress, total: int, step: int) -> None:
        if not callable(progress) and progress not in ("bar", "quiet", "json"):
            raise MgrowError(f"unknown progress mode {progress!r} (bar, quiet or json)")
        if progress == "bar" and not sys.stderr.isatty():
            progress = "lines"  # logs of unattended runs: a live bar would be noise
        self.progress, self.total, self.step = progress, total, step
        self.t0 = time.perf_counter()
        self.bar: Any = None

    def __enter__(self) -> _Reporter:
        if self.progress == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                TextColumn("acc {task.fields[acc]}"),
                                TextColumn("{task.fields[speed]} img/s"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.step,
                                          epoch="-", loss="-", acc="-", speed="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, step: int, epoch: int, loss: float, speed: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, epoch=epoch, loss=f"{loss:.3f}",
                            speed=f"{speed:.0f}")

    def epoch(self, record: dict) -> None:
        if callable(self.progress):
            self.progress(record)
        elif self.progress == "json":
            print(dump_json(record), flush=True)
        elif self.progress == "lines":  # ETA: this process's mean time per step so far
            done = record["step"] - self.step
            eta = (time.perf_counter() - self.t0) / done * (record["steps"] - record["step"])
            epochs = record["epoch"] * record["steps"] / record["step"]
            print(epoch_line(record, epochs, eta), file=sys.stderr, flush=True)
        elif self.bar is not None and record["test_acc"] is not None:
            self.bar.update(self.task, acc=f"{record['test_acc']:.1%}")
