"""Image folders streamed from disk: decoded batch by batch in DataLoader worker processes
with the ImageNet recipe's transforms (data.transforms).

Transforms at input size S (torchvision.transforms.v2 functionals on PIL images):
- train: RandomResizedCrop(S) (scale 0.08-1, ratio 3/4-4/3, bilinear, antialiased) and a
  horizontal flip with probability 1/2;
- eval: Resize(round(S / 0.875)) of the shorter side, then CenterCrop(S).
Workers return uint8 batches, normalised after the copy to an accelerator; for the CPU the
workers normalise them (the same float32 operations, so the same bits).

Determinism: the epoch's order and each rank's slice of every global batch are those of
the in-memory path (data.plan.batch_plan); the crop and flip of training image i in
epoch e are drawn from a generator seeded by (seed, 2, e, i), so they depend neither on
the worker that decodes it, nor on the number of workers or ranks, nor on where a resumed
epoch starts: a resumed run sees exactly the images an uninterrupted one does.

Owns `StreamData`, `Images`, `load_folder` and the loader workers' lifecycle. Imports
mgrow.errors, mgrow.manifest and data.plan, data.transforms, data.folders.
"""

from __future__ import annotations

import atexit
import functools
import signal
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import MgrowError
from ..manifest import DatasetSpec
from .folders import (DEFAULT_SIZE, PIL_MODULES, BadImage, Split, cut, decode, default_workers,
                      list_folder, quiet, scan, shown)
from .plan import batch_plan, generator
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, STATS, STATS_SAMPLE, channel_stats,
                         eval_view, normalise, train_view)


class Images(torch.utils.data.Dataset):
    """Image i of a split as (uint8 (3, S, S), label): the train view of (seed, epoch, i) or
    the eval view."""

    def __init__(self, root: Path, split: Split, size: int, train: bool, seed: int = 0,
                 epoch: int = 0) -> None:
        self.root, self.split, self.size = root, split, size
        self.train, self.seed, self.epoch = train, seed, epoch

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode(self.split.path(self.root, i))
        if self.train:
            x = train_view(image, self.size, generator(self.seed, 2, self.epoch, i))
        else:
            x = eval_view(image, self.size)
        return x, int(self.split.labels[i])


@dataclass
class StreamData:
    """An image folder read from disk batch by batch; the engine's other kind of data."""

    root: Path
    train: Split
    test: Split
    spec: DatasetSpec
    workers: int  # DataLoader worker processes (0: decode in this process)

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_y(self) -> torch.Tensor:
        return self.test.labels

    def batches(self, train: bool, batch_size: int, epoch: int, seed: int, rank: int = 0,
                world: int = 1, start: int = 0, device: torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (b, 3, S, S) float32 normalised, labels (b,)): this rank's slice of
        each global batch, decoded by `workers` processes; see mgrow.data.batches."""
        plan = [idx.tolist() for _, idx in batch_plan(
            len(self.train_y if train else self.test_y), train, batch_size, epoch, seed,
            rank, world, start)]
        split = self.train if train else self.test
        images = Images(self.root, split, self.spec.input_size, train, seed, epoch)
        # to an accelerator: uint8 batches (4x less to copy), normalised there; for the CPU
        # the workers normalise (the main process's threads are the training's)
        to_device = device is not None and device.type != "cpu"
        collate = functools.partial(_stack, spec=None if to_device else self.spec)
        loader = torch.utils.data.DataLoader(
            images, batch_sampler=plan, num_workers=self.workers, collate_fn=collate,
            pin_memory=device is not None and device.type == "cuda",
            generator=torch.Generator(),  # never draws from (or moves) the global torch RNG
            prefetch_factor=4 if self.workers else None, worker_init_fn=_worker_start)
        it = iter(loader)
        _LIVE.add(it)
        try:
            for x, y in it:  # (b, 3, S, S) uint8 or float32, (b,) int64
                if to_device:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    x = normalise(x, self.spec)
                yield x, y
        except BadImage as e:  # from a worker: the first line of its traceback is not ours
            raise BadImage(_own_message(e)) from None
        finally:  # now, not when a traceback that holds the iterator is collected
            _shut_down(it)


# Live loader iterators. Workers ignore SIGTERM (below), so multiprocessing's exit handler,
# which terminates and then joins daemon children, would wait forever for the workers of an
# iterator still alive at exit (a traceback holding its frame): stop them first.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _shut_down(it: object) -> None:
    """Stop a DataLoader iterator's workers (sent their end marker and joined)."""
    _LIVE.discard(it)
    stop = getattr(it, "_shutdown_workers", None)  # torch's own clean-up (also run by __del__)
    if stop is not None:
        stop()


