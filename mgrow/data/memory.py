"""Data sets held in memory as uint8 tensors: the built-in digits, npz folders, torchvision's
sets, and image folders decoded once (`--data-mode memory`).

Augmentation rule: colour (3-channel) sets except svhn get a random crop after zero padding
by 4 pixels and a horizontal flip with probability 1/2 (as for CIFAR); grayscale sets
(digits, mnist, fashion-mnist) and svhn (digits do not survive a mirror) get none. The
augmentation of global batch b is drawn from (seed, epoch, b) for the whole global batch
and then sliced, so every rank count sees the same images, augmented the same way.

Owns `MemoryData` and the readers. Imports mgrow.errors, mgrow.limits (the memory check),
mgrow.manifest and data.plan, data.transforms, data.folders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import MgrowError
from ..limits import check_memory
from ..manifest import DatasetSpec
from .folders import DEFAULT_SIZE, cut, decode, default_workers, list_folder, quiet, scan, shown
from .plan import balanced_subset, batch_plan, generator, subset_size
from .transforms import PAD, channel_stats, crop_flip, eval_view, normalise

TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                "fashion-mnist": "FashionMNIST", "svhn": "SVHN"}


@dataclass
class MemoryData:
    """A data set in memory: uint8 images, int64 labels, and what a bundle records of it."""

    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    spec: DatasetSpec
    augment: bool  # random crop (pad 4) + horizontal flip while training

    def batches(self, train: bool, batch_size: int, epoch: int, seed: int, rank: int = 0,
                world: int = 1, start: int = 0, device: torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's normalised batches (see mgrow.data.batches)."""
        return _memory_batches(self, train, batch_size, epoch, seed, rank, world, start,
                               device)


def default_data_dir() -> Path:
    """Return the folder torchvision data sets live in: $MGROW_DATA or ~/.cache/mgrow/data."""
    return Path(os.environ.get("MGROW_DATA") or Path.home() / ".cache/mgrow/data")


def load_memory(spec: str, data_dir: str | os.PathLike | None, download: bool,
                subset: int | None, input_size: int | None, workers: int | None,
                at_most: bool) -> MemoryData:
    """Return the in-memory data set of a checked `spec` (see data.source.load_data)."""
    name, _, arg = spec.partition(":")
    if name == "digits":
        splits = _npz_splits(Path(__file__).with_name("digits.npz"), "digits")
    elif name == "npz":
        splits = _npz_folder(Path(arg).expanduser())
    elif name in TORCHVISION:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        splits = _torchvision(name, root, download)
    else:  # imagefolder:PATH decoded once
        splits = _imagefolder(spec, Path(arg).expanduser(), subset, input_size, workers,
                              at_most)
        subset = None  # already applied before decoding
    return _assemble(spec, *splits, subset=subset, no_flip=name == "svhn", at_most=at_most)


