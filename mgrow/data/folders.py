"""Image folders on disk: listing, header checks, decoding.

Layout: ROOT/train/CLASS/*.jpg (.jpeg .png .webp) and ROOT/val or ROOT/test with the same
class folders; classes are the sorted train/ folders. File names are held as one numpy
bytes array per split (no Python object per file: workers forked from the main process
share it without copy-on-write growth), so memory does not grow with the data set beyond
a few bytes per image.

Bad images: every file's header is read when the folder is listed (threads, about a
millisecond a file): a file PIL cannot identify, one larger than MAX_PIXELS, and a JPEG,
PNG or WebP whose end is missing are refused before training starts, in one line naming
the file. Damage a header cannot show (corrupt data inside a complete file) stops the run
at the batch that decodes it, in one line naming the file.

Owns `Split`, `BadImage`, `list_folder`, `scan`, `decode`, `cut`. Imports mgrow.errors and
data.plan.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MgrowError
from .plan import balanced_subset, subset_size

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (about 9459 x 9459)
SCAN_CHUNK = 8192  # header checks in flight at once (scan)
DEFAULT_SIZE = 224


class BadImage(MgrowError):
    """An image file that cannot be used: unreadable, truncated or absurdly large."""


@dataclass
class Split:
    """One split of an image folder: file names relative to the root, and labels."""

    files: np.ndarray  # (N,) bytes, os.fsencode of the path relative to the folder root
    labels: torch.Tensor  # (N,) int64

    def path(self, root: Path, i: int) -> Path:
        return root / os.fsdecode(self.files[i])


def default_workers() -> int:
    """Return the loader processes to use by default: the CPUs this process may use, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def list_folder(root: Path) -> tuple[list[str], Split, Split]:
    """Return (classes, train split, test split) of an image folder; raise MgrowError if the
    layout is wrong."""
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise MgrowError(f"imagefolder:{root}: expected train/CLASS/*.jpg and val/ or test/ "
                         f"with the same class folders")
    classes = sorted(d.name for d in os.scandir(root / "train") if d.is_dir())
    unknown = sorted({d.name for d in os.scandir(test_dir) if d.is_dir()} - set(classes))
    if not classes or unknown:
        raise MgrowError(f"imagefolder:{root}: " + (f"{test_dir.name}/ has classes missing "
                         f"from train/: {', '.join(unknown[:4])}" if unknown
                         else "train/ has no class folders"))
    train = _listing(root, "train", classes)
    if not len(train.files):
        raise MgrowError(f"imagefolder:{root}: no {'/'.join(EXTENSIONS)} images in train/")
    return classes, train, _listing(root, test_dir.name, classes)


def _listing(root: Path, split: str, classes: list[str]) -> Split:
    """Return the images under root/split/CLASS/ (sorted by name within a class)."""
    names: list[bytes] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        folder = root / split / c
        if not folder.is_dir():
            continue
        found = sorted(e.name for e in os.scandir(folder)
                       if e.name.lower().endswith(EXTENSIONS) and e.is_file())
        names += [os.fsencode(f"{split}/{c}/{name}") for name in found]
        labels += [k] * len(found)
    return Split(np.array(names, dtype=bytes), torch.tensor(labels, dtype=torch.int64))


def _jpeg_complete(tail: bytes) -> bool:
    return b"\xff\xd9" in tail  # the end-of-image marker (never inside entropy-coded data)


def _png_complete(tail: bytes) -> bool:
    return b"IEND" in tail


def _webp_complete(tail: bytes, size: int, head: bytes) -> bool:
    return size >= int.from_bytes(head[4:8], "little") + 8  # RIFF: declared length


def image_problem(path: Path) -> str | None:
    """Return what is wrong with an image file's header or length, or None if it looks whole."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: checked below
            with Image.open(path) as im:
                (w, h), fmt = im.size, im.format
        if w * h > MAX_PIXELS:
            return f"absurdly large image ({w}x{h} = {w * h:,} pixels; the limit is " \
                   f"{MAX_PIXELS:,})"
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(max(0, size - 512))
            tail = f.read()
    except Image.DecompressionBombError as e:
        return f"absurdly large image ({e})"
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        return f"cannot read image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    complete = {"JPEG": lambda: _jpeg_complete(tail), "PNG": lambda: _png_complete(tail),
                "WEBP": lambda: _webp_complete(tail, size, head)}.get(fmt, lambda: True)
    if complete():
        return None
    try:  # no end marker at the end: truncated, or data appended after a whole image (a
        decode(path)  # phone's motion photo carries a video; padding): decoding tells which
    except BadImage:
        return f"truncated {fmt} file (its end is missing)"
    return None


def scan(root: Path, split: Split, workers: int, where: str) -> None:
    """Raise BadImage naming the first file (in listing order) whose header check fails.

    Checked SCAN_CHUNK files at a time: pool.map submits every task at once (measured 1.6
    KB a file, 2 GB for ImageNet's 1.28M), where the listing costs a few bytes a file."""
    with ThreadPoolExecutor(max(1, workers)) as pool:  # I/O bound: threads suffice
        for lo in range(0, len(split.files), SCAN_CHUNK):
            paths = [split.path(root, i) for i in range(lo, min(lo + SCAN_CHUNK,
                                                                len(split.files)))]
            for path, problem in zip(paths, pool.map(image_problem, paths, chunksize=64)):
                if problem is not None:
                    raise BadImage(f"{path}: {problem} ({where})")


def decode(path: Path):
    """Return the image as an RGB PIL image, or raise BadImage naming the file."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise BadImage(f"{path}: absurdly large image ({im.size[0]}x{im.size[1]})")
                return im.convert("RGB")  # loads every pixel: truncation shows here
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"{path}: cannot decode image ({why})") from None


def cut(split: Split, subset: int | None, spec: str, at_most: bool = False) -> Split:
    """Return `split` cut to its class-balanced first `subset` images (see subset_size)."""
    subset = subset_size(subset, len(split.files), spec, at_most)
    if subset is None:
        return split
    keep = balanced_subset(split.labels, subset)
    return Split(split.files[keep.numpy()], split.labels[keep])
