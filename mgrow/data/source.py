"""Data sets by spec: `load_data` and `DataSource` (a spec plus its loading options), one
interface (`Data`) in front of in-memory and streamed sets.

Specs (`--data`):
- `digits` (default): 1,797 real 8x8 grayscale handwritten digits shipped with mgrow
  (`digits.npz`: UCI ML hand-written digits via scikit-learn, CC BY 4.0), values scaled
  0..16 -> 0..255, split once with seed 0 into 1,437 train / 360 test.
- `npz:PATH`: a folder with `train*.npz` (read in natural name order, concatenated) and
  `test.npz`, each holding `images` uint8 (N, H, W, C) or (N, H, W) and `labels` (N,).
- `cifar10`, `cifar100`, `mnist`, `fashion-mnist`, `svhn`: torchvision's copies under the
  data folder (`--data-dir`, else $MGROW_DATA, else ~/.cache/mgrow/data).
- `imagefolder:PATH`: PATH/train/CLASS/*.jpg (.jpeg .png .webp) and PATH/val or
  PATH/test with the same class folders, at input size S (`input_size`, default 224).
  Streamed from disk by default (data.stream: DataLoader workers, the ImageNet recipe's
  RandomResizedCrop + flip for training, Resize(S / 0.875) + CenterCrop(S) for
  evaluation, ImageNet mean/std or `stats="sample"`); `mode="memory"` decodes every image
  once through the evaluation view into memory instead (small folders).

Data modes: `auto` streams image folders and holds every other set in memory (they are
arrays already); `memory` and `stream` force one (streaming applies to image folders
only). Both kinds of data share one interface (`spec`, `train_y`, `test_y`, `batches`) and
one batch plan, so for the same seed they give the same labels in the same order.

Images must be square. Classes are 0..K-1 with K = the largest label + 1 (imagefolder: the
sorted class folders). Mean and std per channel (0-1 scale) are those of the training split
as used, after `subset`.

Owns `Data`, `load_data`, `batches`, `DataSource`, `with_normalisation`. Imports mgrow.errors,
mgrow.manifest and the data modules below it (memory, stream).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch

from ..errors import MgrowError
from ..manifest import DatasetSpec
from .memory import TORCHVISION, MemoryData, load_memory
from .stream import StreamData, load_folder

SPECS = ("digits", "npz:PATH", *TORCHVISION, "imagefolder:PATH")
MODES = ("auto", "memory", "stream")
Data = Union[MemoryData, StreamData]  # one interface: spec, train_y, test_y, batches()


def load_data(spec: str, data_dir: str | os.PathLike | None = None, download: bool = False,
              subset: int | None = None, mode: str = "auto", input_size: int | None = None,
              stats: str = "imagenet", workers: int | None = None,
              at_most: bool = False) -> Data:
    """Return the data set named by `spec`, its training split cut to `subset` images:
    in memory (MemoryData) or streamed from disk (data.stream.StreamData), as `mode` says.
    `at_most`: `subset` is a ceiling (a split that holds fewer is kept whole), not a demand.

    `input_size`, `stats` (imagenet | sample) and `workers` (None: the CPUs, at most 8)
    apply to image folders; `stats` and `workers` to streamed ones only.
    """
    if subset is not None and subset < 1:
        raise MgrowError(f"--subset must be at least 1, not {subset}")
    if mode not in MODES:
        raise MgrowError(f"unknown --data-mode {mode!r}: expected one of {', '.join(MODES)}")
    name, _, arg = spec.partition(":")
    folder = name == "imagefolder" and arg
    if input_size is not None and not folder:
        raise MgrowError(f"--input-size applies to imagefolder: data sets; {spec} images have "
                         f"a fixed size")
    if input_size is not None and not 8 <= input_size <= 4096:
        raise MgrowError(f"--input-size must lie in 8..4096, not {input_size}")
    if workers is not None and workers < 0:
        raise MgrowError(f"--workers must be at least 0, not {workers}")
    if mode == "stream" and not folder:
        raise MgrowError(f"--data-mode stream applies to imagefolder: data sets; {spec} is "
                         f"held in memory (use --data-mode auto or memory)")
    if folder and mode != "memory":
        return load_folder(spec, Path(arg).expanduser(), subset, input_size, stats, workers,
                           at_most)
    if not (name in ("digits", *TORCHVISION) and not arg or name == "npz" and arg or folder):
        raise MgrowError(f"unknown data set {spec!r}: expected one of {', '.join(SPECS)}")
    return load_memory(spec, data_dir, download, subset, input_size, workers, at_most)


def batches(data: Data, train: bool, batch_size: int, epoch: int, seed: int,
            rank: int = 0, world: int = 1, start: int = 0, device: torch.device | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (b, C, H, W) float32 normalised, labels (b,) int64), this rank's slices.

    `batch_size` is the global batch; rank r of `world` gets the r-th contiguous slice of
    each. Training shuffles and drops the last incomplete batch; evaluation keeps file
    order and every image. `start` skips the first `start` global batches. With `device`,
    batches are moved there as uint8 and normalised there (pinned first when streamed to
    CUDA).
    """
    return data.batches(train, batch_size, epoch, seed, rank, world, start, device)


