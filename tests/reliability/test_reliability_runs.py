"""Runs against each other and against their surroundings.

- `--resume` continues only the run its checkpoint records (options and data identity).
- One writer per output: a second run (or any command) writing the same output is refused
  at once, and no writer's clean-up removes another's live temporary file.
- Output names are refused up front when a side file's name would exceed NAME_MAX, so a
  file mgrow writes is always one it can read back.
- A closed stdout never crashes (at import or on print); a command whose product is
  stdout ends in one line and status 1 (write error), one whose product is a file succeeds.
- The last resort: an unforeseen exception is one line naming the command, the exception
  and --debug.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from rel_support import (ENV, TRAIN, Forked, assert_one_line_error, assert_refused, mgrow,
                         temps, watch, write_bundle)

EPOCHS = 30
ARGS = ("train", *TRAIN, "--epochs", str(EPOCHS), "--seed", "3", "-o", "out.safetensors")
CKPT = "out.safetensors.ckpt"


def _wait_for(p: Forked, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert p.poll() is None, f"the run ended first: {p.finish()}"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A folder holding the checkpoint of ARGS stopped by SIGTERM after its first epoch, and
    `relabelled/`: the digits in the npz layout with every label moved on by one (the same
    number of images, so only the data identity tells them apart)."""
    folder = tmp_path_factory.mktemp("interrupted")
    p = Forked(ARGS, folder)
    _wait_for(p, folder / CKPT)
    os.kill(p.pid, signal.SIGTERM)
    assert_one_line_error(p.finish(), "stopped by SIGTERM")
    from mgrow.data import load_data
    d = load_data("digits")
    (folder / "relabelled").mkdir()
    for split, x, y in (("train", d.train_x, d.train_y), ("test", d.test_x, d.test_y)):
        np.savez(folder / "relabelled" / f"{split}.npz",
                 images=x.permute(0, 2, 3, 1).numpy(), labels=((y + 1) % 10).numpy())
    return folder


@pytest.fixture
def resumable(interrupted, tmp_path) -> Path:
    """A fresh copy of the interrupted run's folder."""
    shutil.copytree(interrupted, tmp_path, dirs_exist_ok=True)
    return tmp_path


# name -> (options overriding ARGS's, what the one line must match)
OTHER_RUNS = {
    "epochs": (("--epochs", "31"), r"--epochs 31 \(checkpoint: 30\)"),
    "lr": (("--lr", "0.05"), r"--lr 0.05 \(checkpoint: 0.1\)"),
    "seed": (("--seed", "4"), r"--seed 4 \(checkpoint: 3\)"),
    "warmup": (("--warmup", "0.5"), r"--warmup 0.5 \(checkpoint: 1\)"),
    "weight-decay": (("--weight-decay", "0"), r"--weight-decay 0 \(checkpoint: 0.0005\)"),
    "label-smoothing": (("--label-smoothing", "0.1"), r"--label-smoothing 0.1 \(checkpoint: 0\)"),
    "two-options": (("--lr", "0.05", "--seed", "4"), r"--lr 0.05 \(checkpoint: 0.1\); "
                                                     r"--seed 4 \(checkpoint: 3\)"),
    "batch-size": (("--batch-size", "8"), "saved with batch size 16 on 64 training images"),
    "same-size-other-labels": (("--data", "npz:relabelled"),
                               r"--data: other training images or labels"),
}


@pytest.mark.parametrize("name", OTHER_RUNS)
def test_resume_of_another_run_is_refused(resumable, name):
    options, match = OTHER_RUNS[name]
    before = watch(resumable)
    run = mgrow(*ARGS, *options, "--resume", cwd=resumable)
    line = assert_refused(run, before, match)
    assert "this run differs" in line or name == "batch-size"


