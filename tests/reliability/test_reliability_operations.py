"""Refused operations: incompatible fuses, impossible budgets and values, outputs that exist
or cannot be written, a full disk. Each is one line, a non-zero exit and nothing written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mgrow.bundle import load

from conftest import run_main
from rel_support import (TRAIN, Run, assert_one_line_error, assert_refused, digits_arch,
                         digits_spec, mgrow, snapshot, temps, watch, write_bundle)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> Path:
    """Bundles that fuse with `a` and ones that must not, plus a grown one whose growth has
    already spent most of a full run's FLOPs."""
    from mgrow.bundle import save
    from mgrow.growth import fuse
    from mgrow.manifest import DatasetSpec, MixingSpec, Phase
    d = tmp_path_factory.mktemp("members")
    a = write_bundle(d / "a.safetensors", seed=1)
    write_bundle(d / "b.safetensors", seed=2)
    write_bundle(d / "wider.safetensors", arch=digits_arch(width=2.0))
    write_bundle(d / "templates3.safetensors", mixing=MixingSpec(templates=3))
    write_bundle(d / "classes5.safetensors", arch=digits_arch(num_classes=5), data=None)
    write_bundle(d / "plain.safetensors", mixing=None)
    write_bundle(d / "plain2.safetensors", mixing=None, seed=2)
    write_bundle(d / "elsewhere.safetensors", data=DatasetSpec(
        **{**digits_spec().model_dump(), "spec": "npz:/data/elsewhere"}))
    write_bundle(d / "subset.safetensors", data=digits_spec().model_copy(
        update={"train_size": 64}))
    spent = Phase(operation="train-sibling", arch="wrn-10-1 mixed", stage="growth",
                  images=10**9, forward_flops=10**6, train_flops=3 * 10**15, wall_s=1.0,
                  device="cpu")
    grown = fuse([load(a), load(d / "b.safetensors")])
    save(d / "grown.safetensors", grown.manifest.with_phase(spent), grown.tensors)
    (d / "rgb").mkdir()  # a tiny 3-channel 8 x 8 data set in the npz layout
    for split, n in (("train_1", 32), ("test", 16)):
        np.savez(d / "rgb" / f"{split}.npz", images=np.zeros((n, 8, 8, 3), np.uint8),
                 labels=np.arange(n) % 10)
    return d


def _args(args: tuple, d: Path) -> list:
    """Return `args` with bundle names (and npz:RGB) made paths into the members folder."""
    return [d / a if str(a).endswith(".safetensors") and a != "out.safetensors"
            else f"npz:{d / 'rgb'}" if a == "npz:RGB" else a for a in args]


