"""Image folders (issue 25, class 4): what is read and what is refused, as torchvision's
ImageFolder does or better, and said in one line.

Every image here is a real file written by PIL, most of them real CIFAR-10 photographs
(the `image_folder` fixture: JPEGs of random sizes and aspect ratios).
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgrow.data import load_data
from mgrow.data.folders import decode, list_folder, scan
from mgrow.errors import MgrowError

from conftest import CIFAR, run_main

SIZE = 16  # input side: tiny, so every test takes seconds
pytestmark = pytest.mark.skipif(not (CIFAR / "test.npz").exists(),
                                reason=f"no CIFAR-10 copy at {CIFAR}")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Return 40 real CIFAR-10 test images, (40, 32, 32, 3) uint8."""
    with np.load(CIFAR / "test.npz") as f:
        return f["images"][::250][:40]


def _copy(image_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "photos"
    shutil.copytree(image_folder, out)
    return out


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _corrupt_inside(path: Path) -> None:
    """Write a PNG whose header and end are whole but whose pixel data is garbage: it passes
    the header scan and fails when decoded (at the first batch that holds it)."""
    header = struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", b"\x78\x9c" + os.urandom(300))
                     + _png_chunk(b"IEND", b""))


def _train(folder: Path, out: Path, *extra: str):
    return run_main("train", "--arch", "resnet18", "--width", "0.125", "--data",
                    f"imagefolder:{folder}", "--input-size", SIZE, "--workers", "1",
                    "--epochs", "1", "--batch-size", "120", "-q", "-o", out, *extra)


def _one_line_error(r) -> str:
    """Return the one line of a failed run's stderr (asserting there is exactly one)."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


# -- 1. what PIL reads is read ----------------------------------------------------------------

def test_bmp_gif_tiff_ppm_classes_are_read_first_frame_of_many(tmp_path, photos):
    """A class of .bmp files, one of .GIF (upper case), one of .tif/.TIFF/.ppm/.pgm: each
    holds its images (they used to be empty classes, silently); a multi-frame GIF or TIFF
    is its first frame."""
    root = tmp_path / "formats"
    files = {"bmp": ["a.bmp", "b.BMP"], "gif": ["a.GIF", "b.gif"],
             "tif": ["a.tif", "b.TIFF", "c.ppm", "d.pgm"], "webp": ["a.webp"]}
    for split in ("train", "val"):
        for c, names in files.items():
            (root / split / c).mkdir(parents=True)
            for k, name in enumerate(names):
                image = Image.fromarray(photos[len(name) + 3 * k])
                if name.endswith(".pgm"):
                    image = image.convert("L")
                image.save(root / split / c / name)
    first, second = Image.fromarray(photos[0]), Image.fromarray(255 - photos[0])
    for where in ("gif/b.gif", "tif/b.TIFF"):  # two frames: the photograph, its negative
        first.save(root / "train" / where, save_all=True, append_images=[second])
    with Image.open(root / "train/tif/b.TIFF") as im:
        assert im.n_frames == 2
    with Image.open(root / "train/gif/b.gif") as im:
        assert im.n_frames == 2

    classes, train, test = list_folder(root)
    assert classes == ["bmp", "gif", "tif", "webp"]
    assert np.bincount(train.labels.numpy()).tolist() == [2, 2, 4, 1]
    assert np.bincount(test.labels.numpy()).tolist() == [2, 2, 4, 1]
    tiff = np.asarray(decode(root / "train/tif/b.TIFF"))
    assert np.array_equal(tiff, photos[0])  # lossless: exactly the first frame
    gif = np.asarray(decode(root / "train/gif/b.gif")).astype(int)
    assert np.abs(gif - photos[0]).mean() < 8  # the first frame (256 colours), not the
    assert np.abs(gif - (255 - photos[0])).mean() > 40  # negative
    for mode in ("stream", "memory"):
        data = load_data(f"imagefolder:{root}", mode=mode, input_size=SIZE, workers=0)
        assert data.spec.num_classes == 4 and data.spec.train_size == 9
        assert len(data.test_y) == 9


# -- 2. and 3. classes a classifier cannot train on -----------------------------------------

def test_empty_class_folder_is_refused_naming_it(image_folder, tmp_path):
    """A train/ class folder with no image in it (only a text file) stops the command in one
    line naming the folder, as torchvision's ImageFolder refuses it; in both data modes."""
    root = _copy(image_folder, tmp_path)
    (root / "train" / "yak").mkdir()
    (root / "train" / "yak" / "notes.txt").write_text("no images here\n")
    for mode in ("stream", "memory"):
        with pytest.raises(MgrowError, match=r"class folder train/yak holds no images "
                                             r"\(\.jpg .*\.gif\)"):
            load_data(f"imagefolder:{root}", mode=mode, input_size=SIZE)
    line = _one_line_error(_train(root, tmp_path / "a.safetensors"))
    assert line.startswith(f"mgrow: error: imagefolder:{root}: class folder train/yak "
                           f"holds no images (")


def test_class_without_validation_images_is_kept(image_folder, tmp_path):
    """A class with training images but none in val/ (no folder, or an empty one) is kept:
    its label stays that of train/, and evaluation has no image of it."""
    root = _copy(image_folder, tmp_path)
    shutil.rmtree(root / "val" / "cat")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    classes, train, test = list_folder(root)
    assert len(classes) == 10 and sorted(set(train.labels.tolist())) == list(range(10))
    cat, dog = classes.index("cat"), classes.index("dog")
    assert set(test.labels.tolist()) == set(range(10)) - {cat, dog}
    assert len(test.files) == 40 - 8  # 4 validation images per class