def test_resume_of_the_same_run_and_of_an_old_checkpoint(resumable, tmp_path_factory):
    """The same options resume; a checkpoint from before the record (mgrow 0.1.0: no "run"
    entry) resumes with the old checks; both end with the uninterrupted run's weights."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    assert mgrow(*ARGS, cwd=reference).rc == 0
    want = safetensors.torch.load((reference / "out.safetensors").read_bytes())
    old = resumable / "old"
    shutil.copytree(resumable, old)
    ck = torch.load(io.BytesIO((old / CKPT).read_bytes()), weights_only=True)
    assert set(ck["run"]) == {"--epochs", "--lr", "--seed", "--batch-size", "--warmup",
                              "--weight-decay", "--label-smoothing", "momentum", "nesterov",
                              "schedule", "--data"}
    del ck["run"]
    torch.save(ck, old / CKPT)
    for folder in (resumable, old):
        run = mgrow(*ARGS, "--resume", cwd=folder)
        assert run.rc == 0, run.err
        got = safetensors.torch.load((folder / "out.safetensors").read_bytes())
        assert all(torch.equal(got[k], want[k]) for k in want)


# -- one writer per output ------------------------------------------------------------------

def test_second_writer_is_refused_at_once(tmp_path):
    """While a run trains into out.safetensors, a second run and a fuse writing the same
    output are refused in one line within seconds; the first run goes on undisturbed (then
    stopped by SIGTERM): its metrics are its own epochs, in order, up to its checkpoint."""
    good = write_bundle(tmp_path / "good.safetensors")
    first = Forked((*ARGS[:-4], "--epochs", "10000", *ARGS[-4:]), tmp_path)
    _wait_for(first, tmp_path / CKPT)
    for args in (ARGS, ("fuse", good, "-o", "out.safetensors", "--force")):
        t0 = time.monotonic()
        run = mgrow(*args, cwd=tmp_path)
        assert_one_line_error(run, rf"out.safetensors: another mgrow process \(pid "
                                   rf"{first.pid}\) is writing it")
        assert time.monotonic() - t0 < 30
    assert first.poll() is None
    os.kill(first.pid, signal.SIGTERM)
    assert_one_line_error(first.finish(), "stopped by SIGTERM")
    lines = (tmp_path / "out.safetensors.metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    ck = torch.load(io.BytesIO((tmp_path / CKPT).read_bytes()), weights_only=True)
    assert steps == list(range(4, ck["step"] + 1, 4)) and len(steps) >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "good.safetensors", CKPT, "out.safetensors.metrics.jsonl",
        "out.safetensors.summary.csv"]


def test_cleanup_spares_a_live_writers_temporary_file(tmp_path):
    """A temporary file whose writer holds the output's lock is never removed by another
    writer; once that writer is gone, the next write removes its leftover."""
    from mgrow.files import writer_lock
    good = write_bundle(tmp_path / "good.safetensors")
    live = tmp_path / ".out.safetensors.l1ve0000.tmp"
    with writer_lock(tmp_path / "out.safetensors"):  # this process is the live writer
        live.write_bytes(b"half a bundle")
        run = mgrow("export", good, "-o", "out.safetensors", cwd=tmp_path)
        assert_one_line_error(run, rf"another mgrow process \(pid {os.getpid()}\) is writing")
        assert live.read_bytes() == b"half a bundle"
    run = mgrow("export", good, "-o", "out.safetensors", cwd=tmp_path)  # now a dead writer's
    assert run.rc == 0, run.err
    assert temps(tmp_path) == [] and (tmp_path / "out.safetensors").is_file()


# -- output names and NAME_MAX ---------------------------------------------------------------

LONGEST = "n" * (255 - 28 - len(".safetensors")) + ".safetensors"  # 227 bytes: the limit
TOO_LONG = "n" + LONGEST
TOO_LONG_UTF8 = "é" * 108 + ".safetensors"  # 108 characters, 228 bytes


@pytest.mark.parametrize("name", [TOO_LONG, TOO_LONG_UTF8], ids=["ascii", "utf8"])
@pytest.mark.parametrize("command", ["train", "fuse", "export", "finetune", "convert"])
def test_output_name_too_long_is_refused(tmp_path, command, name):
    good = write_bundle(tmp_path / "good.safetensors")
    args = {"train": ARGS[:-1], "fuse": ("fuse", good, "-o"), "export": ("export", good, "-o"),
            "finetune": ("finetune", good, "--epochs", "1", "-o"),
            "convert": ("convert", good, "--arch", "wrn-10-1", "-o")}[command]
    before = watch(tmp_path)
    assert_refused(mgrow(*args, name, cwd=tmp_path), before,
                   r"output name of 228 bytes is too long \(at most 227")


def test_longest_name_is_written_and_read_back(tmp_path):
    """At the limit everything works: training (checkpoint, metrics), reading the bundle,
    and the sibling's default name (longer still) is refused rather than failing later."""
    run = mgrow("train", *TRAIN, "--epochs", "1", "-o", LONGEST, cwd=tmp_path)
    assert run.rc == 0, run.err
    run = mgrow("eval", LONGEST, "--json", cwd=tmp_path)
    assert run.rc == 0 and '"top1"' in run.out, run.err
    before = watch(tmp_path)
    assert_refused(mgrow("train-sibling", LONGEST, "--epochs", "1", cwd=tmp_path), before,
                   "output name of 235 bytes is too long")


