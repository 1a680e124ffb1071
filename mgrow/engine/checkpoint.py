"""Resumable training checkpoints: written atomically, read back only into the same run.

A checkpoint holds the model, optimizer, step, images seen and the torch RNG states (CPU,
and the GPU's for dropout), so a resumed run is bit-for-bit the uninterrupted one on the
CPU. It records what the run was started with (`run_record`), and a resume with other
options or other data is refused naming every difference.

Owns `save_checkpoint`, `load_checkpoint`, `run_record`, `data_identity`. Imports
mgrow.errors, mgrow.bundle (atomic writes, tensor checks), mgrow.data and engine.config.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import check_tensors
from ..data import Data
from ..errors import MgrowError
from ..files import read_bytes, write_atomic
from .config import TrainConfig

CHECKPOINT_FORMAT = "mgrow-train-1"


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
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


def load_checkpoint(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer,
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