def _assemble(spec: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
              test_y: torch.Tensor, num_classes: int | None, subset: int | None,
              no_flip: bool, at_most: bool = False) -> MemoryData:
    """Return checked Data from (N, C, H, W) uint8 splits, cut to `subset` training images
    (data.plan.subset_size).

    `num_classes` None: the largest label + 1.
    """
    _, c, h, w = train_x.shape
    where = shown(spec)  # it names a path: one line whatever that holds
    if not len(train_y) or not len(test_y):
        raise MgrowError(f"{where}: the training and test splits must both hold images")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if h != w:
        raise MgrowError(f"{where}: images must be square, not {h}x{w}")
    if tuple(test_x.shape[1:]) != (c, h, w):
        raise MgrowError(f"{where}: test images are {tuple(test_x.shape[1:])}, training "
                         f"images {(c, h, w)}")
    for split, y in (("training", train_y), ("test", test_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise MgrowError(f"{where}: {split} labels must lie in 0..{num_classes - 1}")
    subset = subset_size(subset, len(train_y), spec, at_most)
    if subset is not None:
        keep = balanced_subset(train_y, subset)
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = channel_stats(train_x)
    info = DatasetSpec(spec=spec, num_classes=num_classes, channels=c, input_size=h,
                       mean=mean, std=std, train_size=len(train_y))
    return MemoryData(train_x, train_y, test_x, test_y, info, augment=c == 3 and not no_flip)


def _nchw(images: np.ndarray, labels: np.ndarray, where: object) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Return uint8 (N, C, H, W) and int64 (N,) tensors from (N, H, W[, C]) arrays."""
    where = shown(where)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise MgrowError(f"{where}: images must be uint8 (N, H, W, C) or (N, H, W), not "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype,
                                                                           np.integer):
        raise MgrowError(f"{where}: labels must be {len(images)} integers, not "
                         f"{labels.dtype} {labels.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images[..., None] if images.ndim == 3 else images))
    return x.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64))


def _read_npz(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """Return the named arrays of an .npz file, or raise MgrowError."""
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise MgrowError(f"{shown(path)}: no array {', '.join(missing)} (has "
                                 f"{', '.join(z.files) or 'none'})")
            return [z[k] for k in keys]
    except (OSError, ValueError) as e:  # zipfile.BadZipFile is an OSError
        raise MgrowError(f"{shown(path)}: not a readable .npz file ({e})") from None


def _npz_splits(path: Path, where: str) -> tuple:
    """Return (train_x, train_y, test_x, test_y, None) of the built-in digits file."""
    arrays = _read_npz(path, ("train_images", "train_labels", "test_images", "test_labels"))
    tx, ty = _nchw(arrays[0], arrays[1], where)
    vx, vy = _nchw(arrays[2], arrays[3], where)
    return tx, ty, vx, vy, None


def _natural(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _npz_folder(root: Path) -> tuple:
    """Return (train_x, train_y, test_x, test_y, None) of an npz: folder."""
    where = shown(f"npz:{root}")
    if not root.is_dir():
        raise MgrowError(f"{where}: no such folder (expected train*.npz and test.npz in it)")
    files = sorted(root.glob("train*.npz"), key=_natural)
    if not files or not (root / "test.npz").is_file():
        raise MgrowError(f"{where}: expected train*.npz and test.npz in the folder")
    train = [_nchw(*_read_npz(f, ("images", "labels")), f) for f in files]
    shapes = {tuple(x.shape[1:]) for x, _ in train}
    if len(shapes) > 1:
        raise MgrowError(f"{where}: training files disagree on the image shape {shapes}")
    tx, ty = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    vx, vy = _nchw(*_read_npz(root / "test.npz", ("images", "labels")), root / "test.npz")
    return tx, ty, vx, vy, None


def _torchvision(name: str, root: Path, download: bool) -> tuple:
    """Return (train_x, train_y, test_x, test_y, None) of a torchvision data set."""
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION[name])
    out = []
    for train in (True, False):
        kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
        try:
            ds = cls(str(root), download=download, **kwargs)
        except (RuntimeError, OSError, ImportError) as e:
            why = f"download failed ({e})" if download else "not found"
            raise MgrowError(f"{name}: {why} in {shown(root)} (pass --download to fetch it, "
                             f"--data-dir DIR to use a copy elsewhere, or --data npz:PATH)"
                             ) from None
        images = np.asarray(ds.data)
        if name == "svhn":
            images = images.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        out += _nchw(images, np.asarray(ds.labels if name == "svhn" else ds.targets), name)
    return (*out, None)


def _imagefolder(spec: str, root: Path, subset: int | None, input_size: int | None,
                 workers: int | None, at_most: bool) -> tuple:
    """Return (train_x, train_y, test_x, test_y, num_classes) of an imagefolder: tree decoded
    into memory, every image through the streamed path's eval view (Resize + CenterCrop)."""
    classes, train, test = list_folder(root)
    train = cut(train, subset, spec, at_most)
    size = input_size or DEFAULT_SIZE
    images = len(train.files) + len(test.files)  # uint8, 3 x S x S each, held at once
    check_memory(images * 3 * size * size, f"--data-mode memory: {images:,} images of {spec} "
                 f"decoded at {size} x {size}")
    out = []
    for split, where in ((train, "training split"), (test, "test split")):
        scan(root, split, 2 * (default_workers() if workers is None else max(1, workers)),
             f"{spec}, {where}")
        x = torch.empty(len(split.files), 3, size, size, dtype=torch.uint8)
        with quiet():  # PIL's warnings (a palette's transparency, EXIF), in this thread
            for i in range(len(split.files)):
                x[i] = eval_view(decode(split.path(root, i)), size)
        out += [x, split.labels]
    return (*out, len(classes))


def _memory_batches(data: MemoryData, train: bool, batch_size: int, epoch: int, seed: int,
                    rank: int = 0, world: int = 1, start: int = 0,
                    device: torch.device | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches of an in-memory data set (see `batches`); augmentation of global batch
    b from (seed, epoch, b), drawn for the whole global batch and then sliced."""
    x, y = (data.train_x, data.train_y) if train else (data.test_x, data.test_y)
    for b, (part, idx) in enumerate(batch_plan(len(y), train, batch_size, epoch, seed, rank,
                                               world, start), start):
        xb = x[idx]  # (b, C, H, W) uint8
        if train and data.augment:
            g = generator(seed, 1, epoch, b)
            full = min(len(y), (b + 1) * batch_size) - b * batch_size
            shift = torch.randint(0, 2 * PAD + 1, (full, 2), generator=g)  # (B, 2) global
            flip = torch.randint(0, 2, (full,), generator=g).bool()  # (B,) global
            xb = crop_flip(xb, shift[part], flip[part])
        yb = y[idx]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield normalise(xb, data.spec), yb