# -- a closed stdout, in fresh interpreters (the crash was at import) ------------------------

def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


MGROW = f"{sys.executable} -m mgrow"
CLOSED = {
    "help": f"{MGROW} --help >&-",
    "version": f"{MGROW} --version >&-",
    "flops": f"{MGROW} flops good.safetensors >&-",
    "eval-json": f"{MGROW} eval good.safetensors --json >&-",
}


@pytest.mark.parametrize("name", CLOSED)
def test_closed_stdout_is_a_write_error(tmp_path, name):
    """Each of these prints its product on stdout, so a stdout closed at start loses it: as
    GNU tools do (`ls >&-`: "write error"), one line and status 1. (It was a silent success
    until issue 25; the crash this guards against, at import or on print, stays fixed:
    one line, no traceback.) tests/test_outputs.py covers the other commands."""
    write_bundle(tmp_path / "good.safetensors")
    run = _shell(CLOSED[name], tmp_path)
    assert (run.returncode, run.stderr) == (1, "mgrow: error: write error: stdout is closed\n")


def test_closed_stdout_of_a_writer_is_silent_success(tmp_path):
    """A command whose product is a file writes it; only its report (`wrote X`) is lost."""
    write_bundle(tmp_path / "good.safetensors")
    run = _shell(f"{MGROW} export good.safetensors -o plain.safetensors >&-", tmp_path)
    assert (run.returncode, run.stderr) == (0, "")
    assert (tmp_path / "plain.safetensors").is_file()


def test_stdout_closed_by_its_reader(tmp_path):
    """`mgrow flops X | head -c0`: the reader is gone before mgrow prints. Either the
    output fitted the pipe (silent success) or one line says the pipe broke."""
    write_bundle(tmp_path / "good.safetensors")
    run = _shell(f"{MGROW} flops good.safetensors | head -c0", tmp_path)
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    if run.returncode:
        assert run.stderr == "mgrow: error: stdout was closed by its reader (broken pipe)\n"
        assert run.returncode == 141
    else:
        assert run.stderr == ""


def test_closed_stderr_still_exits_with_the_error_status(tmp_path):
    run = _shell(f"{MGROW} eval missing.safetensors 2>&-", tmp_path)
    assert (run.returncode, run.stdout) == (2, "")


# -- the last resort ---------------------------------------------------------------------------

def test_unforeseen_exception_is_one_line(tmp_path):
    """Under an address-space limit (as `ulimit -v` sets) a large allocation fails inside
    torch: mgrow names the command and the exception in one line and points to --debug;
    with --debug the traceback is shown."""
    write_bundle(tmp_path / "good.safetensors")
    args = ("flops", "good.safetensors", "--input-size", "2048")
    run = mgrow(*args, cwd=tmp_path, memory_headroom=300 << 20)
    assert run.rc == 1
    assert_one_line_error(run, r"^mgrow: error: flops failed unexpectedly: RuntimeError: .*"
                               r"can't allocate memory.* \(run again with --debug for the "
                               r"traceback\)$")
    run = mgrow("--debug", *args, cwd=tmp_path, memory_headroom=300 << 20)
    assert run.rc != 0 and "Traceback" in run.err
