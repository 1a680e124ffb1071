"""Helpers of the reliability suite: run the real CLI, snapshot folders, the error contract.

The contract every refused command must keep: a non-zero exit, exactly one line on stderr,
`mgrow: error: ...` naming the problem, no traceback, and every watched folder exactly as
it was (no output, no partial or temporary file).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import runpy
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

# Small and fast: template-mixed wrn-10-1 on the built-in digits (8x8 grey, 10 classes);
# 64 images at batch 16 make 4 steps an epoch, each a checkpoint.
TRAIN = ("--arch", "wrn-10-1", "--data", "digits", "--subset", "64", "--batch-size", "16",
         "-q")
# One thread: the comparisons are between runs of the same environment, and the suite
# should leave a 2-core CI machine (or a shared one) usable.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Run:
    rc: int
    out: str
    err: str


# -- running the CLI ------------------------------------------------------------------------

def mgrow_exec(*args: object, cwd: Path, timeout: float = 120) -> Run:
    """Run `python -m mgrow ARGS` in a fresh interpreter (warnings not silenced)."""
    return Fresh(args, cwd).finish(timeout)


def mgrow(*args: object, cwd: Path, timeout: float = 120, memory_headroom: int | None = None,
          env: dict[str, str] | None = None) -> Run:
    """Run the CLI entry point (`python -m mgrow ARGS`) in a child process, quickly.

    The child is forked from a server that has already imported torch and mgrow (and run
    no torch op), so a case costs a fork instead of a 2-3 s interpreter start; argument
    parsing, `main()`, signal handling, stdout, stderr and the exit status are the real
    ones. Cases that depend on a fresh interpreter (warnings, imports) use `mgrow_exec`.

    memory_headroom: cap the child's address space (RLIMIT_AS) at what it has mapped plus
    this many bytes, as `ulimit -v` would, so a large allocation fails for real.
    env: environment variables set in the child only.
    """
    return Forked(args, cwd, memory_headroom, env).finish(timeout)


class Fresh:
    """`python -m mgrow ARGS` started in a fresh interpreter."""

    def __init__(self, args, cwd: Path):
        self.p = subprocess.Popen([sys.executable, "-m", "mgrow", *map(str, args)], cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **ENV})
        self.pid = self.p.pid

    def poll(self) -> int | None:
        return self.p.poll()

    def finish(self, timeout: float = 120) -> Run:
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            raise
        return Run(self.p.returncode, out, err)


class Forked:
    """The CLI entry point run in a child forked from the preloaded server (see mgrow)."""

    def __init__(self, args, cwd: Path, memory_headroom: int | None = None,
                 env: dict[str, str] | None = None):
        ctx = _forkserver()
        self.logs = tempfile.TemporaryDirectory(prefix="mgrow-run-")
        self.out, self.err = Path(self.logs.name, "out"), Path(self.logs.name, "err")
        saved = {k: os.environ.get(k) for k in ENV}
        os.environ.update(ENV)  # inherited by the server when this call starts it
        try:
            self.p = ctx.Process(target=_child, args=([str(a) for a in args], str(cwd),
                                                      str(self.out), str(self.err),
                                                      memory_headroom, env))
            self.p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.pid = self.p.pid

    def poll(self) -> int | None:
        return self.p.exitcode

    def finish(self, timeout: float = 120) -> Run:
        self.p.join(timeout)
        if self.p.exitcode is None:
            self.p.kill()
            self.p.join()
            raise TimeoutError(f"still running after {timeout} s")
        try:
            return Run(self.p.exitcode, self.out.read_text(), self.err.read_text())
        finally:
            self.logs.cleanup()


def _child(args: list[str], cwd: str, out: str, err: str,
           memory_headroom: int | None = None, env: dict[str, str] | None = None) -> None:
    """In a forked child: run `mgrow/__main__.py` as `python -m mgrow` would, then exit."""
    os.chdir(cwd)
    os.environ.update(env or {})
    if memory_headroom is not None:
        import resource
        mapped = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())
                     .group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_headroom,) * 2)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["mgrow", *args]
    try:
        runpy.run_module("mgrow", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:  # as the interpreter does at exit
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@functools.cache
def _forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo too: torch imports it at the first op on a meta tensor (every bundle
    # load sizes its net there), about 2 s each child would spend again
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "safetensors.torch", "mgrow.cli",
                                "mgrow.phases", "mgrow.growth", "mgrow.convert",
                                "mgrow.flops"])
    return ctx


# -- the contract ---------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple]:
    """Return every entry under `folder` (hidden ones included) with its type, size, inode
    and modification time: any write, truncation or replacement (rename) changes one."""
    return {str(p.relative_to(folder)): (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) for st in [p.lstat()]}


def watch(*folders: Path) -> dict[Path, dict[str, tuple]]:
    """Return the snapshots of `folders`, to compare after a command with `assert_refused`."""
    return {Path(f): snapshot(f) for f in folders}


def assert_one_line_error(run: Run, match: str) -> str:
    """Assert a non-zero exit and exactly one `mgrow: error:` line on stderr matching `match`."""
    assert run.rc != 0, f"exit 0; stdout: {run.out!r}"
    assert "Traceback" not in run.err + run.out, run.err
    lines = run.err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {run.err!r}"
    assert lines[0].startswith("mgrow: error: "), lines[0]
    assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
    return lines[0]


def assert_refused(run: Run, before: dict[Path, dict[str, tuple]], match: str) -> str:
    """The whole contract: one-line error (see above) and every watched folder unchanged."""
    line = assert_one_line_error(run, match)
    after = {f: snapshot(f) for f in before}
    for folder, entries in before.items():
        added = sorted(set(after[folder]) - set(entries))
        removed = sorted(set(entries) - set(after[folder]))
        changed = sorted(k for k, v in entries.items() if after[folder].get(k, v) != v)
        assert not (added or removed or changed), \
            f"{folder} changed: added {added}, removed {removed}, changed {changed}"
    return line


def temps(folder: Path) -> list[str]:
    """Return the names of the temporary files write_atomic makes (`.NAME.XXXXXXXX.tmp`)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(".") and p.name.endswith(".tmp"))


