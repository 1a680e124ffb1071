"""Data sets held in memory as uint8 tensors, and deterministic batches drawn from them.

Specs (`--data`):
- `digits` (default): 1,797 real 8x8 grayscale handwritten digits shipped with mgrow
  (`digits.npz`: UCI ML hand-written digits via scikit-learn, CC BY 4.0), values scaled
  0..16 -> 0..255, split once with seed 0 into 1,437 train / 360 test.
- `npz:PATH`: a folder with `train*.npz` (read in natural name order, concatenated) and
  `test.npz`, each holding `images` uint8 (N, H, W, C) or (N, H, W) and `labels` (N,).
- `cifar10`, `cifar100`, `mnist`, `fashion-mnist`, `svhn`: torchvision's copies under the
  data folder (`--data-dir`, else $MGROW_DATA, else ~/.cache/mgrow/data).
- `imagefolder:PATH`: PATH/train/CLASS/*.jpg (.jpeg .png .webp) and PATH/val or
  PATH/test with the same class folders. Decoded as RGB with PIL; every image is resized
  (shorter side, antialiased) and centre-cropped to S x S, S = the first training image's
  shorter side, at most 224.

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

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import MgrowError
from .manifest import DatasetSpec

PAD = 4  # pixels of zero padding before the random crop
MAX_SIZE = 224  # imagefolder: images are resized to at most this side
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                "fashion-mnist": "FashionMNIST", "svhn": "SVHN"}
SPECS = ("digits", "npz:PATH", *_TORCHVISION, "imagefolder:PATH")


@dataclass
class Data:
    """A data set in memory: uint8 images, int64 labels, and what a bundle records of it."""

    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, C, H, W) uint8
    test_y: torch.Tensor  # (M,) int64
    spec: DatasetSpec
    augment: bool  # random crop (pad 4) + horizontal flip while training


def default_data_dir() -> Path:
    """Return the folder torchvision data sets live in: $MGROW_DATA or ~/.cache/mgrow/data."""
    return Path(os.environ.get("MGROW_DATA") or Path.home() / ".cache/mgrow/data")


def load_data(spec: str, data_dir: str | os.PathLike | None = None, download: bool = False,
              subset: int | None = None) -> Data:
    """Return the data set named by `spec`, its training split cut to `subset` images."""
    if subset is not None and subset < 1:
        raise MgrowError(f"--subset must be at least 1, not {subset}")
    name, _, arg = spec.partition(":")
    if name == "digits" and not arg:
        splits = _npz_splits(Path(__file__).with_name("digits.npz"), "digits")
    elif name == "npz" and arg:
        splits = _npz_folder(Path(arg).expanduser())
    elif name in _TORCHVISION and not arg:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        splits = _torchvision(name, root, download)
    elif name == "imagefolder" and arg:
        splits = _imagefolder(Path(arg).expanduser(), subset)
        subset = None  # already applied before decoding
    else:
        raise MgrowError(f"unknown data set {spec!r}: expected one of {', '.join(SPECS)}")
    return _assemble(spec, *splits, subset=subset, no_flip=name == "svhn")


def _assemble(spec: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
              test_y: torch.Tensor, num_classes: int | None, subset: int | None,
              no_flip: bool) -> Data:
    """Return checked Data from (N, C, H, W) uint8 splits, cut to `subset` training images.

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
    if subset is not None:
        if subset > len(train_y):
            raise MgrowError(f"--subset {subset} exceeds the {len(train_y)} training images "
                             f"of {spec}")
        keep = balanced_subset(train_y, subset)
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = channel_stats(train_x)
    info = DatasetSpec(spec=spec, num_classes=num_classes, channels=c, input_size=h,
                       mean=mean, std=std, train_size=len(train_y))
    return Data(train_x, train_y, test_x, test_y, info, augment=c == 3 and not no_flip)


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Return the indices, in file order, of the first n images taken round-robin over classes.

    Example: labels [1, 1, 0, 1, 0], n = 3 -> [0, 1, 2] (class 0's first, class 1's first,
    class 0's second).
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


def _imagefolder(root: Path, subset: int | None) -> tuple:
    """Return (train_x, train_y, test_x, test_y, num_classes) of an imagefolder: tree."""
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise MgrowError(f"imagefolder:{root}: expected train/CLASS/*.jpg and val/ or test/ "
                         f"with the same class folders")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    unknown = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if not classes or unknown:
        raise MgrowError(f"imagefolder:{root}: " + (f"{test_dir.name}/ has classes missing "
                         f"from train/: {', '.join(unknown[:4])}" if unknown
                         else "train/ has no class folders"))
    train = _listing(root / "train", classes)
    test = _listing(test_dir, classes)
    if not train[0]:
        raise MgrowError(f"imagefolder:{root}: no {'/'.join(EXTENSIONS)} images in train/")
    if subset is not None:
        if subset > len(train[0]):
            raise MgrowError(f"--subset {subset} exceeds the {len(train[0])} training images "
                             f"of imagefolder:{root}")
        keep = balanced_subset(train[1], subset).tolist()
        train = ([train[0][i] for i in keep], train[1][keep])
    size = min(MAX_SIZE, *_decode(train[0][0]).shape[1:])
    tx, vx = _decode_all(train[0], size), _decode_all(test[0], size)
    return tx, train[1], vx, test[1], len(classes)


def _listing(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Return the image files under folder/CLASS/ (sorted) and their labels (N,) int64."""
    files, labels = [], []
    for k, c in enumerate(classes):
        found = sorted(p for p in (folder / c).glob("*") if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [k] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64)


def _decode(path: Path) -> torch.Tensor:
    """Return one image as RGB uint8 (3, H, W), or raise MgrowError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise MgrowError(f"{path}: cannot decode image ({e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _decode_all(files: list[Path], size: int) -> torch.Tensor:
    """Return images (N, 3, size, size) uint8: shorter side resized to size, centre-cropped."""
    from torchvision.transforms.v2.functional import center_crop, resize

    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for n, path in enumerate(files):
        out[n] = center_crop(resize(_decode(path), [size], antialias=True), [size, size])
    return out


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Return the number of full global batches in one pass over the training split."""
    return len(data.train_y) // batch_size


def _generator(*key: int) -> torch.Generator:
    """Return a CPU generator seeded from a tuple of non-negative ints."""
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def crop_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Return images (B, C, H, W) zero-padded by PAD, cropped at shift (B, 2), mirrored if flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # (B, C, H + 2 PAD, W + 2 PAD)
    rows = shift[:, :1] + torch.arange(h)  # (B, H)
    cols = shift[:, 1:] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * PAD))
    return picked.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def batches(data: Data, train: bool, batch_size: int, epoch: int, seed: int, rank: int = 0,
            world: int = 1, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (b, C, H, W) float32 normalised, labels (b,) int64), this rank's slices.

    `batch_size` is the global batch; rank r of `world` gets the r-th contiguous slice of
    each. Training shuffles and drops the last incomplete batch; evaluation keeps file
    order and every image. `start` skips the first `start` global batches.
    """
    x, y = (data.train_x, data.train_y) if train else (data.test_x, data.test_y)
    n = len(y)
    order = torch.randperm(n, generator=_generator(seed, 0, epoch)) if train else None
    count = n // batch_size if train else -(-n // batch_size)
    mean = torch.tensor(data.spec.mean).view(1, -1, 1, 1) * 255  # (1, C, 1, 1), 0-255 scale
    std = torch.tensor(data.spec.std).view(1, -1, 1, 1) * 255
    for b in range(start, count):
        lo = b * batch_size
        size = min(n, lo + batch_size) - lo
        r0, r1 = size * rank // world, size * (rank + 1) // world  # this rank's slice
        idx = order[lo + r0:lo + r1] if train else slice(lo + r0, lo + r1)
        xb = x[idx]  # (b, C, H, W) uint8
        if train and data.augment:
            g = _generator(seed, 1, epoch, b)
            shift = torch.randint(0, 2 * PAD + 1, (size, 2), generator=g)  # (B, 2) global
            flip = torch.randint(0, 2, (size,), generator=g).bool()  # (B,) global
            xb = crop_flip(xb, shift[r0:r1], flip[r0:r1])
        yield (xb.float() - mean) / std, y[idx]
