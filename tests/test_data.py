"""mgrow.data: loading real data sets into memory and drawing deterministic batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgrow import MgrowError
from mgrow.data import (PAD, balanced_subset, batches, crop_flip, load_data,
                        steps_per_epoch)

CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
CIFAR_SPEC = f"npz:{CIFAR}"
needs_cifar = pytest.mark.skipif(not (CIFAR / "test.npz").exists(),
                                 reason=f"no CIFAR-10 copy at {CIFAR}")


@pytest.fixture(scope="module")
def cifar():
    return load_data(CIFAR_SPEC)


@pytest.fixture(scope="module")
def small():
    return load_data(CIFAR_SPEC, subset=512)


@needs_cifar
def test_cifar_npz_loads_whole(cifar):
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.train_x.dtype == torch.uint8
    assert cifar.test_x.shape == (10000, 3, 32, 32) and cifar.test_x.dtype == torch.uint8
    assert cifar.train_y.dtype == torch.int64 and cifar.test_y.dtype == torch.int64
    assert torch.bincount(cifar.test_y).tolist() == [1000] * 10
    s = cifar.spec
    assert (s.spec, s.num_classes, s.channels, s.input_size, s.train_size) == \
        (CIFAR_SPEC, 10, 3, 32, 50000)
    assert np.allclose(s.mean, (0.4914, 0.4822, 0.4465), atol=0.005)  # README's values
    assert np.allclose(s.std, (0.2470, 0.2435, 0.2616), atol=0.005)
    assert cifar.augment
    # first training file, first image, unchanged apart from HWC -> CHW
    with np.load(CIFAR / "train_1.npz") as z:
        assert torch.equal(cifar.train_x[0], torch.from_numpy(z["images"][0]).permute(2, 0, 1))
        assert cifar.train_y[0] == int(z["labels"][0])


@needs_cifar
def test_subset_is_class_balanced_first_images_in_file_order(cifar, small):
    assert small.spec.train_size == 512 and small.train_x.shape == (512, 3, 32, 32)
    assert torch.bincount(small.train_y).tolist() == [52, 52] + [51] * 8  # round-robin from 0
    keep = balanced_subset(cifar.train_y, 512)
    assert torch.equal(keep, keep.sort().values)
    for c in range(10):
        first = (cifar.train_y == c).nonzero().squeeze(1)[:52 if c < 2 else 51]
        assert torch.equal(keep[cifar.train_y[keep] == c], first)
    assert torch.equal(small.train_x, cifar.train_x[keep])  # same images as a second load
    assert torch.equal(small.test_x, cifar.test_x)  # the test split is never cut
    assert small.spec.mean != cifar.spec.mean  # statistics of the subset actually used


def test_balanced_subset_round_robin():
    labels = torch.tensor([1, 1, 0, 1, 0, 2])
    assert balanced_subset(labels, 3).tolist() == [0, 2, 5]  # first of classes 0, 1, 2
    assert balanced_subset(labels, 5).tolist() == [0, 1, 2, 4, 5]
    assert balanced_subset(labels, 6).tolist() == list(range(6))


def test_digits_builtin():
    d = load_data("digits")
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.spec.num_classes == 10 and d.spec.channels == 1 and d.spec.input_size == 8
    assert d.spec.train_size == 1437 and not d.augment
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    assert torch.bincount(d.train_y).min() >= 120  # shuffled split: every digit present
    x, _ = next(batches(d, True, 1437, 0, 0))  # the whole training split in one batch
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4


def test_digits_subset():
    d = load_data("digits", subset=25)
    assert d.spec.train_size == 25 and torch.bincount(d.train_y).tolist() == [3] * 5 + [2] * 5


@needs_cifar
def test_batches_deterministic_per_seed_and_epoch(small):
    a = list(batches(small, True, 100, epoch=0, seed=0))
    b = list(batches(small, True, 100, epoch=0, seed=0))
    assert len(a) == 5 == steps_per_epoch(small, 100)  # 512 // 100: the last 12 are dropped
    assert all(x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 for x, _ in a)
    assert all(y.dtype == torch.int64 for _, y in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    other_seed = next(batches(small, True, 100, epoch=0, seed=1))
    other_epoch = next(batches(small, True, 100, epoch=1, seed=0))
    assert not torch.equal(a[0][1], other_seed[1])
    assert not torch.equal(a[0][1], other_epoch[1])
    # the same order without augmentation: augmentation changes the images, not the labels
    plain = dataclasses.replace(small, augment=False)
    xp, yp = next(batches(plain, True, 100, epoch=0, seed=0))
    assert torch.equal(yp, a[0][1]) and not torch.equal(xp, a[0][0])
    # one batch of the whole set: a permutation of every image, normalised
    xw, yw = next(batches(plain, True, 512, epoch=0, seed=0))
    assert torch.equal(yw.sort().values, small.train_y.sort().values)
    mean = torch.tensor(small.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(small.spec.std).view(1, 3, 1, 1)
    want = ((small.train_x / 255 - mean) / std).sum((1, 2, 3)).sort().values
    assert torch.allclose(xw.sum((1, 2, 3)).sort().values, want, atol=1e-2)


@needs_cifar
@pytest.mark.parametrize("train", [True, False])
def test_rank_slices_concatenate_to_the_global_batch(small, train):
    small = dataclasses.replace(small, test_x=small.test_x[:1000], test_y=small.test_y[:1000])
    one = list(batches(small, train, 64, epoch=3, seed=7))
    ranks = [list(batches(small, train, 64, epoch=3, seed=7, rank=r, world=2)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1])
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert len(x0) == len(x) // 2
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


@needs_cifar
def test_eval_keeps_order_and_last_partial_batch(small):
    out = list(batches(small, False, 3000, epoch=0, seed=0))
    assert [len(y) for _, y in out] == [3000, 3000, 3000, 1000]
    assert torch.equal(torch.cat([y for _, y in out]), small.test_y)
    assert list(batches(small, False, 3000, epoch=5, seed=9))[0][0].equal(out[0][0])


@needs_cifar
def test_start_skips_exactly(small):
    whole = list(batches(small, True, 64, epoch=2, seed=3))
    rest = list(batches(small, True, 64, epoch=2, seed=3, start=5))
    assert len(rest) == len(whole) - 5 == 3
    for (x, y), (xs, ys) in zip(whole[5:], rest):
        assert torch.equal(x, xs) and torch.equal(y, ys)


def test_crop_flip_geometry():
    x = torch.randint(1, 256, (3, 2, 6, 6), dtype=torch.uint8)
    centre = torch.full((3, 2), PAD)
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, no), x)
    assert torch.equal(crop_flip(x, centre, yes), x.flip(3))
    corner = crop_flip(x, torch.zeros(3, 2, dtype=torch.long), no)  # top-left: padding shows
    assert (corner[:, :, :PAD] == 0).all() and (corner[:, :, :, :PAD] == 0).all()
    assert torch.equal(corner[:, :, PAD:, PAD:], x[:, :, :-PAD, :-PAD])
    mixed = crop_flip(x, torch.tensor([[PAD, PAD], [PAD + 1, PAD], [PAD, PAD]]),
                      torch.tensor([False, False, True]))
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[2], x[2].flip(2))
    assert torch.equal(mixed[1, :, :-1], x[1, :, 1:])  # shifted one row down in the source


def test_missing_torchvision_files_name_the_folder(tmp_path, monkeypatch):
    with pytest.raises(MgrowError, match="--download") as e:
        load_data("cifar10", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "npz:" in str(e.value)
    monkeypatch.setenv("MGROW_DATA", str(tmp_path / "env"))
    with pytest.raises(MgrowError, match=str(tmp_path / "env")):
        load_data("mnist")


def test_bad_specs_and_folders(tmp_path):
    with pytest.raises(MgrowError, match="unknown data set 'imagenet'"):
        load_data("imagenet")
    with pytest.raises(MgrowError, match="no such folder"):
        load_data(f"npz:{tmp_path / 'missing'}")
    with pytest.raises(MgrowError, match="train\\*.npz and test.npz"):
        load_data(f"npz:{tmp_path}")
    with pytest.raises(MgrowError, match="--subset 2000 exceeds the 1437"):
        load_data("digits", subset=2000)
    with pytest.raises(MgrowError, match="at least 1"):
        load_data("digits", subset=0)


def _npz(folder: Path, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, images=images, labels=labels)


def test_npz_folder_grayscale_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    pixels = lambda *shape: rng.integers(0, 256, shape, np.uint8)  # noqa: E731
    _npz(tmp_path, "train_2.npz", pixels(4, 12, 12), np.array([0, 1, 2, 3]))
    _npz(tmp_path, "train_10.npz", pixels(3, 12, 12), np.array([4, 4, 4]))
    _npz(tmp_path, "test.npz", pixels(2, 12, 12), np.array([0, 4]))
    d = load_data(f"npz:{tmp_path}")
    assert d.train_y.tolist() == [0, 1, 2, 3, 4, 4, 4]  # train_2 before train_10
    assert d.spec.num_classes == 5 and d.spec.channels == 1 and not d.augment
    _npz(tmp_path, "test.npz", pixels(2, 10, 10), np.array([0, 4]))
    with pytest.raises(MgrowError, match="test images are"):
        load_data(f"npz:{tmp_path}")
    _npz(tmp_path, "test.npz", pixels(0, 12, 12), np.zeros(0, np.uint8))
    with pytest.raises(MgrowError, match="must both hold images"):
        load_data(f"npz:{tmp_path}")
    _npz(tmp_path, "test.npz", rng.random((2, 12, 12)), np.array([0, 4]))
    with pytest.raises(MgrowError, match="must be uint8"):
        load_data(f"npz:{tmp_path}")


def test_imagefolder_in_memory_at_the_input_size(tmp_path):
    rng = torch.Generator().manual_seed(0)
    sizes = {"train/cat": [(12, 10), (20, 30)], "train/dog": [(16, 16)],
             "val/cat": [(9, 9)], "val/dog": [(40, 40)]}
    for folder, shapes in sizes.items():
        (tmp_path / folder).mkdir(parents=True)
        for n, (h, w) in enumerate(shapes):
            c = 1 if folder == "train/dog" else 3  # grayscale files are read as RGB
            pixels = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=rng)
            Image.fromarray(pixels.squeeze(2).numpy()).save(tmp_path / folder / f"{n}.png")
    d = load_data(f"imagefolder:{tmp_path}", mode="memory", input_size=10)
    assert d.train_x.shape == (3, 3, 10, 10) and d.test_x.shape == (2, 3, 10, 10)
    assert d.train_y.tolist() == [0, 0, 1] and d.test_y.tolist() == [0, 1]
    assert d.spec.num_classes == 2 and d.augment
    assert load_data(f"imagefolder:{tmp_path}", subset=2, mode="memory",
                     input_size=10).train_y.tolist() == [0, 1]
    assert load_data(f"imagefolder:{tmp_path}", subset=2).train_y.tolist() == [0, 1]
    (tmp_path / "val/bird").mkdir()
    with pytest.raises(MgrowError, match="classes missing from train/: bird"):
        load_data(f"imagefolder:{tmp_path}")
