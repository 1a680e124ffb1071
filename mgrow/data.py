"""Data sets by spec, held in memory as uint8 tensors (image folders: streamed by default,
see mgrow.stream), and the deterministic batches drawn from either kind.

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
  Streamed from disk by default (mgrow.stream: DataLoader workers, the ImageNet recipe's
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

Augmentation rule: colour (3-channel) sets except svhn get a random crop after zero padding
by 4 pixels and a horizontal flip with probability 1/2 (as for CIFAR); grayscale sets
(digits, mnist, fashion-mnist) and svhn (digits do not survive a mirror) get none.

Determinism: the training order of an epoch is a permutation drawn from (seed, epoch); the
augmentation of global batch b from (seed, epoch, b), drawn for the whole global batch and
then sliced, so every rank count sees the same images, augmented the same way.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import MgrowError
from .manifest import DatasetSpec
from .stream import StreamData, subset_size

PAD = 4  # pixels of zero padding before the random crop
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                "fashion-mnist": "FashionMNIST", "svhn": "SVHN"}
SPECS = ("digits", "npz:PATH", *_TORCHVISION, "imagefolder:PATH")
MODES = ("auto", "memory", "stream")


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


Data = Union[MemoryData, StreamData]  # one interface: spec, train_y, test_y, batches()


def default_data_dir() -> Path:
    """Return the folder torchvision data sets live in: $MGROW_DATA or ~/.cache/mgrow/data."""
    return Path(os.environ.get("MGROW_DATA") or Path.home() / ".cache/mgrow/data")


def load_data(spec: str, data_dir: str | os.PathLike | None = None, download: bool = False,
              subset: int | None = None, mode: str = "auto", input_size: int | None = None,
              stats: str = "imagenet", workers: int | None = None,
              at_most: bool = False) -> Data:
    """Return the data set named by `spec`, its training split cut to `subset` images:
    in memory (MemoryData) or streamed from disk (mgrow.stream.StreamData), as `mode` says.
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
        from .stream import load_folder
        return load_folder(spec, Path(arg).expanduser(), subset, input_size, stats, workers,
                           balanced_subset, at_most)
    if name == "digits" and not arg:
        splits = _npz_splits(Path(__file__).with_name("digits.npz"), "digits")
    elif name == "npz" and arg:
        splits = _npz_folder(Path(arg).expanduser())
    elif name in _TORCHVISION and not arg:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        splits = _torchvision(name, root, download)
    elif folder:
        splits = _imagefolder(spec, Path(arg).expanduser(), subset, input_size, workers,
                              at_most)
        subset = None  # already applied before decoding
    else:
        raise MgrowError(f"unknown data set {spec!r}: expected one of {', '.join(SPECS)}")
    return _assemble(spec, *splits, subset=subset, no_flip=name == "svhn", at_most=at_most)