def test_one_class_folder_is_refused(image_folder, tmp_path):
    """One class trains to loss 0 and learns nothing: refused in one line naming the folder."""
    root = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "cat", root / split / "cat")
    with pytest.raises(MgrowError, match="train/ holds one class folder \\(cat\\); a "
                                         "classifier needs at least 2"):
        load_data(f"imagefolder:{root}", mode="memory", input_size=SIZE)
    out = tmp_path / "a.safetensors"
    line = _one_line_error(_train(root, out))
    assert line.startswith(f"mgrow: error: imagefolder:{root}: train/ holds one class folder")
    assert not out.exists()


# -- 4. 16-bit images --------------------------------------------------------------------------

def test_16_bit_png_is_scaled_not_clipped(tmp_path, photos):
    """A 16-bit grayscale PNG (values 0..65535) is scaled to 8 bits (v / 257, rounded), not
    clipped to white by convert("RGB"); a real photograph stored as 16 bits (v * 257)
    decodes to exactly its 8-bit self."""
    span = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    grey = np.asarray(Image.fromarray(photos[7]).convert("L"))  # (32, 32) uint8, a photograph
    for name, values in (("span.png", span), ("photo.png", grey.astype(np.uint16) * 257)):
        Image.fromarray(values).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:  # really 16 bits on disk
            assert im.mode in ("I;16", "I;16B", "I") and np.asarray(im).max() > 255
        x = np.asarray(decode(tmp_path / name))
        assert x.dtype == np.uint8 and x.shape == (*values.shape, 3)
        want = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
        for c in range(3):
            assert np.array_equal(x[..., c], want)
    assert np.array_equal(np.asarray(decode(tmp_path / "photo.png"))[..., 0], grey)
    assert (np.asarray(decode(tmp_path / "span.png")) < 255).mean() > 0.99


def test_32_bit_integer_tiff_follows_the_same_rule(tmp_path, photos):
    """Mode I (32-bit integers): values above 255 are taken as 16-bit (/ 257, rounded);
    an image whose values all lie in 0..255 is read as they are."""
    grey = np.asarray(Image.fromarray(photos[3]).convert("L")).astype(np.int32)
    for name, values, want in (("wide.tif", grey * 257, grey), ("narrow.tif", grey, grey)):
        Image.fromarray(values).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "I"
        assert np.array_equal(np.asarray(decode(tmp_path / name))[..., 1], want)


# -- 5. a control character in a name ----------------------------------------------------------

@pytest.mark.parametrize("how", ["unreadable", "corrupt inside"])
def test_newline_in_a_file_name_keeps_the_error_one_line(image_folder, tmp_path, how):
    """A bad image named "bad\\nname.png": found by the header scan (unreadable) or by a
    loader worker decoding it (corrupt inside), the error is one line, the name quoted."""
    root = _copy(image_folder, tmp_path)
    victim = root / "train" / "cat" / "bad\nname.png"
    if how == "unreadable":
        victim.write_bytes(b"this is not an image\n" * 20)
    else:
        _corrupt_inside(victim)
    line = _one_line_error(_train(root, tmp_path / "a.safetensors"))
    assert repr(str(victim)) in line, line
    assert ("cannot read image" if how == "unreadable" else "cannot decode image") in line


# -- 6. a failed run leaves no metrics files ---------------------------------------------------

def test_failed_run_leaves_no_metrics_files(image_folder, tmp_path):
    """A run that fails at its first batch (a training image corrupt inside) leaves neither
    OUT.metrics.jsonl nor OUT.summary.csv, and removes a previous run's stale ones."""
    root = _copy(image_folder, tmp_path)
    victim = sorted((root / "train" / "dog").iterdir())[2]
    _corrupt_inside(victim)
    out = tmp_path / "a.safetensors"
    metrics, summary = Path(f"{out}.metrics.jsonl"), Path(f"{out}.summary.csv")
    line = _one_line_error(_train(root, out))
    assert f"{victim}: cannot decode image" in line
    assert not metrics.exists() and not summary.exists()
    metrics.write_text('{"epoch": 1, "step": 1}\n')  # a stale pair from an earlier run
    summary.write_text("epoch,step\n1,1\n")
    _one_line_error(_train(root, out))
    assert not metrics.exists() and not summary.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# -- 7. the header scan leaves the warnings filters alone --------------------------------------

def test_scan_leaves_warnings_filters_as_they_were(image_folder, tmp_path):
    """The header scan runs in threads; catch_warnings is not thread-safe (each thread saves
    and restores the one global list), so a scan that used it in its workers could leave a
    filter behind. 20 scans of 240 real JPEGs with 16 threads: filters unchanged each time."""
    root = _copy(image_folder, tmp_path)
    for f in list((root / "train").rglob("*.jpg")):
        shutil.copy(f, f.with_name(f"copy-{f.name}"))
    _, train, _ = list_folder(root)
    assert len(train.files) == 240
    before = list(warnings.filters)
    for run in range(20):
        scan(root, train, 16, "test")
        assert warnings.filters == before, f"scan {run + 1} changed the warnings filters"
