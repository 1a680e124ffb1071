"""CLI habits users bring along: fuse's default output, required options marked in --help,
commands in pipeline order, shell completion, plain per-epoch log lines when stderr is not a
terminal and timm's OUT.summary.csv beside the metrics."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

from conftest import make_bundle, run_main

from mgrow.bundle import load
from mgrow.cli import PIPELINE, app
from mgrow.manifest import ArchSpec


def test_fuse_without_output_writes_a_new_name_next_to_a(tmp_path):
    """Default output A-grown.safetensors beside A (not in the working folder), then
    A-grown-2: an existing file is never overwritten."""
    arch = ArchSpec(name="wrn-10-1", width=0.5, num_classes=10, in_channels=1, input_size=8)
    folder = tmp_path / "nets"
    folder.mkdir()
    make_bundle(folder / "a.safetensors", arch, seed=0)
    make_bundle(folder / "b.safetensors", arch, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    first = run_main("fuse", folder / "a.safetensors", folder / "b.safetensors", cwd=work)
    assert first.returncode == 0, first.stderr
    grown = folder / "a-grown.safetensors"
    assert f"wrote {grown}" in first.stdout
    before = grown.read_bytes()
    second = run_main("fuse", folder / "a.safetensors", "--init", "zero", cwd=work)
    assert second.returncode == 0, second.stderr
    assert grown.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "a-grown-2.safetensors", "a-grown.safetensors", "a.safetensors", "b.safetensors"]
    assert list(work.iterdir()) == []


def _help(*args: str) -> str:
    res = run_main(*args, "--help")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_lists_commands_in_pipeline_order_and_marks_required_options():
    assert set(PIPELINE) == {c.name or c.callback.__name__ for c in app.registered_commands}
    listing = _help().split("Commands:")[1]
    assert re.findall(r"^  (\S+)", listing, re.M) == list(PIPELINE)
    sibling = " ".join(_help("train-sibling").split())
    assert re.search(r"--epochs <float> .*?\[required\]", sibling)
    assert not re.search(r"-o, --output <path> [^[]*\[required\]", sibling)
    fuse = " ".join(_help("fuse").split())
    assert "[required]" not in fuse.split("Options:")[1]  # -o has a default now
    train = " ".join(_help("train").split())
    assert re.search(r"--arch <str> .*?\[required\]", train)
    assert re.search(r"-o, --output <path> .*?\[required\]", train)


def test_shell_completion_is_on():
    """Typer's completion: the root has --install-completion, and the completion protocol
    answers with the matching command names."""
    assert "--install-completion" in _help()
    env = {**os.environ, "_MGROW_COMPLETE": "complete_bash", "COMP_WORDS": "mgrow train",
           "COMP_CWORD": "1"}
    res = subprocess.run([sys.executable, "-c", "from mgrow.cli import main; main()"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["train", "train-sibling"]


LINE = re.compile(r"epoch (\d+)/3  loss (\d+\.\d{4})  acc (\d+\.\d\d)%  lr (\S+)  (\d+) img/s  "
                  r"ETA \d+:\d\d:\d\d")


def test_unattended_log_lines_and_summary_csv(tmp_path):
    """stderr not a terminal: one plain line per epoch (no bar, no escape codes) whose
    numbers are the metrics records'; OUT.summary.csv has one row per epoch, the same."""
    res = run_main("train", "--arch", "wrn-10-1", "--data", "digits", "--subset", "64",
                   "--batch-size", "16", "--epochs", "3", "-o", "out.safetensors", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 3 and "\x1b" not in res.stderr and "\r" not in res.stderr
    records = [json.loads(s) for s in
               (tmp_path / "out.safetensors.metrics.jsonl").read_text().splitlines()]
    for n, (line, rec) in enumerate(zip(lines, records), 1):
        m = LINE.fullmatch(line)
        assert m, line
        assert int(m[1]) == n and float(m[2]) == round(rec["train_loss"], 4)
        assert float(m[3]) == round(100 * rec["test_acc"], 2)
    with open(tmp_path / "out.safetensors.summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "test_loss", "test_acc", "lr",
                             "images_per_s", "wall_s"]
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    for row, rec in zip(rows, records):
        assert all(float(row[k]) == rec[k] for k in row)


SIGNAL_MID_FUSE = """
import os, signal, sys
import mgrow.growth, mgrow.cli
real = mgrow.growth.fuse
def fuse(*args, **kwargs):  # a real signal, delivered while fuse holds the output's lock
    os.kill(os.getpid(), signal.SIG{sig})
    return real(*args, **kwargs)
mgrow.growth.fuse = fuse
sys.argv = ["mgrow", "fuse", "a.safetensors", "b.safetensors", "-o", "out.safetensors"]
mgrow.cli.main()
"""


def test_ctrl_c_and_sigterm_outside_training_end_in_one_line(tmp_path):
    """Ctrl-C (typer turned it into a silent exit 130) and SIGTERM (a silent kill that left
    the lock file) during fuse: one line, the shell's status, nothing left behind."""
    arch = ArchSpec(name="wrn-10-1", width=0.25)
    make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    make_bundle(tmp_path / "b.safetensors", arch, seed=2)
    before = set(os.listdir(tmp_path))
    for sig, code, message in (("INT", 130, "interrupted; nothing was written"),
                               ("TERM", 143, "terminated by SIGTERM; nothing was written")):
        r = subprocess.run([sys.executable, "-c", SIGNAL_MID_FUSE.format(sig=sig)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert (r.returncode, r.stderr) == (code, f"mgrow: error: {message}\n"), r.stderr
        assert set(os.listdir(tmp_path)) == before  # no output, no lock, no temporary file
    # a signal once the output is written (it said "nothing was written", or, while the
    # process exited, printed nothing): the line names the file, which is whole
    after = SIGNAL_MID_FUSE.replace("mgrow.growth, ", "mgrow.phases, ").replace(
        "mgrow.growth.fuse", "mgrow.phases.save").replace(
        "    os.kill(os.getpid(), signal.SIG{sig})\n    return real(*args, **kwargs)",
        "    out = real(*args, **kwargs)\n    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return out")
    r = subprocess.run([sys.executable, "-c", after], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode, r.stderr) == (130, "mgrow: error: interrupted; after writing "
                                        "out.safetensors (complete)\n"), r.stderr
    assert set(os.listdir(tmp_path)) == before | {"out.safetensors"}
    load(tmp_path / "out.safetensors")


def test_lock_files_and_odd_names_are_handled(tmp_path):
    """A symbolic link where the writer lock goes is refused (the lock used to truncate and
    overwrite its target); a member fused with itself is refused (a twin); an output name
    that is not UTF-8 is written and printed escaped, under a strict stdout encoding."""
    a = make_bundle(tmp_path / "a.safetensors", ArchSpec(name="wrn-10-1", width=0.25))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.safetensors.lock").symlink_to(victim)
    r = run_main("export", a.path, "-o", tmp_path / "out.safetensors")
    assert r.returncode == 2 and "a symbolic link, not mgrow's lock" in r.stderr, r.stderr
    assert victim.read_text() == "precious" and not (tmp_path / "out.safetensors").exists()
    r = run_main("fuse", a.path, a.path, "-o", tmp_path / "twin.safetensors")
    assert r.returncode == 2 and "with itself" in r.stderr, r.stderr
    odd = os.fsencode(tmp_path) + b"/bad\xff.safetensors"
    r = subprocess.run([sys.executable, "-m", "mgrow", "export", str(a.path), "-o", odd],
                       capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0 and b"bad\\udcff.safetensors" in r.stdout, r.stderr
    assert os.path.exists(odd)
    # a bundle made from it records its name (refused as not a string before), escaped
    r = run_main("fuse", os.fsdecode(odd), "--method", "net2net", "-o",
                 tmp_path / "grown.safetensors")
    assert r.returncode == 0, r.stderr
    [parent] = load(tmp_path / "grown.safetensors").manifest.lineage.parents
    assert parent.path.endswith("/bad\\xff.safetensors")
    from mgrow.bundle import save  # a recorded parent path too long to look up: missing
    from mgrow.manifest import Parent
    lineage = a.manifest.lineage.model_copy(
        update={"parents": (Parent(sha256="0" * 64, path="x" * 300),)})
    save(tmp_path / "long.safetensors", a.manifest.model_copy(update={"lineage": lineage}),
         a.tensors)
    r = run_main("info", tmp_path / "long.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lineage"]["parents"][0]["status"] == "missing"