def _assemble(spec: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
              test_y: torch.Tensor, num_classes: int | None, subset: int | None,
              no_flip: bool, at_most: bool = False) -> MemoryData:
    """Return checked Data from (N, C, H, W) uint8 splits, cut to `subset` training images
    (mgrow.stream.subset_size).

    `num_classes` None: the largest label + 1.
    """
    _, c, h, w = train_x.shape
    if not len(train_y) or not len(test_y):
        raise MgrowError(f"{spec}: the training and test splits must both hold images")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if h != w:
        raise MgrowError(f"{spec}: images must be square, not {h}x{w}")
    if tuple(test_x.shape[1:]) != (c, h, w):
        raise MgrowError(f"{spec}: test images are {tuple(test_x.shape[1:])}, training "
                         f"images {(c, h, w)}")
    for split, y in (("training", train_y), ("test", test_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise MgrowError(f"{spec}: {split} labels must lie in 0..{num_classes - 1}")
    subset = subset_size(subset, len(train_y), spec, at_most)
    if subset is not None:
        keep = balanced_subset(train_y, subset)
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = channel_stats(train_x)
    info = DatasetSpec(spec=spec, num_classes=num_classes, channels=c, input_size=h,
                       mean=mean, std=std, train_size=len(train_y))
    return MemoryData(train_x, train_y, test_x, test_y, info, augment=c == 3 and not no_flip)


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Return the indices, in file order, of the first n images taken round-robin over classes.

    Example: labels [1, 1, 0, 1, 0], n = 3 -> [0, 2, 4] (class 0's first (2), class 1's
    first (0), class 0's second (4)).
    """
    rank = torch.empty_like(labels)  # how many earlier images share this image's class
    for c in labels.unique():
        where = (labels == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    key = rank * (int(labels.max()) + 1) + labels  # round-robin order: by rank, then by class
    return key.argsort()[:n].sort().values


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std (0-1 scale) of uint8 images (N, C, H, W)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):  # float64 copies of a chunk only: sums of integers are exact
        f = chunk.to(torch.float64)  # (n, C, H, W)
        total += f.sum((0, 2, 3))
        squares += (f * f).sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-8).tolist())


def _nchw(images: np.ndarray, labels: np.ndarray, where: object) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Return uint8 (N, C, H, W) and int64 (N,) tensors from (N, H, W[, C]) arrays."""
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
                raise MgrowError(f"{path}: no array {', '.join(missing)} (has "
                                 f"{', '.join(z.files) or 'none'})")
            return [z[k] for k in keys]
    except (OSError, ValueError) as e:  # zipfile.BadZipFile is an OSError
        raise MgrowError(f"{path}: not a readable .npz file ({e})") from None


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
    if not root.is_dir():
        raise MgrowError(f"npz:{root}: no such folder (expected train*.npz and test.npz in it)")
    files = sorted(root.glob("train*.npz"), key=_natural)
    if not files or not (root / "test.npz").is_file():
        raise MgrowError(f"npz:{root}: expected train*.npz and test.npz in the folder")
    train = [_nchw(*_read_npz(f, ("images", "labels")), f) for f in files]
    shapes = {tuple(x.shape[1:]) for x, _ in train}
    if len(shapes) > 1:
        raise MgrowError(f"npz:{root}: training files disagree on the image shape {shapes}")
    tx, ty = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    vx, vy = _nchw(*_read_npz(root / "test.npz", ("images", "labels")), root / "test.npz")
    return tx, ty, vx, vy, None


def _torchvision(name: str, root: Path, download: bool) -> tuple:
    """Return (train_x, train_y, test_x, test_y, None) of a torchvision data set."""
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION[name])
    out = []
    for train in (True, False):
        kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
        try:
            ds = cls(str(root), download=download, **kwargs)
        except (RuntimeError, OSError, ImportError) as e:
            why = f"download failed ({e})" if download else "not found"
            raise MgrowError(f"{name}: {why} in {root} (pass --download to fetch it, "
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
    from .stream import DEFAULT_SIZE, cut, decode, default_workers, eval_view, list_folder, scan
    classes, train, test = list_folder(root)
    train = cut(train, subset, spec, balanced_subset, at_most)
    size = input_size or DEFAULT_SIZE
    out = []
    for split, where in ((train, "training split"), (test, "test split")):
        scan(root, split, 2 * (default_workers() if workers is None else max(1, workers)),
             f"{spec}, {where}")
        x = torch.empty(len(split.files), 3, size, size, dtype=torch.uint8)
        for i in range(len(split.files)):
            x[i] = eval_view(decode(split.path(root, i)), size)
        out += [x, split.labels]
    return (*out, len(classes))


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Return the number of full global batches in one pass over the training split."""
    return len(data.train_y) // batch_size


def _generator(*key: int) -> torch.Generator:
    """Return a CPU generator seeded from a tuple of non-negative ints."""
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def batch_plan(n: int, train: bool, batch_size: int, epoch: int, seed: int, rank: int = 0,
               world: int = 1, start: int = 0) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield, per global batch from `start` on, (this rank's slice of the batch, the image
    indices (b,) int64 in that slice): the one order both kinds of data follow.

    Training: a permutation of the n images drawn from (seed, epoch), cut into full global
    batches (the last incomplete one dropped). Evaluation: file order, every image. Rank r
    of `world` gets the r-th contiguous slice of each global batch, and no batch where that
    slice is empty (the last evaluation batch, holding fewer images than ranks; a training
    batch, divided evenly by the engine, never is).
    """
    order = torch.randperm(n, generator=_generator(seed, 0, epoch)) if train else None
    count = n // batch_size if train else -(-n // batch_size)
    for b in range(start, count):
        lo = b * batch_size
        size = min(n, lo + batch_size) - lo
        r0, r1 = size * rank // world, size * (rank + 1) // world  # this rank's slice
        if r0 == r1:  # a loader cannot collate an empty batch
            continue
        idx = order[lo + r0:lo + r1] if train else torch.arange(lo + r0, lo + r1)
        yield slice(r0, r1), idx


def normalise(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Return uint8 images (b, C, H, W) as float32 normalised by the spec's mean and std."""
    mean, std = _scale(spec.mean, spec.std, x.device)
    return x.float().sub_(mean).div_(std)  # in place: the same float32 ops, one buffer


@functools.lru_cache(maxsize=16)
def _scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return mean and std (1, C, 1, 1) on the 0-255 scale on `device`, made once: a fresh
    torch.tensor(..., device=cuda) per batch is a blocking copy, a host sync every step."""
    def column(v: tuple[float, ...]) -> torch.Tensor:
        return (torch.tensor(v).view(1, -1, 1, 1) * 255).to(device)  # float32, as always
    return column(mean), column(std)


def crop_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Return images (B, C, H, W) zero-padded by PAD, cropped at shift (B, 2), mirrored if flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # (B, C, H + 2 PAD, W + 2 PAD)
    rows = shift[:, :1] + torch.arange(h)  # (B, H)
    cols = shift[:, 1:] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * PAD))
    return picked.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


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
            g = _generator(seed, 1, epoch, b)
            full = min(len(y), (b + 1) * batch_size) - b * batch_size
            shift = torch.randint(0, 2 * PAD + 1, (full, 2), generator=g)  # (B, 2) global
            flip = torch.randint(0, 2, (full,), generator=g).bool()  # (B,) global
            xb = crop_flip(xb, shift[part], flip[part])
        yb = y[idx]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield normalise(xb, data.spec), yb

