"""Write an image folder of real photographs for trying, testing and benchmarking the
streamed data path: CIFAR-10 images upscaled (bicubic) to random sizes and aspect ratios,
saved as JPEG in the imagefolder layout (train/CLASS/*.jpg, val/CLASS/*.jpg).

    python examples/image_folder.py OUT --train 2000 --val 500 --min-side 64 --max-side 400

Training images are CIFAR-10's training images in file order, class-balanced (the first
N/10 of each class); validation images come from CIFAR-10's test split. Each image gets
its own size: the shorter side uniform in [min_side, max_side], the aspect ratio
log-uniform in [1/2, 2] (landscape or portrait), drawn from --seed. Existing files are kept
(a folder is only ever completed), so a second call with the same arguments writes nothing.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def _pick(labels: np.ndarray, n: int) -> np.ndarray:
    """Return the indices of the first n images, class-balanced (round-robin by class)."""
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.sort(np.argsort(rank * 10 + labels, kind="stable")[:n])


def _split(files: list[Path], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return n class-balanced (images (n, 32, 32, 3) uint8, labels) from CIFAR npz files."""
    images, labels = [], []
    for f in files:
        with np.load(f) as z:
            images.append(z["images"])
            labels.append(z["labels"].astype(np.int64))
        if sum(len(x) for x in labels) >= 10 * math.ceil(n / 10) * 2:
            break  # enough for a balanced pick
    x, y = np.concatenate(images), np.concatenate(labels)
    keep = _pick(y, n)
    return x[keep], y[keep]


def make_image_folder(out: Path, train: int, val: int, min_side: int = 48,
                      max_side: int = 160, seed: int = 0, quality: int = 90,
                      cifar: Path = CIFAR) -> Path:
    """Write (or complete) the folder and return it."""
    rng = np.random.default_rng(seed)
    train_files = sorted(cifar.glob("train_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    for split, files, n in (("train", train_files, train), ("val", [cifar / "test.npz"], val)):
        images, labels = _split(files, n)
        short = rng.integers(min_side, max_side + 1, len(images))
        aspect = np.exp(rng.uniform(math.log(0.5), math.log(2.0), len(images)))
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = out / split / CLASSES[label]
            path = folder / f"{i:06d}.jpg"
            if path.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            a = aspect[i]
            w, h = (round(short[i] * a), short[i]) if a >= 1 else (short[i], round(short[i] / a))
            big = Image.fromarray(img).resize((int(w), int(h)), Image.BICUBIC)
            tmp = path.with_suffix(".tmp")
            big.save(tmp, "JPEG", quality=quality)
            tmp.rename(path)  # a folder interrupted half-way never holds a half-written file
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=2000, help="training images (class-balanced)")
    p.add_argument("--val", type=int, default=500, help="validation images")
    p.add_argument("--min-side", type=int, default=48)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_image_folder(a.out, a.train, a.val, a.min_side, a.max_side, a.seed)
    print(f"wrote {a.out} ({a.train} training, {a.val} validation images)")


if __name__ == "__main__":
    main()
