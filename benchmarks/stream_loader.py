"""Streamed image folders: memory that does not grow with the data set, and loader speed
against torchvision's own ImageFolder + DataLoader.

    python benchmarks/stream_loader.py                 # ~5 minutes on 2 cores
    python benchmarks/stream_loader.py --images 20000 --small 2000 --workers 2 --size 224

The folder (written once, then reused): CIFAR-10 training images upscaled to random sizes
(shorter side --min-side..--max-side, aspect 1:2 to 2:1) and saved as JPEG
(examples/image_folder.py), --images of them.

(a) Peak resident memory of one training epoch streamed (mgrow.data.batches, --workers
    loader processes, RandomResizedCrop(--size) + flip, normalised float batches) over the
    first --small images (class-balanced --subset) against all --images, each in a fresh
    subprocess: the main process's peak and the largest worker's, and their ratios
    (target: <= 1.1, memory must not grow with the data set).
(b) Images/s of one pass over the same --small training images: mgrow's streamed loader
    against `torchvision.datasets.ImageFolder` + `DataLoader` (shuffle, the same workers,
    batch and transforms: RandomResizedCrop + RandomHorizontalFlip + ToImage + ToDtype +
    Normalize), after one untimed pass of each, passes alternating, medians of --rounds
    (target: ratio >= 0.95). Both normalise in the workers (mgrow does so for the CPU; for
    a GPU it copies uint8 batches and normalises there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_folder(a: argparse.Namespace) -> Path:
    """Write (or complete) the benchmark's image folder and return it."""
    spec = importlib.util.spec_from_file_location("image_folder",
                                                  ROOT / "examples/image_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t0 = time.perf_counter()
    mod.make_image_folder(a.folder, a.images, 100, a.min_side, a.max_side)
    print(f"folder {a.folder}: {a.images} training JPEGs ({time.perf_counter() - t0:.0f} s "
          f"to write or check)", flush=True)
    return a.folder


def child_rss(a: argparse.Namespace, n: int) -> None:
    """(In a fresh process) stream one epoch over n images; print the peaks as JSON."""
    from mgrow.data import batches, load_data
    data = load_data(f"imagefolder:{a.folder}", subset=n, input_size=a.size,
                     workers=a.workers)
    seen, t0 = 0, time.perf_counter()
    for x, y in batches(data, True, a.batch, 0, 0):
        seen += len(y)
    print(json.dumps({"images": seen, "s": time.perf_counter() - t0,
                      "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def rss(a: argparse.Namespace) -> None:
    """(a) Print the peak resident memory of an epoch over --small vs --images images."""
    print(f"(a) peak RSS of one streamed epoch, {a.workers} workers, input {a.size}, batch "
          f"{a.batch}, each in a fresh process", flush=True)
    runs = {}
    for n in (a.small, a.images):
        out = subprocess.run([sys.executable, __file__, "--child-rss", str(n), "--folder",
                              str(a.folder), "--size", str(a.size), "--workers",
                              str(a.workers), "--batch", str(a.batch)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs[n]
        print(f"    {n:6d} images: main {r['main_kib'] / 1024:7.1f} MiB, largest worker "
              f"{r['worker_kib'] / 1024:7.1f} MiB ({r['images']} images in {r['s']:.1f} s)",
              flush=True)
    big, small = runs[a.images], runs[a.small]
    print(f"    ratio {a.images} / {a.small} images: main "
          f"{big['main_kib'] / small['main_kib']:.3f}, worker "
          f"{big['worker_kib'] / small['worker_kib']:.3f} (target <= 1.1)")


def throughput(a: argparse.Namespace) -> None:
    """(b) Print images/s of mgrow's loader and the ImageFolder baseline, and their ratio."""
    from torchvision import datasets
    from torchvision.transforms import v2

    from mgrow.data import balanced_subset, batches, load_data
    from mgrow.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    data = load_data(f"imagefolder:{a.folder}", subset=a.small, input_size=a.size,
                     workers=a.workers)
    recipe = v2.Compose([v2.RandomResizedCrop(a.size, antialias=True),
                         v2.RandomHorizontalFlip(), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folder = datasets.ImageFolder(str(a.folder / "train"), transform=recipe)
    keep = balanced_subset(torch.tensor(folder.targets), a.small).tolist()
    plain = torch.utils.data.DataLoader(torch.utils.data.Subset(folder, keep),
                                        batch_size=a.batch, shuffle=True, drop_last=True,
                                        num_workers=a.workers)
    assert [folder.samples[i][0] for i in keep] == [str(data.train.path(data.root, i))
                                                    for i in range(len(keep))]

    def ours(epoch: int) -> int:
        return sum(len(y) for _, y in batches(data, True, a.batch, epoch, 0))

    def theirs(epoch: int) -> int:
        return sum(len(y) for _, y in plain)

    print(f"(b) one pass over {a.small} training images, {a.workers} workers, batch "
          f"{a.batch}, RandomResizedCrop({a.size}) + flip, normalised float32 batches",
          flush=True)
    ours(0), theirs(0)  # untimed: workers' first imports, the page cache
    speed: dict[str, list[float]] = {"mgrow": [], "ImageFolder": []}
    for r in range(a.rounds):
        for name, run in (("mgrow", ours), ("ImageFolder", theirs)):
            t0 = time.perf_counter()
            n = run(r)
            speed[name].append(n / (time.perf_counter() - t0))
    for name, s in speed.items():
        print(f"    {name:11s} median {statistics.median(s):7.1f} images/s "
              f"({', '.join(f'{v:.0f}' for v in s)})")
    ratio = statistics.median(speed["mgrow"]) / statistics.median(speed["ImageFolder"])
    print(f"    images/s mgrow / ImageFolder: {ratio:.3f} (target >= 0.95)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/mgrow-stream-bench"))
    p.add_argument("--images", type=int, default=20000, help="images of the large epoch")
    p.add_argument("--small", type=int, default=2000, help="images of the small epoch and "
                   "of the throughput passes")
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--size", type=int, default=224, help="input size S")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_rss:
        return child_rss(a, a.child_rss)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    make_folder(a)
    rss(a)
    throughput(a)


if __name__ == "__main__":
    main()
