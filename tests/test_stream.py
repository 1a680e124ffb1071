"""Streamed image folders (issue 12): same order as the in-memory path, determinism, resume,
DDP slices, recorded normalisation and one-line errors for bad images.

Every folder here holds real photographs: CIFAR-10 images upscaled to random sizes and
aspect ratios, saved as JPEG (examples/image_folder.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from mgrow.arch import build
from mgrow.bundle import load
from mgrow.data import batch_plan, batches, load_data
from mgrow.engine import Interrupted, TrainConfig, train
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.data.folders import MAX_PIXELS, BadImage, image_problem
from mgrow.data.plan import generator as sample_key
from mgrow.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE, crop_params

from conftest import CIFAR, run_main

SIZE = 16  # input side: tiny, so every test takes seconds
ARCH = ArchSpec(name="resnet18", width=0.125, num_classes=10, input_size=SIZE)
pytestmark = pytest.mark.skipif(not (CIFAR / "test.npz").exists(),
                                reason=f"no CIFAR-10 copy at {CIFAR}")


@pytest.fixture(scope="module")
def folder(image_folder) -> Path:
    return image_folder


@pytest.fixture(scope="module")
def streamed(folder):
    return load_data(f"imagefolder:{folder}", input_size=SIZE, workers=0)


def test_folder_holds_varied_real_jpegs(folder, streamed):
    from PIL import Image
    sizes = set()
    for path in sorted((folder / "train").rglob("*.jpg"))[:40]:
        with Image.open(path) as im:
            assert im.format == "JPEG"
            sizes.add(im.size)
    assert len(sizes) > 30 and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    s = streamed.spec
    assert (s.num_classes, s.channels, s.input_size, s.train_size) == (10, 3, SIZE, 120)
    assert (s.mean, s.std) == (IMAGENET_MEAN, IMAGENET_STD)  # the default: --stats imagenet
    assert torch.bincount(streamed.train_y).tolist() == [12] * 10


def test_stream_and_memory_give_the_same_labels_in_the_same_order(folder, streamed):
    memory = load_data(f"imagefolder:{folder}", mode="memory", input_size=SIZE)
    assert torch.equal(memory.train_y, streamed.train_y)
    for epoch in (0, 1):
        for rank, world in ((0, 1), (0, 2), (1, 2)):
            a = [y for _, y in batches(memory, True, 32, epoch, 5, rank, world)]
            b = [y for _, y in batches(streamed, True, 32, epoch, 5, rank, world)]
            assert len(a) == len(b) == 3  # 120 // 32: the last 24 dropped
            assert all(torch.equal(u, v) for u, v in zip(a, b))
    # evaluation: file order, and the very same pixels (both use the eval view)
    same = dataclasses.replace(memory, spec=streamed.spec)  # one normalisation for both
    for (xm, ym), (xs, ys) in zip(batches(same, False, 16, 0, 0),
                                  batches(streamed, False, 16, 0, 0)):
        assert torch.equal(ym, ys) and torch.equal(xm, xs)
    # and the order is the shared batch plan
    first = next(batch_plan(120, True, 32, 1, 5))[1]
    assert torch.equal(next(batches(streamed, True, 32, 1, 5))[1], streamed.train_y[first])


def test_streamed_batches_deterministic_whatever_the_workers(folder, streamed):
    two = dataclasses.replace(streamed, workers=2)
    a = list(batches(streamed, True, 32, 3, 7))
    b = list(batches(two, True, 32, 3, 7))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert a[0][0].shape == (32, 3, SIZE, SIZE) and a[0][0].dtype == torch.float32
    rest = list(batches(two, True, 32, 3, 7, start=1))  # a resumed epoch: the same images
    assert all(torch.equal(x, xr) for (x, _), (xr, _) in zip(a[1:], rest))
    halves = [list(batches(streamed, True, 32, 3, 7, rank=r, world=2)) for r in (0, 1)]
    for (x, _), (x0, _), (x1, _) in zip(a, *halves):  # augmentation per image, not per rank
        assert torch.equal(torch.cat([x0, x1]), x)
    other = next(batches(streamed, True, 32, 4, 7))
    assert not torch.equal(other[1], a[0][1])  # another epoch: another order


def test_evaluation_slices_cover_the_test_split_once(folder, streamed):
    """Evaluation over 4 ranks, batch 13 of the 40 test images: the last batch holds 1 image,
    so 3 ranks have nothing in it and get no batch there (an empty batch crashed the
    streamed loader's collate under torchrun); every image is evaluated exactly once."""
    memory = load_data(f"imagefolder:{folder}", mode="memory", input_size=SIZE)
    for data in (memory, streamed):
        for world in (1, 2, 4):
            seen = [y for r in range(world) for _, y in batches(data, False, 13, 0, 0, r, world)]
            assert all(len(y) > 0 for y in seen)
            assert sum(map(len, seen)) == 40
            assert torch.bincount(torch.cat(seen), minlength=10).tolist() == \
                torch.bincount(data.test_y, minlength=10).tolist()
    plans = [[idx for _, idx in batch_plan(40, False, 13, 0, 0, r, 4)] for r in range(4)]
    assert [len(p) for p in plans] == [3, 3, 3, 4]
    assert torch.equal(torch.cat([i for p in plans for i in p]).sort().values, torch.arange(40))


def test_crop_params_follow_torchvision_rule():
    from torchvision.transforms import RandomResizedCrop
    g = sample_key(0)
    ours = [crop_params(300, 200, g) for _ in range(2000)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = torch.zeros(3, 300, 200)
        theirs = [RandomResizedCrop.get_params(image, list(SCALE), list(RATIO))
                  for _ in range(2000)]
    for top, left, h, w in ours:
        assert 0 <= top <= 300 - h and 0 <= left <= 200 - w and h > 0 and w > 0
        assert SCALE[0] * 0.95 <= h * w / 60000 and RATIO[0] * 0.95 <= w / h <= RATIO[1] * 1.05

    def stats(crops):  # mean area share, mean aspect, mean centre row (as shares)
        n = len(crops)
        return (sum(h * w for _, _, h, w in crops) / 60000 / n,
                sum(w / h for _, _, h, w in crops) / n,
                sum(t + h / 2 for t, _, h, _ in crops) / 300 / n)

    # the same distribution as torchvision's sampler: means within ~5 standard errors
    for a, b in zip(stats(ours), stats(theirs)):
        assert abs(a - b) < 0.03, (stats(ours), stats(theirs))
    # a 1 x 1000 sliver fits no crop of 8% of its area with aspect <= 4/3: every try
    # fails and the fallback is the centre crop clamped to aspect 4/3 (torchvision's rule)
    assert crop_params(1, 1000, sample_key(1)) == (0, 499, 1, 1)
    assert crop_params(100, 100, sample_key(1)) != crop_params(100, 100, sample_key(2))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    crop_params(50, 50, sample_key(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched


def test_stats_sample_is_measured_and_recorded(folder, tmp_path):
    measured = load_data(f"imagefolder:{folder}", input_size=SIZE, stats="sample", workers=0)
    memory = load_data(f"imagefolder:{folder}", mode="memory", input_size=SIZE)
    # 120 images <= the 1,000 sampled: the same pixels as the in-memory split's statistics
    assert measured.spec.mean == pytest.approx(memory.spec.mean, abs=1e-9)
    assert measured.spec.std == pytest.approx(memory.spec.std, abs=1e-9)
    assert measured.spec.mean != pytest.approx(IMAGENET_MEAN, abs=1e-3)
    out = tmp_path / "a.safetensors"
    r = run_main("train", "--arch", "resnet18", "--width", "0.125", "--data",
                 f"imagefolder:{folder}", "--input-size", SIZE, "--stats", "sample",
                 "--workers", "1", "--epochs", "0.5", "--batch-size", "32", "-q", "-o", out)
    assert r.returncode == 0, r.stderr
    spec = load(out).manifest.data
    assert spec.mean == pytest.approx(measured.spec.mean, abs=1e-6)
    assert (spec.input_size, spec.train_size) == (SIZE, 120)
    assert load(out).manifest.arch.input_size == SIZE


def _interrupt_at(model: torch.nn.Module, step: int):
    calls = []

    def hook(module, args, output):
        calls.append(module.training)
        if sum(calls) == step:
            signal.raise_signal(signal.SIGINT)

    return model.register_forward_hook(hook)


def test_resume_mid_epoch_streamed_is_bit_for_bit(folder, tmp_path):
    data = load_data(f"imagefolder:{folder}", input_size=SIZE, workers=0)  # (any count: above)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=4)  # 3 steps an epoch
    ref = build(ARCH, MixingSpec(), seed=1)
    train(ref, data, cfg, progress="quiet")
    model = build(ARCH, MixingSpec(), seed=1)
    handle = _interrupt_at(model, 5)  # epoch 2, its second step
    with pytest.raises(Interrupted, match="step 5 of 6"):
        train(model, data, cfg, checkpoint=tmp_path / "ck", progress="quiet")
    handle.remove()
    resumed = build(ARCH, MixingSpec(), seed=99)  # every tensor comes from the checkpoint
    result = train(resumed, data, cfg, checkpoint=tmp_path / "ck", resume=True,
                   progress="quiet")
    assert result.steps == 6
    want = ref.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, want[k]), k


# -- bad images ------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_data_after_a_whole_image_is_not_truncation(folder, tmp_path):
    """A JPEG with bytes appended (a phone's motion photo, padding) has no end marker at its
    end, yet decodes whole: accepted; cut short it is still refused (the next test)."""
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    victims = sorted((extra / "train" / "cat").iterdir())[:2]
    victims[0].write_bytes(victims[0].read_bytes() + b"\x00" * 600)
    victims[1].write_bytes(victims[1].read_bytes() + os.urandom(4096))
    data = load_data(f"imagefolder:{extra}", input_size=SIZE, workers=0)
    assert data.spec.train_size == 120
    assert image_problem(victims[0]) is None and image_problem(victims[1]) is None


def test_scan_in_chunks_names_the_first_bad_file(folder, tmp_path, monkeypatch):
    """The header scan checks SCAN_CHUNK files at a time (bounded memory on ImageNet): with
    chunks of 7, bad files in two later chunks (listing order 61 and 69: dog is the sixth
    class of 12 images each), the first in listing order is named."""
    import mgrow.data.folders
    monkeypatch.setattr(mgrow.data.folders, "SCAN_CHUNK", 7)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    files = sorted((bad / "train" / "dog").iterdir())
    for victim in (files[9], files[1]):
        victim.write_bytes(b"not an image" * 10)
    with pytest.raises(BadImage, match=f"{files[1]}: cannot read image"):
        load_data(f"imagefolder:{bad}", input_size=SIZE)


def _spoil(path: Path, how: str) -> None:
    """Replace a real JPEG of the folder with a bad file of the kind `how`."""
    data = path.read_bytes()
    bad = {"unreadable": b"this is not an image\n" * 20,
           "truncated": data[:len(data) // 2],
           "huge": _png(12_000, 9_000, zlib.compress(b"\x00" * 64)),
           "corrupt inside": _png(40, 40, b"\x78\x9c" + os.urandom(300))}[how]
    path.write_bytes(bad)


@pytest.mark.parametrize("how,message,up_front", [
    ("unreadable", "cannot read image", True),
    ("truncated", "truncated JPEG file", True),
    ("huge", "absurdly large image (12000x9000 = 108,000,000 pixels", True),
    ("corrupt inside", "cannot decode image", False),
])
def test_bad_image_one_line_naming_the_file(folder, tmp_path, how, message, up_front):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    victim = sorted((bad / "train" / "cat").iterdir())[3]
    _spoil(victim, how)
    if up_front:  # found when the folder is listed, before any training
        with pytest.raises(BadImage) as e:
            load_data(f"imagefolder:{bad}", input_size=SIZE)
        assert str(victim) in str(e.value) and message in str(e.value)
    out = tmp_path / "a.safetensors"
    r = run_main("train", "--arch", "resnet18", "--width", "0.125", "--data",
                 f"imagefolder:{bad}", "--input-size", SIZE, "--workers", "1", "--epochs", "1",
                 "--batch-size", "120", "-q", "-o", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mgrow: error: {victim}: {message}"), \
        r.stderr[-2000:]
    assert not out.exists() and not Path(f"{out}.ckpt").exists()
    if up_front:  # memory mode scans first as well
        with pytest.raises(BadImage, match=message.split(" (")[0]):
            load_data(f"imagefolder:{bad}", mode="memory", input_size=SIZE)


def _ignored_signals(pid: int) -> set[int]:
    """Return the signal numbers a live process ignores (SigIgn in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return set()


def _loader_workers(parent: int) -> list[set[int]]:
    """Return the ignored signals of `parent`'s forked children (its loader workers), taken
    while they are alive; empty if there are none right now."""
    cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2]
                                            .split()[1]) == parent \
                    and (entry / "cmdline").read_bytes() == cmd:
                found.append(_ignored_signals(int(entry.name)))
        except OSError:  # gone meanwhile
            continue
    return found


def test_ctrl_c_to_the_process_group_stops_saves_and_resumes(folder, tmp_path):
    """Ctrl-C reaches the loader workers too (one process group): they ignore it, and the
    main process finishes its step, saves and exits in one line."""
    out = tmp_path / "a.safetensors"
    args = [sys.executable, "-m", "mgrow", "train", "--arch", "resnet18", "--width", "0.125",
            "--data", f"imagefolder:{folder}", "--input-size", "64", "--workers", "2",
            "--epochs", "3", "--batch-size", "4", "--json", "-o", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    first = child.stdout.readline()  # epoch 1 done: epoch 2 (30 steps) is under way
    assert json.loads(first)["step"] == 30
    workers: list[set[int]] = []
    for _ in range(200):  # the loader's 2 workers, alive and past their start-up
        workers = _loader_workers(child.pid)
        if len(workers) == 2 and all({signal.SIGINT, signal.SIGTERM} <= w for w in workers):
            break
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert len(workers) == 2 and all({signal.SIGINT, signal.SIGTERM} <= w for w in workers)
    assert child.returncode != 0 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith("mgrow: error: stopped by SIGINT at epoch") and "--resume" in err
    r = run_main("train", *args[4:-3], "--resume", "-q", "-o", out)
    assert r.returncode == 0, r.stderr
    assert load(out).manifest.phases[-1].images == 90 * 4  # 3 epochs of 30 steps in all


def test_cli_choices_match_the_library():
    from mgrow.cli import options as cli
    from mgrow.data import MODES
    from mgrow.data.transforms import STATS
    assert [e.value for e in cli.DataModes] == list(MODES)
    assert [e.value for e in cli.StatsModes] == list(STATS)


def test_mode_and_size_options_are_checked(folder):
    with pytest.raises(Exception, match="--data-mode stream applies to imagefolder"):
        load_data("digits", mode="stream")
    with pytest.raises(Exception, match="--input-size applies to imagefolder"):
        load_data("digits", input_size=32)
    with pytest.raises(Exception, match="unknown --data-mode"):
        load_data("digits", mode="disk")
    assert MAX_PIXELS > 9000 * 9000


# -- DDP: each of 2 gloo processes decodes only its slice ---------------------------------------

CHILD = r"""
import json, os, sys
from pathlib import Path

import mgrow.data.stream
from mgrow.arch import build
from mgrow.data import load_data
from mgrow.engine import TrainConfig, train
from mgrow.manifest import ArchSpec, MixingSpec

folder, log = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
decode = mgrow.data.stream.decode


def logged(path):  # runs in the DataLoader workers (forked): append a line per file decoded
    with open(log / f"rank{rank}.txt", "a") as f:
        f.write(str(path) + "\n")
    return decode(path)


mgrow.data.stream.decode = logged
data = load_data(f"imagefolder:{folder}", input_size=16, workers=1)
model = build(ArchSpec(name="resnet18", width=0.125, input_size=16), MixingSpec(), seed=0)
train(model, data, TrainConfig(epochs=1, batch_size=32, seed=6), progress="quiet")
"""


def test_two_gloo_processes_read_disjoint_slices(folder, streamed, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                     "torch.distributed.run"]
    proc = subprocess.run([*cmd, "--standalone", "--nproc-per-node", "2", str(script),
                           str(folder), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    read = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    train_read = [[p for p in paths if "/train/" in p] for paths in read]
    test_read = [[p for p in paths if "/val/" in p] for paths in read]
    root = streamed.root
    for r in (0, 1):  # exactly this rank's slices of the 3 global batches, each file once
        want = [str(streamed.train.path(root, int(i)))
                for _, idx in batch_plan(120, True, 32, 0, 6, r, 2) for i in idx]
        assert train_read[r] == want
        want_test = [str(streamed.test.path(root, int(i)))
                     for _, idx in batch_plan(40, False, 512, 0, 0, r, 2) for i in idx]
        assert test_read[r] == want_test
    assert not set(train_read[0]) & set(train_read[1])
    assert len(train_read[0]) == len(train_read[1]) == 48  # 3 batches x 16
    assert not set(test_read[0]) & set(test_read[1])
    assert len(set(test_read[0]) | set(test_read[1])) == 40
