"""Outputs (issue 25, class 6): what mgrow writes, and where.

- A command whose product is stdout (eval, flops, info, cka, --help, --version) fails as
  GNU tools do when stdout is closed: status 1 and `write error: stdout is closed`; one
  whose product is a file (train, fuse, convert, export, ...) writes it and succeeds, its
  report line having nowhere to go.
- Default output names (`fuse A`, `train-sibling SMALL`) are chosen under the writer lock:
  concurrent runs get A-grown and A-grown-2, never the same name.
- One dtype per bundle: every floating tensor a bundle holds on disk is float32, BatchNorm
  counters int64, whoever wrote it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from mgrow.arch import build
from mgrow.bundle import load, save, save_model
from mgrow.files import writer_lock
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec, Lineage, Manifest

from conftest import make_bundle, run_cli, run_main

MGROW = f"{sys.executable} -m mgrow"
TINY = ("--data", "digits", "--subset", "64", "--batch-size", "16", "--epochs", "1", "-q")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with small.safetensors (wrn-10-1 x0.5 trained on real digits for an
    epoch) and its sibling sib.safetensors."""
    d = tmp_path_factory.mktemp("trained")
    r = run_main("train", "--arch", "wrn-10-1", "--width", "0.5", *TINY, "-o",
                 d / "small.safetensors")
    assert r.returncode == 0, r.stderr
    r = run_main("train-sibling", d / "small.safetensors", *TINY, "-o", d / "sib.safetensors")
    assert r.returncode == 0, r.stderr
    return d


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


# -- a closed stdout ----------------------------------------------------------------------

PRODUCTS = {  # the command's product is what it prints
    "flops-json": "flops small.safetensors --json",
    "flops-tables": "flops small.safetensors",
    "info-json": "info small.safetensors --json",
    "eval-json": "eval small.safetensors --json",
    "cka-json": "cka small.safetensors sib.safetensors --images 16 --json",
    "help": "--help",
    "command-help": "fuse --help",
    "version": "--version",
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_product_on_a_closed_stdout_is_a_write_error(trained, name):
    run = _shell(f"{MGROW} {PRODUCTS[name]} >&-", trained)
    assert (run.returncode, run.stderr) == (1, "mgrow: error: write error: stdout is closed\n")


def test_closed_stdout_and_stderr_still_fail(trained):
    run = _shell(f"{MGROW} flops small.safetensors --json >&- 2>&-", trained)
    assert run.returncode == 1


def test_an_error_on_a_closed_stdout_keeps_its_own_line(trained):
    run = _shell(f"{MGROW} flops missing.safetensors --json >&-", trained)
    assert run.returncode == 2
    assert run.stderr == "mgrow: error: missing.safetensors: no such file\n"


def test_file_product_on_a_closed_stdout_succeeds(trained, tmp_path):
    out = tmp_path / "plain.safetensors"
    run = _shell(f"{MGROW} export small.safetensors -o {out} >&-", trained)
    assert (run.returncode, run.stderr) == (0, "")
    assert load(out).manifest.lineage.operation == "export"


# -- default names, chosen under the lock ---------------------------------------------------

def _copy_members(trained: Path, d: Path) -> tuple[Path, Path]:
    for name in ("small.safetensors", "sib.safetensors"):
        (d / name).write_bytes((trained / name).read_bytes())
    return d / "small.safetensors", d / "sib.safetensors"


def test_two_fuses_at_once_get_two_names(trained, tmp_path):
    a, b = _copy_members(trained, tmp_path)
    runs = [subprocess.Popen([sys.executable, "-m", "mgrow", "fuse", a.name, b.name],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            for _ in range(2)]
    done = [p.communicate(timeout=300) + (p.returncode,) for p in runs]
    assert [rc for _, _, rc in done] == [0, 0], [err for _, err, _ in done]
    wrote = sorted(out.split()[1] for out, _, _ in done)
    assert wrote == ["small-grown-2.safetensors", "small-grown.safetensors"]
    for name in wrote:
        assert load(tmp_path / name).manifest.lineage.operation == "fuse"


def test_fuse_default_name_skips_a_name_being_written(trained, tmp_path):
    a, b = _copy_members(trained, tmp_path)
    with writer_lock(tmp_path / "small-grown.safetensors"):  # another process holds it
        r = run_cli("fuse", a, b)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'small-grown-2.safetensors'} ")
    assert not (tmp_path / "small-grown.safetensors").exists()


def test_sibling_default_name_skips_a_name_being_written(trained, tmp_path):
    a, _ = _copy_members(trained, tmp_path)
    with writer_lock(tmp_path / "small-sibling.safetensors"):
        r = run_cli("train-sibling", a, *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'small-sibling-2.safetensors'}: ")
    assert not (tmp_path / "small-sibling.safetensors").exists()


# -- one dtype per bundle -----------------------------------------------------------------

def _dtypes(path: Path) -> set[str]:
    with safetensors.safe_open(path, "pt") as f:
        return {str(f.get_tensor(k).dtype).removeprefix("torch.") for k in f.keys()}


def _to_float64_on_disk(src: Path, dst: Path) -> Path:
    with safetensors.safe_open(src, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file({k: v.double() if v.is_floating_point() else v
                                 for k, v in tensors.items()}, dst, metadata=meta)
    assert _dtypes(dst) == {"float64", "int64"}
    return dst


def test_fuse_of_a_float64_member_writes_one_float_dtype(trained, tmp_path):
    b64 = _to_float64_on_disk(trained / "sib.safetensors", tmp_path / "sib64.safetensors")
    out = tmp_path / "g.safetensors"
    r = run_main("fuse", trained / "small.safetensors", b64, "-o", out)
    assert r.returncode == 0, r.stderr
    assert _dtypes(out) == {"float32", "int64"}


ARCH = ArchSpec(name="wrn-10-1", num_classes=10, in_channels=1, input_size=8)


def test_every_writer_saves_float32(tmp_path):
    """bundle.save is the root: a member held in float64 in memory (the Python API), a
    float64 or float16 model, int32 counters: the file holds float32 and int64 alone."""
    a = make_bundle(tmp_path / "a.safetensors", ARCH, seed=0)
    b = make_bundle(tmp_path / "b.safetensors", ARCH, seed=1)
    b64 = dataclasses.replace(b, tensors={k: v.double() if v.is_floating_point() else v
                                          for k, v in b.tensors.items()})
    grown = fuse([a, b64])
    save(tmp_path / "g.safetensors", grown.manifest, grown.tensors)
    assert _dtypes(tmp_path / "g.safetensors") == {"float32", "int64"}
    man = Manifest(arch=ARCH, lineage=Lineage(operation="init"), mixing=None)
    for dtype in (torch.float64, torch.float16):
        model = build(ARCH, None, seed=2).to(dtype)
        path = save_model(tmp_path / f"{dtype}.safetensors", man, model)
        assert _dtypes(path) == {"float32", "int64"}
        for k, v in load(path).tensors.items():  # the values: exact in float32
            assert torch.equal(v.double(), model.state_dict()[k].double()), k
    counters = {k: v.int() if k.endswith("num_batches_tracked") else v
                for k, v in build(ARCH, None, seed=3).state_dict().items()}
    path = save(tmp_path / "c.safetensors", man, counters)
    assert _dtypes(path) == {"float32", "int64"}
    assert path.read_bytes() == save(tmp_path / "d.safetensors", man,
                                     load(path).tensors).read_bytes()
