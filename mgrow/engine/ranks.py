"""Devices and ranks: which device a run uses, and the process group under torchrun.

Under torchrun (WORLD_SIZE > 1) the process group is started if needed (nccl on CUDA,
gloo on CPU) and kept until the process exits; each rank trains on its slice of every
global batch, metrics are all-reduced and only rank 0 prints or writes.

Owns `resolve_device`, `is_main_process`, `device_name`, `process_group`, `barrier`,
`agree`, `mean_over_ranks`. Imports mgrow.errors.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import MgrowError


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
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):  # mps, meta, xla: not trained on
            raise MgrowError(f"unknown device {name!r} (expected auto, cpu, cuda or "
                             f"cuda:N)")
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


def agree(bad: torch.Tensor, stop: bool, world: int) -> tuple[int, bool]:
    """Return (first non-finite step, whether any rank was signalled), agreed by all ranks."""
    if world == 1:
        return int(bad), stop
    votes = torch.stack([bad, torch.tensor(0 if stop else 1, device=bad.device)])
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    return int(votes[0]), int(votes[1]) == 0


def mean_over_ranks(loss_sum: torch.Tensor, seen: int, world: int) -> float:
    """Return the mean per-step loss, averaged over the ranks."""
    mean = loss_sum / max(seen, 1)
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return float(mean)


@contextlib.contextmanager
def process_group(dev: torch.device) -> Iterator[tuple[int, int]]:
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
