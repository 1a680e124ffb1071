"""What a training run is given and what it returns, and the pure functions of its schedule.

Owns `TrainConfig`, `TrainResult`, `Progress`, `lr_at`, `warmup_steps`, `param_groups`.
Imports nothing of mgrow (torch and pydantic only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

WARMUP_MAX = 0.1  # warm-up takes at most this share of the run
STEP_AT = (1 / 3, 2 / 3, 8 / 9)  # schedule "step": shares of the run where lr drops 0.1x
Progress = Union[Literal["bar", "quiet", "json"], Callable[[dict], None]]


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