# -- bundles and damaged copies -------------------------------------------------------------

def digits_arch(**update):
    """The architecture of a wrn-10-1 for the digits data (1 channel, 8 x 8, 10 classes)."""
    from mgrow.manifest import ArchSpec
    return ArchSpec(**{"name": "wrn-10-1", "num_classes": 10, "in_channels": 1,
                       "input_size": 8, **update})


@functools.cache
def digits_spec():
    from mgrow.data import load_data
    return load_data("digits").spec


def write_bundle(path: Path, arch=None, mixing="default", data="digits", phases=(),
                 seed: int = 0) -> Path:
    """Write an initialised (untrained) bundle; `data="digits"` records the digits data."""
    from mgrow.arch import build
    from mgrow.bundle import save_model
    from mgrow.manifest import Lineage, Manifest, MixingSpec
    arch = arch or digits_arch()
    mixing = MixingSpec() if mixing == "default" else mixing
    data = digits_spec() if data == "digits" else data
    man = Manifest(arch=arch, mixing=mixing, data=data, phases=tuple(phases),
                   lineage=Lineage(operation="train", options={"seed": seed}))
    return save_model(path, man, build(arch, mixing, seed=seed))


def with_manifest(src: Path, dst: Path, edit) -> Path:
    """Copy bundle `src` to `dst` with its manifest JSON edited in place by `edit(raw)`."""
    from mgrow.bundle import META_KEY, load
    b = load(src)
    raw = json.loads(b.manifest.to_json())
    edit(raw)
    return with_tensors(b.tensors, dst, {META_KEY: json.dumps(raw)})


def with_tensors(tensors: dict[str, torch.Tensor], dst: Path, metadata: dict | None) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, dst,
                                metadata=metadata)
    return dst


def with_header(src: Path, dst: Path, edit) -> Path:
    """Copy a safetensors file with its JSON header edited by `edit(header)` (offsets kept)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    edit(head)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return dst
