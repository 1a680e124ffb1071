"""Interrupted training: Ctrl-C, SIGTERM and SIGKILL, then `--resume`.

Every run trains a wrn-10-1 on 64 digits at batch 16: 4 steps and one checkpoint an epoch,
30 epochs. A resumed run must end with exactly the weights of an uninterrupted run with
the same seed (CPU). The Ctrl-C case runs `python -m mgrow` in fresh interpreters; the
others run the same entry point in processes forked from a preloaded server (rel_support),
which handle signals the same way and start in a fraction of the time.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from rel_support import (TRAIN, Forked, Fresh, assert_one_line_error, assert_refused, mgrow,
                         temps, watch)

EPOCHS = 30
STEPS = 4 * EPOCHS
ARGS = ("train", *TRAIN, "--epochs", str(EPOCHS), "--seed", "3", "-o", "out.safetensors")


def wait_for(p: Forked | Fresh, ready, timeout: float = 120, poll: float = 0.01) -> None:
    """Wait until `ready()` holds, failing if the run ends (or takes too long) first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            pytest.fail(f"the run ended before the moment came: {p.finish()}")
        if time.monotonic() > deadline:
            os.kill(p.pid, signal.SIGKILL)
            pytest.fail("the moment never came")
        time.sleep(poll)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(path.read_bytes())


def assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    got = tensors(path)
    assert got.keys() == reference.keys()
    unequal = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not unequal, f"resumed weights differ from the uninterrupted run's: {unequal[:5]}"


def metrics_steps(folder: Path) -> list[int]:
    """Return the steps of the metrics lines, checking the CSV summary has the same rows."""
    lines = (folder / "out.safetensors.metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    summary = (folder / "out.safetensors.summary.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[1]) for row in summary] == steps
    return steps


def checkpoint(folder: Path) -> dict:
    """Load the training checkpoint as --resume does (weights_only); it must be whole."""
    ck = torch.load(io.BytesIO((folder / "out.safetensors.ckpt").read_bytes()),
                    map_location="cpu", weights_only=True)
    assert ck["format"] == "mgrow-train-1"
    return ck


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted run."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = mgrow(*ARGS, cwd=folder)
    assert run.rc == 0, run.err
    assert metrics_steps(folder) == list(range(4, STEPS + 1, 4))
    return tensors(folder / "out.safetensors")


@pytest.mark.parametrize("signals,kind", [(("SIGINT",), Fresh), (("SIGTERM",), Forked),
                                          (("SIGINT", "SIGTERM"), Forked)],
                         ids=["SIGINT", "SIGTERM", "second-signal"])
def test_signal_then_resume(tmp_path, reference, signals, kind):
    """Signalled after the first checkpoint: one line saying how to resume, a whole
    checkpoint, no bundle, no temporary file. A second signal stops at once (whatever the
    loop was doing, a checkpoint write included), keeping the last whole checkpoint, and
    says so in one line. --resume then ends with the uninterrupted run's weights and one
    metrics line per epoch."""
    p = kind(ARGS, tmp_path)
    wait_for(p, lambda: (tmp_path / "out.safetensors.ckpt").exists())
    for name in signals:  # back to back: both arrive before the run can stop
        os.kill(p.pid, getattr(signal, name))
    run = p.finish()
    if len(signals) == 1:
        message = (rf"stopped by {signals[0]} at epoch \d+, step \d+ of {STEPS}: checkpoint "
                   r"saved to out.safetensors.ckpt; run again with --resume to continue")
    else:
        message = (r"stopped at once by a second signal \((SIGINT|SIGTERM)\): the last "
                   r"checkpoint out.safetensors.ckpt is intact; run again with --resume to "
                   r"continue from it")
    assert_one_line_error(run, message)
    assert run.rc == 128 + getattr(signal, signals[0])  # the shell's code: 130 for Ctrl-C
    assert not (tmp_path / "out.safetensors").exists() and temps(tmp_path) == []
    step = checkpoint(tmp_path)["step"]
    assert 0 < step < STEPS

    before = watch(tmp_path)  # resuming with other settings is refused, changing nothing
    assert_refused(mgrow(*ARGS, "--resume", "--batch-size", "8", cwd=tmp_path), before,
                   "saved with batch size 16 on 64 training images; this run has 8")

    run = kind([*ARGS, "--resume"], tmp_path).finish()
    assert run.rc == 0, run.err
    assert_same_weights(tmp_path / "out.safetensors", reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.safetensors", "out.safetensors.metrics.jsonl", "out.safetensors.summary.csv"]
    assert metrics_steps(tmp_path) == list(range(4, STEPS + 1, 4))


def test_sigkill_at_varying_moments_then_resume(tmp_path, reference):
    """SIGKILL, again and again: while a checkpoint is being written (the moment its
    temporary file appears) and at random moments. After each kill the checkpoint on disk
    is the previous whole one (never a torn file) and there is no bundle; the killed
    writer's temporary file may remain. --resume loads the checkpoint, ignores such
    leftovers and removes them at its next write of the same file (write_atomic), and ends
    with the uninterrupted run's weights and one metrics line per epoch."""
    rng = random.Random(0)
    ckpt = tmp_path / "out.safetensors.ckpt"
    steps, left_behind = [], set()
    for kill in range(5):
        p = Forked([*ARGS, *(["--resume"] if ckpt.exists() else [])], tmp_path)
        if kill % 2 == 0:  # during a checkpoint write (or three epochs on, if polling misses)
            later = (steps[-1] if steps else 0) // 4 + 3
            old = set(left_behind)
            wait_for(p, lambda: any(".ckpt." in n and n not in old for n in temps(tmp_path))
                     or epochs_logged(tmp_path) >= later, poll=0.0005)
        else:  # after a random share of an epoch or two
            wait_for(p, lambda: ckpt.exists() and (not steps or checkpoint_step(ckpt)
                                                   > steps[-1]), poll=0.05)
            time.sleep(rng.uniform(0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        assert p.finish().rc == -signal.SIGKILL
        if not ckpt.exists():  # killed before the first checkpoint was complete
            assert kill == 0
            continue
        step = checkpoint(tmp_path)["step"]  # whole, loadable, an epoch's end
        assert step % 4 == 0 and 0 < step < STEPS
        assert not steps or step >= steps[-1]
        steps.append(step)
        assert not (tmp_path / "out.safetensors").exists()
        left_behind |= set(temps(tmp_path))
    assert len(set(steps)) >= 2, f"the kills did not fall at varying moments: {steps}"

    # a killed writer's leftover, in case no kill above landed inside a write
    stale = tmp_path / ".out.safetensors.ckpt.k1lled_0.tmp"
    stale.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    run = mgrow(*ARGS, "--resume", cwd=tmp_path)
    assert run.rc == 0, run.err
    assert_same_weights(tmp_path / "out.safetensors", reference)
    assert temps(tmp_path) == [], "stale temporary files were left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.safetensors", "out.safetensors.metrics.jsonl", "out.safetensors.summary.csv"]
    assert metrics_steps(tmp_path) == list(range(4, STEPS + 1, 4))


def epochs_logged(folder: Path) -> int:
    try:
        return (folder / "out.safetensors.metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(io.BytesIO(path.read_bytes()), weights_only=True)["step"]
    except Exception:  # replaced under our feet: try again
        return -1