FUSE_REFUSED = {
    "different-architectures": (("a.safetensors", "wider.safetensors"),
                                "different architectures"),
    "different-template-counts": (("a.safetensors", "templates3.safetensors"),
                                  r"different mixing specs \(templates, sharing\)"),
    "different-class-counts": (("a.safetensors", "classes5.safetensors"),
                               "different class counts: 10 vs 5"),
    "different-data-sets": (("a.safetensors", "elsewhere.safetensors"),
                            r"different data sets \(digits vs npz:/data/elsewhere\)"),
    "different-subsets": (("a.safetensors", "subset.safetensors"),
                          r"different data sets \(digits, 1437 training images vs digits, "
                          r"64 training images\)"),
    "already-grown-a": (("grown.safetensors", "a.safetensors"),
                        "grown.safetensors: already grown; grow a grown bundle alone"),
    "regrow-other-tiling": (("grown.safetensors", "--tiling", "horizontal"),
                            "grown with --tiling vertical; grow it again with the same"),
    "already-grown-b": (("a.safetensors", "grown.safetensors"), "already grown"),
    "factor-1": (("a.safetensors", "b.safetensors", "--factor", "1"),
                 r"'--factor': Input should be greater than or equal to 2"),
    "factor-0": (("a.safetensors", "--factor", "0"), "'--factor': Input should be greater "
                                                     "than or equal to 2"),
    "factor-negative": (("a.safetensors", "--factor", "-2"), "'--factor': Input should be "
                                                             "greater than or equal to 2"),
    "net2net-with-b": (("a.safetensors", "b.safetensors", "--method", "net2net"),
                       "net2net widens one network; give only A"),
    "plain-with-mixture": (("plain.safetensors", "plain2.safetensors"),
                           "a plain network; --method mixture needs template-mixed"),
    "noise-negative": (("a.safetensors", "--init", "copy", "--noise", "-1"),
                       "--noise must be a finite number >= 0"),
    "noise-nan": (("a.safetensors", "--init", "copy", "--noise", "nan"),
                  "--noise must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", FUSE_REFUSED)
def test_fuse_refused(members, tmp_path, case):
    args, message = FUSE_REFUSED[case]
    args = _args(args, members)
    before = watch(members, tmp_path)
    run = mgrow("fuse", *args, "-o", "out.safetensors", cwd=tmp_path)
    assert_refused(run, before, message)


def test_the_members_do_fuse(members, tmp_path):
    """The refusals are the members' doing: a and b do fuse."""
    run = mgrow("fuse", members / "a.safetensors", members / "b.safetensors", "-o",
                "out.safetensors", cwd=tmp_path)
    assert run.rc == 0, run.err
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


# -- values ------------------------------------------------------------------------------

VALUES_REFUSED = {
    "budget-already-spent": (("finetune", "grown.safetensors", "--budget", "0.5"),
                             r"--budget 0.5X is already spent: growth so far used \d"),
    "budget-zero": (("finetune", "grown.safetensors", "--budget", "0"),
                    "--budget must be a positive number, not 0"),
    "budget-negative": (("finetune", "grown.safetensors", "--budget", "-1"),
                        "--budget must be a positive number, not -1"),
    "budget-nan": (("finetune", "grown.safetensors", "--budget", "nan"),
                   "--budget must be a positive number, not nan"),
    "budget-inf": (("finetune", "grown.safetensors", "--budget", "inf"),
                   "--budget must be a positive number, not inf"),
    "budget-and-epochs": (("finetune", "grown.safetensors", "--budget", "1", "--epochs", "1"),
                          "give exactly one of --epochs and --budget"),
    "neither-budget-nor-epochs": (("finetune", "grown.safetensors"),
                                  "give exactly one of --epochs and --budget"),
    "reference-epochs-zero": (("finetune", "grown.safetensors", "--budget", "2",
                               "--reference-epochs", "0"),
                              "--reference-epochs must be a positive number, not 0"),
    "finetune-epochs-zero": (("finetune", "a.safetensors", "--epochs", "0"),
                             "--epochs must be a positive number, not 0"),
    "finetune-epochs-negative": (("finetune", "a.safetensors", "--epochs", "-2"),
                                 "--epochs must be a positive number, not -2"),
    "finetune-epochs-nan": (("finetune", "a.safetensors", "--epochs", "nan"),
                            "--epochs must be a positive number, not nan"),
    "finetune-epochs-inf": (("finetune", "a.safetensors", "--epochs", "inf"),
                            "--epochs must be a positive number, not inf"),
    "finetune-epochs-below-one-step": (("finetune", "a.safetensors", "--epochs", "1e-6"),
                                       "less than one step"),
    "sibling-epochs-zero": (("train-sibling", "a.safetensors", "--epochs", "0"),
                            "--epochs must be a positive number"),
    "sibling-epochs-negative": (("train-sibling", "a.safetensors", "--epochs", "-1"),
                                "--epochs must be a positive number"),
    "sibling-epochs-missing": (("train-sibling", "a.safetensors"),
                               "Missing option '--epochs'"),
    "train-epochs-zero": (("train", *TRAIN, "--epochs", "0"), "--epochs must be a positive"),
    "train-epochs-negative": (("train", *TRAIN, "--epochs", "-3"),
                              "--epochs must be a positive"),
    "lr-negative": (("finetune", "a.safetensors", "--epochs", "1", "--lr", "-0.1"),
                    r"--lr must be a positive number, not -0.1"),
    "lr-nan": (("finetune", "a.safetensors", "--epochs", "1", "--lr", "nan"),
               "--lr must be a positive number, not nan"),
    "seed-negative": (("train", *TRAIN, "--epochs", "1", "--seed", "-1"),
                      "'--seed': Input should be greater than or equal to 0"),
    "batch-larger-than-data": (("finetune", "a.safetensors", "--epochs", "1", "--subset",
                                "8", "--batch-size", "16"),
                               "--batch-size 16 exceeds the 8 training images"),
    "flops-input-size": (("flops", "a.safetensors", "--input-size", "0"),
                         "'--input-size': Input should be greater than or equal to 8"),
    "flops-reference-epochs": (("flops", "a.safetensors", "--reference-epochs", "-5"),
                               "--reference-epochs must be a positive number, not -5"),
    "data-elsewhere": (("eval", "a.safetensors", "--data", "npz:/nonexistent"),
                       "no such folder"),
    "data-unknown": (("eval", "a.safetensors", "--data", "bogus"), "unknown data set 'bogus'"),
    "data-mismatch": (("finetune", "a.safetensors", "--epochs", "1", "--data", "npz:RGB"),
                      "the network takes 1 input channels, npz:.*rgb has 3"),
    "device-unknown": (("eval", "a.safetensors", "--device", "tpu9"), "unknown device 'tpu9'"),
    "builder-narrower": (("train", *TRAIN, "--epochs", "1", "--arch", "torchvision:resnet18",
                          "--width", "0.25"), "is trained at width 1 .narrower: the builder's "
                         "own option"),
    # device types torch knows but mgrow does not train on (they failed mid-command)
    "device-mps": (("eval", "a.safetensors", "--device", "mps"), "unknown device 'mps'"),
    "device-meta": (("train", *TRAIN, "--epochs", "1", "--device", "meta"),
                    "unknown device 'meta'"),
    # the builder's keywords mgrow sets itself (a KeyError deep in the builder call)
    "builder-num-classes": (("train", *TRAIN, "--epochs", "1", "--arch", "torchvision:resnet18",
                             "--builder-option", "num_classes=5"),
                            "builder option 'num_classes' is set by mgrow itself"),
    "builder-weights": (("train", *TRAIN, "--epochs", "1", "--arch", "torchvision:resnet18",
                         "--builder-option", "weights=DEFAULT"),
                        "builder option 'weights' is set by mgrow itself"),
}


@pytest.mark.parametrize("case", VALUES_REFUSED)
def test_value_refused(members, tmp_path, case):
    args, message = VALUES_REFUSED[case]
    writes = args[0] in ("train", "finetune", "train-sibling")
    out = ["-o", "out.safetensors"] if writes else []
    before = watch(members, tmp_path)
    assert_refused(mgrow(*_args(args, members), *out, cwd=tmp_path), before, message)


@pytest.mark.parametrize("args", [("eval", "a.safetensors", "--batch-size", "0"),
                                  ("finetune", "a.safetensors", "--epochs", "1", "--warmup",
                                   "-1", "-o", "out.safetensors"),
                                  ("fuse", "a.safetensors", "--init", "sideways", "-o",
                                   "out.safetensors")],
                         ids=["batch-size-zero", "warmup-negative", "unknown-init"])
def test_usage_errors_no_traceback(members, tmp_path, args):
    """Values typer rejects while parsing get one line naming the option and the command's
    --help, exit status 2: no traceback, nothing written."""
    before = watch(members, tmp_path)
    run = mgrow(*_args(args, members), cwd=tmp_path)
    assert run.rc == 2 and "Traceback" not in run.err
    assert len(run.err.splitlines()) == 1 and run.err.startswith("mgrow: error: Invalid value")
    assert f"(see `mgrow {args[0]} --help`)" in run.err
    assert watch(members, tmp_path) == before


# -- outputs -----------------------------------------------------------------------------

TINY = ("--epochs", "1", "--subset", "16", "--batch-size", "16", "-q")  # one step
WRITERS = {  # each writes -o OUT when it succeeds
    "export": ("export", "a.safetensors"),
    "fuse": ("fuse", "a.safetensors", "b.safetensors"),
    "convert": ("convert", "plain.safetensors", "--arch", "wrn-10-1", "--in-channels", "1",
                "--input-size", "8"),
    "finetune": ("finetune", "a.safetensors", *TINY),
    "train-sibling": ("train-sibling", "a.safetensors", *TINY),
    "train": ("train", "--arch", "wrn-10-1", "--data", "digits", *TINY),
}


@pytest.mark.parametrize("command", WRITERS)
def test_existing_output_needs_force(members, tmp_path, command):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    before = watch(members, tmp_path)
    args = _args(WRITERS[command], members)
    assert_refused(mgrow(*args, "-o", out, cwd=tmp_path), before,
                   "out.safetensors: already exists \\(pass --force to overwrite\\)")
    run = mgrow(*args, "-o", out, "--force", cwd=tmp_path)
    assert run.rc == 0, run.err
    assert out.read_bytes() != b"precious" and out.read_bytes()[8:9] == b"{"
    assert temps(tmp_path) == []
    load(out)  # a complete bundle


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("target", ["/proc/mgrow-test/out.safetensors",
                                    "/proc/out.safetensors", "/sys/out.safetensors",
                                    "MISSING/out.safetensors", "FILE/out.safetensors",
                                    "DIR", "FIFO"])
def test_output_not_writable(members, tmp_path, command, target):
    """Places no file can be made in, even by root (these tests run as root, for whom
    chmod does not stop writes): /proc and /sys (os.access says yes, creating a file says
    no), a folder that does not exist or is a file; and targets that are not regular files
    (a folder; a FIFO, which the final rename would replace). All refused before any work."""
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    os.mkfifo(tmp_path / "FIFO")
    message = {"/proc/mgrow-test/out.safetensors": "no such folder",
               "/proc/out.safetensors": "/proc: folder is not writable",
               "/sys/out.safetensors": "/sys: folder is not writable",
               "MISSING/out.safetensors": "MISSING: no such folder",
               "FILE/out.safetensors": "FILE: no such folder",
               "DIR": "DIR: is a directory",
               "FIFO": "FIFO: not a regular file"}[target]
    before = watch(members, tmp_path)
    args = _args(WRITERS[command], members)
    assert_refused(mgrow(*args, "-o", target, cwd=tmp_path), before, message)
    if target in ("DIR", "FIFO"):  # --force does not make them writable targets
        assert_refused(mgrow(*args, "-o", target, "--force", cwd=tmp_path), before, message)


@pytest.mark.parametrize("command", [
    ("finetune", "a.safetensors", "--bn-recalibrate", "2"),
    ("train-sibling", "a.safetensors"),
    ("train", "--arch", "wrn-10-1")])
def test_unfinished_run_blocks_a_fresh_one(members, tmp_path, command):
    """Refused before any work: the data (missing here) is not loaded, no BN batch run."""
    (tmp_path / "out.safetensors.ckpt").write_bytes(b"from a run that was interrupted")
    before = watch(members, tmp_path)
    run = mgrow(*_args(command, members), *TINY, "--data", "npz:MISSING", "-o",
                "out.safetensors", cwd=tmp_path)
    assert_refused(run, before, "out.safetensors.ckpt exists from an unfinished run: pass "
                   "--resume to continue it or delete it to start over")


@pytest.mark.parametrize("ckpt", [None, b"", b"garbage" * 100, "DIR", "FIFO"],
                         ids=["none", "empty", "garbage", "dir", "fifo"])
@pytest.mark.parametrize("resume", [True, False])
def test_resume_needs_a_readable_checkpoint(members, tmp_path, ckpt, resume):
    """(A checkpoint of another batch size: test_reliability_interrupts.) A folder or FIFO
    where the checkpoint goes was called an unfinished run's checkpoint (a FIFO hung
    --resume): it is named as what it is."""
    path = tmp_path / "out.safetensors.ckpt"
    if ckpt == "DIR":
        path.mkdir()
    elif ckpt == "FIFO":
        os.mkfifo(path)
    elif ckpt is not None:
        path.write_bytes(ckpt)
    before = watch(members, tmp_path)
    run = mgrow("finetune", members / "a.safetensors", *TINY, *["--resume"] * resume, "-o",
                "out.safetensors", cwd=tmp_path, timeout=60)
    if ckpt in ("DIR", "FIFO"):
        assert_refused(run, before, "out.safetensors.ckpt: not a regular file, where the "
                       "run's checkpoint goes")
    elif resume:
        assert_refused(run, before, "no checkpoint to resume from" if ckpt is None
                       else "not a readable training checkpoint")
    elif ckpt is None:
        assert run.rc == 0, run.err
    else:
        assert_refused(run, before, "exists from an unfinished run")


# -- a full disk: in-process, with the write failing as it does on ENOSPC -------------------

class _FullDisk:
    """A file whose write stores half the bytes and then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class _OsWithFullDisk:
    """The os module, except that files opened with fdopen are on a full disk."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd, *args, **kwargs):
        return _FullDisk(os.fdopen(fd, *args, **kwargs))


@pytest.mark.parametrize("command", ["export", "fuse", "convert", "finetune"])
def test_disk_full(members, tmp_path, monkeypatch, command):
    """The write of the output (or, training, of the first checkpoint) fails with ENOSPC:
    one line, no output, no temporary file. Training keeps its metrics log (the record of
    the epoch it finished), which a fresh run truncates."""
    import mgrow.files
    monkeypatch.setattr(mgrow.files, "os", _OsWithFullDisk())  # files.py's `os` only
    before = snapshot(tmp_path)
    run = run_main(*_args(WRITERS[command], members), "-o", tmp_path / "out.safetensors")
    monkeypatch.undo()
    written = "out.safetensors.ckpt" if command == "finetune" else "out.safetensors"
    assert_one_line_error(Run(run.returncode, run.stdout, run.stderr),
                          f"{written}: write failed \\(No space left on device\\); "
                          "nothing was written")
    after = snapshot(tmp_path)
    assert temps(tmp_path) == []
    assert set(after) - set(before) <= ({"out.safetensors.metrics.jsonl",
                                         "out.safetensors.summary.csv"}
                                        if command == "finetune" else set())


# -- inputs that are not regular files; an output that is an input ------------------------

READERS = {  # every command that reads a file named IN
    "info": ("info", "IN"),
    "eval": ("eval", "IN"),
    "flops": ("flops", "IN"),
    "cka": ("cka", "IN", "a.safetensors"),
    "fuse": ("fuse", "IN", "-o", "out.safetensors"),
    "deepen": ("deepen", "IN", "-o", "out.safetensors"),
    "export": ("export", "IN", "-o", "out.safetensors"),
    "finetune": ("finetune", "IN", *TINY, "-o", "out.safetensors"),
    "train-sibling": ("train-sibling", "IN", *TINY, "-o", "out.safetensors"),
    "convert": ("convert", "IN", "--arch", "wrn-10-1", "-o", "out.safetensors"),
}


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("source", ["FIFO", "/dev/zero"])
def test_an_input_that_is_not_a_regular_file_is_refused(members, tmp_path, command, source):
    """A FIFO blocked every command reading it forever, and /dev/zero as a checkpoint to
    convert grew until the kernel killed mgrow: refused before it is opened."""
    os.mkfifo(tmp_path / "FIFO")
    args = [source if a == "IN" else a for a in _args(READERS[command], members)]
    before = watch(members, tmp_path)
    assert_refused(mgrow(*args, cwd=tmp_path, timeout=60), before, "not a regular file")


OVERWRITERS = {  # commands that read a bundle IN and write OUT: the output named as IN
    "fuse": ("fuse", "IN", "b.safetensors", "-o"),
    "deepen": ("deepen", "IN", "-o"),
    "export": ("export", "IN", "-o"),
    "finetune": ("finetune", "IN", *TINY, "-o"),
    "train-sibling": ("train-sibling", "IN", *TINY, "-o"),
    "convert": ("convert", "IN", "--arch", "wrn-10-1", "--in-channels", "1", "--input-size",
                "8", "-o"),
    "cka": ("cka", "IN", "b.safetensors", "--images", "4", "--png"),
}


@pytest.mark.parametrize("command", OVERWRITERS)
@pytest.mark.parametrize("name", ["same", "symlink"])
def test_an_output_that_is_an_input_is_refused(members, tmp_path, command, name):
    """With --force the output replaced the input it was made from (fuse's B, finetune's
    bundle, cka's PNG over a bundle): refused, by any name, before any work."""
    import shutil
    shutil.copy(members / ("plain.safetensors" if command == "convert" else "a.safetensors"),
                tmp_path / "in.safetensors")
    if name == "symlink":
        (tmp_path / "link.safetensors").symlink_to("in.safetensors")
    args = ["in.safetensors" if a == "IN" else a for a in _args(OVERWRITERS[command], members)]
    before = watch(members, tmp_path)
    out = "in.safetensors" if name == "same" else "link.safetensors"
    assert_refused(mgrow(*args, out, "--force", cwd=tmp_path), before,
                   f"{out}: is this command's input in.safetensors too")