@atexit.register  # registered after multiprocessing's handler, so it runs before it
def _shut_down_all() -> None:
    for it in list(_LIVE):
        _shut_down(it)


def _stack(items: list[tuple[torch.Tensor, int]], spec: DatasetSpec | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a batch: images (b, 3, S, S), uint8 or (given `spec`) float32 normalised by it,
    and labels (b,) int64. In a worker the images go straight into shared memory, as
    torch's default_collate does: no copy when the batch is sent, and no heap growth."""
    first = items[0][0]
    out = torch.empty((len(items), *first.shape), dtype=torch.float32 if spec else first.dtype)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    for i, (x, _) in enumerate(items):
        out[i] = normalise(x[None], spec)[0] if spec else x
    return out, torch.tensor([y for _, y in items])


def _worker_start(worker: int) -> None:
    """Make a loader worker ignore Ctrl-C and SIGTERM sent to the whole process group: the
    main process stops after the current step (it may still need a batch to finish it) and
    then shuts the workers down itself; a worker whose parent dies exits on its own. PIL's
    warnings are silenced for the worker's process (one of ours, decoding only)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    warnings.filterwarnings("ignore", module=PIL_MODULES)


def _own_message(e: Exception) -> str:
    """Return BadImage's own one-line message, also when a DataLoader worker re-raised it
    wrapped in its traceback ("Caught BadImage in DataLoader worker ...")."""
    text = str(e)
    if "\n" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return last.partition(": ")[2] or last


def measure_stats(root: Path, split: Split, size: int, workers: int
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std (0-1) of up to STATS_SAMPLE training images
    (evenly spaced in listing order), each through the eval view at `size`."""
    n = len(split.files)
    pick = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(np.int64))
    sample = Split(split.files[pick], split.labels[torch.from_numpy(pick)])
    loader = torch.utils.data.DataLoader(Images(root, sample, size, False), batch_size=64,
                                         num_workers=workers, generator=torch.Generator())
    try:
        with quiet():  # PIL's warnings, here and in the workers forked meanwhile
            x = torch.cat([b for b, _ in loader])  # (n, 3, S, S) uint8
    except BadImage as e:
        raise BadImage(_own_message(e)) from None
    return channel_stats(x)


def load_folder(spec: str, root: Path, subset: int | None, input_size: int | None,
                stats: str, workers: int | None,
                at_most: bool = False) -> StreamData:
    """Return a streamed image folder: listed, cut to `subset` (`at_most`: a ceiling), every
    used file's header checked, normalisation per `stats` ('imagenet' constants or
    'sample'-measured)."""
    if stats not in STATS:
        raise MgrowError(f"unknown --stats {stats!r} (imagenet or sample)")
    import PIL.Image  # noqa: F401  imported here, once: forked workers inherit the modules
    import torchvision.transforms.v2.functional  # noqa: F401  (seconds each, per import)
    workers = default_workers() if workers is None else workers
    size = input_size or DEFAULT_SIZE
    classes, train, test = list_folder(root)
    train = cut(train, subset, spec, at_most)
    if not len(test.files):
        raise MgrowError(f"{shown(spec)}: the training and test splits must both hold "
                         f"images")
    for split, where in ((train, "training split"), (test, "test split")):
        scan(root, split, max(4, 2 * workers), f"{spec}, {where}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if stats == "imagenet" else \
        measure_stats(root, train, size, workers)
    info = DatasetSpec(spec=spec, num_classes=len(classes), channels=3, input_size=size,
                       mean=mean, std=std, train_size=len(train.files))
    return StreamData(root, train, test, info, workers)
