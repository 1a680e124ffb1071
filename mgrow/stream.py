"""Image folders streamed from disk: listed and header-checked up front, decoded batch by
batch in DataLoader worker processes with the ImageNet recipe's transforms.

Layout: ROOT/train/CLASS/*.jpg (.jpeg .png .webp) and ROOT/val or ROOT/test with the same
class folders; classes are the sorted train/ folders. File names are held as one numpy
bytes array per split (no Python object per file: workers forked from the main process
share it without copy-on-write growth), so memory does not grow with the data set beyond
a few bytes per image.

Transforms at input size S (torchvision.transforms.v2 functionals on PIL images):
- train: RandomResizedCrop(S) (scale 0.08-1, ratio 3/4-4/3, bilinear, antialiased) and a
  horizontal flip with probability 1/2;
- eval: Resize(round(S / 0.875)) of the shorter side, then CenterCrop(S).
Workers return uint8 batches, normalised after the copy to an accelerator; for the CPU the
workers normalise them (the same float32 operations, so the same bits).

Determinism: the epoch's order and each rank's slice of every global batch are those of
the in-memory path (mgrow.data.batch_plan); the crop and flip of training image i in
epoch e are drawn from a generator seeded by (seed, 2, e, i), so they depend neither on
the worker that decodes it, nor on the number of workers or ranks, nor on where a resumed
epoch starts: a resumed run sees exactly the images an uninterrupted one does.

Bad images: every file's header is read when the folder is listed (threads, about a
millisecond a file): a file PIL cannot identify, one larger than MAX_PIXELS, and a JPEG,
PNG or WebP whose end is missing are refused before training starts, in one line naming
the file. Damage a header cannot show (corrupt data inside a complete file) stops the run
at the batch that decodes it, in one line naming the file.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import signal
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import MgrowError
from .manifest import DatasetSpec

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # eval: resize the shorter side to S / 0.875, centre-crop S
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (about 9459 x 9459)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
STATS = ("imagenet", "sample")  # --stats: ImageNet's mean/std, or measured on a sample
STATS_SAMPLE = 1000  # --stats sample: images measured (evenly spaced over the training split)
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


# -- header scan: cheap checks of every file before training -----------------------------

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


# -- decoding and transforms ---------------------------------------------------------------

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


def crop_params(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """Return RandomResizedCrop's (top, left, height, width), drawn from `g` by torchvision's
    own rule: 10 tries at a random area share in SCALE and log-uniform aspect in RATIO, else
    the centre crop clamped to RATIO."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image, size: int, g: torch.Generator) -> torch.Tensor:
    """Return RandomResizedCrop(size) + random horizontal flip of a PIL image, uint8 (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF
    top, left, h, w = crop_params(image.height, image.width, g)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if torch.rand(1, generator=g).item() < 0.5:
        out = TF.horizontal_flip(out)
    return TF.pil_to_tensor(out)


def eval_view(image, size: int) -> torch.Tensor:
    """Return Resize(round(size / 0.875)) + CenterCrop(size) of a PIL image, uint8 (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF
    out = TF.resize(image, [round(size / CROP_FRACTION)], antialias=True)
    return TF.pil_to_tensor(TF.center_crop(out, [size, size]))


def sample_key(*key: int) -> torch.Generator:
    """Return a CPU generator seeded from a tuple of non-negative ints."""
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


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
            x = train_view(image, self.size, sample_key(self.seed, 2, self.epoch, i))
        else:
            x = eval_view(image, self.size)
        return x, int(self.split.labels[i])


# -- the streamed data set -------------------------------------------------------------------

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
        from .data import batch_plan, normalise
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
    from .data import normalise
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
    then shuts the workers down itself; a worker whose parent dies exits on its own."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


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
    from .data import channel_stats
    n = len(split.files)
    pick = np.unique(np.linspace(0, n - 1, min(n, STATS_SAMPLE)).round().astype(np.int64))
    sample = Split(split.files[pick], split.labels[torch.from_numpy(pick)])
    loader = torch.utils.data.DataLoader(Images(root, sample, size, False), batch_size=64,
                                         num_workers=workers, generator=torch.Generator())
    try:
        x = torch.cat([b for b, _ in loader])  # (n, 3, S, S) uint8
    except BadImage as e:
        raise BadImage(_own_message(e)) from None
    return channel_stats(x)


def subset_size(subset: int | None, n: int, spec: str, at_most: bool = False) -> int | None:
    """Return how many of `n` training images `subset` keeps (None: all of them); more than
    `n` is refused, or (`at_most`: a ceiling, not a demand) keeps all."""
    if subset is None or at_most and subset >= n:
        return None
    if subset > n:
        raise MgrowError(f"--subset {subset} exceeds the {n} training images of {spec}")
    return subset


def cut(split: Split, subset: int | None, spec: str,
        pick: Callable[[torch.Tensor, int], torch.Tensor], at_most: bool = False) -> Split:
    """Return `split` cut to the `subset` images `pick(labels, subset)` chooses (see
    subset_size)."""
    subset = subset_size(subset, len(split.files), spec, at_most)
    if subset is None:
        return split
    keep = pick(split.labels, subset)
    return Split(split.files[keep.numpy()], split.labels[keep])


def load_folder(spec: str, root: Path, subset: int | None, input_size: int | None,
                stats: str, workers: int | None,
                subset_fn: Callable[[torch.Tensor, int], torch.Tensor],
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
    train = cut(train, subset, spec, subset_fn, at_most)
    if not len(test.files):
        raise MgrowError(f"{spec}: the training and test splits must both hold images")
    for split, where in ((train, "training split"), (test, "test split")):
        scan(root, split, max(4, 2 * workers), f"{spec}, {where}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if stats == "imagenet" else \
        measure_stats(root, train, size, workers)
    info = DatasetSpec(spec=spec, num_classes=len(classes), channels=3, input_size=size,
                       mean=mean, std=std, train_size=len(train.files))
    return StreamData(root, train, test, info, workers)
