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
- After every epoch: evaluation on the test split, a metrics record (engine.progress) and an
  atomic checkpoint (engine.checkpoint).
- SIGINT/SIGTERM: the current step finishes, a checkpoint is saved (mid-epoch if need be)
  and `Interrupted` is raised (exit status 128 + the signal's number: 130 for Ctrl-C); a
  second signal stops at once, keeping the last checkpoint (also `Interrupted`, so still a
  one-line error).
- A non-finite loss raises MgrowError and leaves the last checkpoint untouched. On CPU it
  is checked every step; on CUDA every SYNC_EVERY steps and at each epoch's end, without a
  host sync in between, and the first bad step is still named exactly.
- Progress: "bar", "json", "quiet" or a callable (engine.progress).
- Distributed: under torchrun (WORLD_SIZE > 1) the process group is started if needed (nccl
  on CUDA, gloo on CPU) and kept until the process exits, the model wrapped in
  DistributedDataParallel, each rank trains on its slice of every global batch, metrics are
  all-reduced and only rank 0 prints or writes. BatchNorm stays per rank (each normalises
  its slice; SyncBatchNorm does not run on CPU), and a checkpoint holds nothing
  rank-specific, so a run may resume with another number of processes.

Owns `train` and `evaluate`. Imports mgrow.errors, mgrow.data, mgrow.mixing and the engine
modules below it (config, ranks, signals, checkpoint, progress).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import Data, batches, steps_per_epoch
from ..errors import MgrowError
from ..mixing import MixedConv2d
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Progress, TrainConfig, TrainResult, lr_at, param_groups, warmup_steps
from .progress import Reporter, remove_metrics, trim_metrics, write_metrics
from .ranks import agree, device_name, mean_over_ranks, process_group, resolve_device
from .signals import Interrupted, stop_on_signals

SYNC_EVERY = 50  # CUDA: steps between host syncs (non-finite check, progress, DDP stop vote)


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
        rank, world = stack.enter_context(process_group(dev))
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
            saved = load_checkpoint(checkpoint, model, opt, cfg, data)
            if metrics_path is not None and rank == 0:  # drop epochs the checkpoint lacks
                trim_metrics(metrics_path, saved["step"])
        else:
            torch.manual_seed(cfg.seed)
            saved = {"step": 0, "images": 0, "wall_s": 0.0, "train_loss": math.nan}
            if metrics_path is not None and rank == 0:  # a previous run's: this one's
                remove_metrics(metrics_path)  # are created with its first epoch's record
        step, images, train_loss = saved["step"], saved["images"], saved["train_loss"]
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
        if cfg.compile:
            net = torch.compile(net)
        stop = stack.enter_context(stop_on_signals(checkpoint))
        report = stack.enter_context(Reporter(progress if rank == 0 else "quiet", total, step))

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
                    first_bad, stopping = agree(bad, stop.signal is not None, world)
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
            epoch_loss = (mean_over_ranks(loss_sum + prior_mean * prior_n, seen + prior_n,
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
                    write_metrics(metrics_path, record)
                report.epoch(record)
                if not stopping:  # a signal during evaluation stops here, not a step later
                    stopping = agree(bad, stop.signal is not None, world)[1]
            if checkpoint is not None and rank == 0 and (epoch_done or stopping):
                save_checkpoint(checkpoint, model, opt, step, per_epoch, images, wall(),
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


def _nonfinite_message(first_bad: int, per_epoch: int, total: int,
                       checkpoint: Path | None) -> str:
    """Return the one-line error for a non-finite loss at 0-based step `first_bad`."""
    kept = (f"the last checkpoint {checkpoint} is unchanged" if checkpoint is not None
            and checkpoint.exists() else "no checkpoint was written")
    return (f"loss is not finite at epoch {first_bad // per_epoch + 1}, step {first_bad + 1} "
            f"of {total}; {kept}; try a lower --lr")
