"""The one training and evaluation engine every command uses (see engine.loop).

Layers inside the package, bottom to top: config (TrainConfig, the schedule), ranks
(devices, torchrun), signals (Ctrl-C, SIGTERM), checkpoint (resume), progress (bar, metrics
files), loop (`train`, `evaluate`). This file re-exports what the layers above use.
Imports mgrow.errors, limits, bundle, data and mixing, nothing higher.
"""

from .checkpoint import run_record
from .config import Progress, TrainConfig, TrainResult, lr_at, param_groups, warmup_steps
from .loop import SYNC_EVERY, evaluate, train
from .progress import epoch_line, summary_path
from .ranks import barrier, device_name, is_main_process, resolve_device
from .signals import Interrupted

__all__ = ["SYNC_EVERY", "Interrupted", "Progress", "TrainConfig", "TrainResult", "barrier",
           "device_name", "epoch_line", "evaluate", "is_main_process", "lr_at",
           "param_groups", "resolve_device", "run_record", "summary_path", "train",
           "warmup_steps"]
