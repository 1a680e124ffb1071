"""Image folders on disk: listing, header checks, decoding.

Layout: ROOT/train/CLASS/*.jpg and ROOT/val or ROOT/test with the same class folders;
classes are the sorted train/ folders. Read are the files PIL reads: torchvision's
IMG_EXTENSIONS and .gif, in any case (a multi-frame GIF or TIFF is its first frame; 16-bit
greys are scaled to 8 bits, not clipped). Refused, in one line naming the folder: a train/
class folder without images (as torchvision's ImageFolder does), and a single class (a
classifier needs two). A class with no images in val/ is kept: it keeps its train/ label
and evaluation has none of it. File names are held as one numpy bytes array per split (no
Python object per file: workers forked from the main process share it without
copy-on-write growth), so memory does not grow with the data set beyond a few bytes per
image.

Bad images: every file's header is read when the folder is listed (threads, about a
millisecond a file): a file PIL cannot identify, one larger than MAX_PIXELS, and a JPEG,
PNG or WebP whose end is missing are refused before training starts, in one line naming
the file. Damage a header cannot show (corrupt data inside a complete file) stops the run
at the batch that decodes it, in one line naming the file. A path that holds a character
that does not print (a newline) is shown quoted (`shown`), so the line stays one line.
PIL's warnings are silenced by the caller, around the whole work (`quiet`, in the calling
thread; the loader workers set it for their process): never inside the scan's threads,
where `warnings.catch_warnings` is not thread-safe.

Owns `Split`, `BadImage`, `list_folder`, `scan`, `decode`, `cut`, `shown`, `quiet`. Imports
mgrow.errors and data.plan.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import MgrowError
from .plan import balanced_subset, subset_size

# torchvision's IMG_EXTENSIONS and .gif: what PIL reads (matched in any case)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PIL_MODULES = r"PIL(\.|$)"  # warnings raised in these modules are PIL's
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


def shown(path: object) -> str:
    """Return a path (or a spec naming one) for a one-line message: as it is, or quoted
    (repr) when it holds a character that does not print, such as a newline."""
    text = str(path)
    return text if text.isprintable() else repr(text)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence PIL's warnings (a decompression-bomb size, odd TIFF tags, EXIF) within the
    block, restoring the filters after; yield nothing. Enter it in the calling thread only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=PIL_MODULES)
        yield


def default_workers() -> int:
    """Return the loader processes to use by default: the CPUs this process may use, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def list_folder(root: Path) -> tuple[list[str], Split, Split]:
    """Return (classes, train split, test split) of an image folder; raise MgrowError if the
    layout is wrong, a train/ class folder holds no images, or there is only one class."""
    where = shown(f"imagefolder:{root}")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise MgrowError(f"{where}: expected train/CLASS/*.jpg and val/ or test/ with the "
                         f"same class folders")
    classes = sorted(d.name for d in os.scandir(root / "train") if d.is_dir())
    unknown = sorted({d.name for d in os.scandir(test_dir) if d.is_dir()} - set(classes))
    if not classes or unknown:
        raise MgrowError(f"{where}: " + (f"{test_dir.name}/ has classes missing from train/: "
                         f"{shown(', '.join(unknown[:4]))}" if unknown
                         else "train/ has no class folders"))
    if len(classes) == 1:
        raise MgrowError(f"{where}: train/ holds one class folder ({shown(classes[0])}); a "
                         f"classifier needs at least 2")
    train = _listing(root, "train", classes)
    counts = np.bincount(train.labels.numpy(), minlength=len(classes))
    if not counts.all():  # refused as by torchvision's ImageFolder (val/ may lack a class)
        empty = classes[int(np.argmin(counts))]
        raise MgrowError(f"{where}: class folder {shown(f'train/{empty}')} holds no images "
                         f"({' '.join(EXTENSIONS)})")
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
    """Return what is wrong with an image file's header or length, or None if it looks whole.

    Run in scan's threads: it leaves the warnings filters alone (scan silences PIL's)."""
    from PIL import Image
    try:
        with Image.open(path) as im:  # the first frame of a GIF or TIFF
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
    KB a file, 2 GB for ImageNet's 1.28M), where the listing costs a few bytes a file.
    PIL's warnings (an image over MAX_PIXELS, refused anyway) are silenced here, in the
    calling thread, around the whole pool: the filters are the same before and after."""
    with quiet(), ThreadPoolExecutor(max(1, workers)) as pool:  # I/O bound: threads suffice
        for lo in range(0, len(split.files), SCAN_CHUNK):
            paths = [split.path(root, i) for i in range(lo, min(lo + SCAN_CHUNK,
                                                                len(split.files)))]
            for path, problem in zip(paths, pool.map(image_problem, paths, chunksize=64)):
                if problem is not None:
                    raise BadImage(f"{shown(path)}: {problem} ({shown(where)})")


def decode(path: Path):
    """Return the image (a GIF's or TIFF's first frame) as an 8-bit RGB PIL image, or raise
    BadImage naming the file. Safe in any thread: PIL's warnings are the caller's to silence."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise BadImage(f"{shown(path)}: absurdly large image "
                               f"({im.size[0]}x{im.size[1]})")
            if im.mode.startswith("I"):  # 16/32-bit integer grey: convert() clips at 255
                return _eight_bit(np.asarray(im), im.mode).convert("RGB")
            return im.convert("RGB")  # loads every pixel: truncation shows here
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImage(f"{shown(path)}: cannot decode image ({shown(why)})") from None


def _eight_bit(x: np.ndarray, mode: str):
    """Return an integer grey image (modes I;16*, I) as an 8-bit PIL image: 16-bit values
    / 257, rounded (0..65535 -> 0..255); mode I is taken as 16-bit when a value is over 255,
    else read as it is."""
    from PIL import Image
    x = x.astype(np.int64)
    if mode != "I" or x.max() > 255:
        x = (np.clip(x, 0, 65535) + 128) // 257
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def cut(split: Split, subset: int | None, spec: str, at_most: bool = False) -> Split:
    """Return `split` cut to its class-balanced first `subset` images (see subset_size)."""
    subset = subset_size(subset, len(split.files), spec, at_most)
    if subset is None:
        return split
    keep = balanced_subset(split.labels, subset)
    return Split(split.files[keep.numpy()], split.labels[keep])