@dataclass
class DataSource:
    """Where data comes from: a --data spec (or the bundle's), plus the loading options."""

    spec: str | None = None
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None
    mode: str = "auto"  # auto | memory | stream (see mgrow.data)
    workers: int | None = None  # streamed sets: loader processes (None: the CPUs, at most 8)
    input_size: int | None = None  # image folders (None: the bundle's, else 224)
    stats: str = "imagenet"  # streamed sets: mean/std from ImageNet, or measured on a sample

    def load(self, recorded: DatasetSpec | None = None, input_size: int | None = None
             ) -> Data:
        """Return the data: the given spec, else the one a bundle recorded (same subset).

        A bundle's recorded normalisation is part of its function: when `recorded` is given,
        the returned data are normalised with the recorded mean and std, whatever spec or
        subset was asked for (so `eval` with and without `--data` agree). Without --data and
        --subset the training split is cut to the recorded training-set size.
        `input_size`: the side the network is counted at (its ArchSpec's), at which an image
        folder is read when neither --input-size nor a recorded size says otherwise, so the
        images read and the FLOPs counted are of one size.
        """
        if self.spec is None and recorded is None:
            raise MgrowError("no data set: pass --data (the bundle does not record one)")
        spec = self.spec if self.spec is not None else recorded.spec
        # the recorded data without --subset: at most the recorded training size (the whole
        # split when the data on this machine holds fewer), listed and loaded once
        at_most = self.subset is None and self.spec is None
        if at_most and recorded.train_size < 1:
            raise MgrowError(f"the bundle's manifest records a training set of "
                             f"{recorded.train_size} images of {recorded.spec}: pass --data "
                             "to say what to read")
        data = self._load(spec, recorded.train_size if at_most else self.subset, recorded,
                          at_most, input_size)
        return data if recorded is None else with_normalisation(data, recorded)

    def _load(self, spec: str, subset: int | None, recorded: DatasetSpec | None,
              at_most: bool = False, input_size: int | None = None) -> Data:
        """Return load_data's result; an image folder keeps the input size a bundle recorded
        (else the network's `input_size`)."""
        size = self.input_size
        if size is None and spec.startswith("imagefolder:"):
            size = recorded.input_size if recorded is not None else input_size
        return load_data(spec, self.data_dir, self.download, subset, self.mode, size,
                         self.stats, self.workers, at_most)


def with_normalisation(data: Data, recorded: DatasetSpec) -> Data:
    """Return `data` normalised with `recorded`'s mean and std (its own when channels differ;
    check_fits then refuses the pair)."""
    if len(recorded.mean) != data.spec.channels:
        return data
    spec = data.spec.model_copy(update={"mean": recorded.mean, "std": recorded.std})
    return dataclasses.replace(data, spec=spec)
