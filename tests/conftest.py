"""Shared fixtures: real CIFAR-10 images, small bundles on disk, two CLI runners."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mgrow.arch import build
from mgrow.bundle import load, save_model
from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec

# Under pytest-xdist each worker gets an equal share of the cores, and so do the mgrow
# processes its tests start (they inherit OMP_NUM_THREADS): two workers of two threads each
# on two cores spend their time spinning against each other (measured: CPU time doubled).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def cifar_batch() -> torch.Tensor:
    """Return 32 real CIFAR-10 test images, normalised, (32, 3, 32, 32)."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    with np.load(CIFAR / "test.npz") as f:
        images = f["images"][::313][:32]  # spread over the class-ordered test set
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


@pytest.fixture(scope="session")
def cifar_256():
    """256 real CIFAR-10 training images, loaded once (the data-driven growth tests)."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    from mgrow.data import DataSource
    return DataSource(f"npz:{CIFAR}", subset=256).load()


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A real CIFAR-10 folder of 300 training and 200 test images (npz layout)."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    d = tmp_path_factory.mktemp("tiny_cifar")
    with np.load(CIFAR / "train_1.npz") as f:
        np.savez(d / "train_1.npz", images=f["images"][:300], labels=f["labels"][:300])
    with np.load(CIFAR / "test.npz") as f:
        pick = np.arange(0, 10000, 50)  # 20 per class
        np.savez(d / "test.npz", images=f["images"][pick], labels=f["labels"][pick])
    return d


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An image folder of real photographs (examples/image_folder.py): 120 training and 40
    validation CIFAR-10 images upscaled to random sizes (shorter side 24-72 px) and aspect
    ratios (1:2 to 2:1), saved as JPEG in train/CLASS/ and val/CLASS/."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    import importlib.util
    spec = importlib.util.spec_from_file_location("image_folder",
                                                  ROOT / "examples/image_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_image_folder(tmp_path_factory.mktemp("photos"), 120, 40, min_side=24,
                                 max_side=72, cifar=CIFAR)


@pytest.fixture(scope="session")
def digits_200(tmp_path_factory) -> Path:
    """A wrn-10-1 trained one epoch (batches of 50) on 200 of the 1,437 digits training
    images, trained once for the files that read it; copy it before changing it."""
    from mgrow.data import DataSource
    from mgrow.engine import TrainConfig
    from mgrow.phases import train_new
    path = tmp_path_factory.mktemp("digits_200") / "small.safetensors"
    cfg = TrainConfig(epochs=1, batch_size=50, device="cpu", eval_every_epoch=False)
    train_new("wrn-10-1", DataSource("digits", subset=200), cfg, path, progress="quiet")
    return path


def randomize_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BN layer non-trivial statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def make_bundle(path: Path, arch: ArchSpec, mixing: MixingSpec | None = MixingSpec(),
                seed: int = 0, **manifest_fields):
    """Write a freshly initialised bundle (norms randomised) and return it loaded."""
    model = randomize_norms(build(arch, mixing, seed=seed), seed)
    man = Manifest(arch=arch, mixing=mixing, lineage=Lineage(operation="init"),
                   **manifest_fields)
    return load(save_model(path, man, model))


@pytest.fixture(autouse=True, scope="module")
def _return_freed_memory():
    """After each test file, hand the heap it freed back to the system: an xdist worker
    runs many files, and glibc keeps what a large one freed (torch's big tensors are
    mmap'd and go back anyway; the many small ones are not)."""
    yield
    import ctypes
    import ctypes.util
    import gc
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and hasattr(ctypes.CDLL(name), "malloc_trim"):
        ctypes.CDLL(name).malloc_trim(0)


def pytest_terminal_summary(terminalreporter) -> None:
    """Report the suite's peak resident memory: this process (VmHWM) and its largest child."""
    import re
    import resource
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return
    own = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    terminalreporter.write_line(f"peak resident memory: {own / 1e9:.2f} GB in the test "
                                f"process, {child / 1e9:.2f} GB in its largest child")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """Run the real `mgrow` CLI in a subprocess and return the completed process.

    For tests of the process itself: signals, a closed stdout, processes running at once,
    what the interpreter does at start or exit. Other tests use run_main (4 s faster a call).
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mgrow", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_main(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """Run the `mgrow` entry point (mgrow.cli.main) in this process as `python -m mgrow ARGS`
    run in `cwd` (by run_cli) would run, and return what that process would have: the exit
    status, stdout and stderr, as text.

    The same sys.argv and working folder; stdout and stderr caught at their file descriptors
    (what C code or a data-loader worker writes is caught too), neither a terminal; warnings
    ignored, as run_cli ignores them; `env`: variables set for this run only. A fresh
    interpreter spends about 4 s importing torch (and, at the first op, torch._dynamo); this
    spends none. Whatever main() and the command change in this process is put back after:
    the signal handlers, torch's global RNG and thread count, the environment, the working
    folder, sys.argv and the standard streams.
    """
    from mgrow.cli import main
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_streams, threads = (sys.stdout, sys.stderr), torch.get_num_threads()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stream in saved_streams:
            stream.flush()
        saved_fds = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        # what the interpreter of `python -m mgrow` puts there when stdout is a pipe
        sys.stdout, sys.stderr = ours = (open(1, "w", closefd=False),
                                         open(2, "w", errors="backslashreplace", closefd=False))
        try:
            os.environ.update(env or {})
            sys.argv = ["mgrow", *map(str, args)]
            if cwd is not None:
                os.chdir(cwd)
            code = _exit_status(main)
        finally:
            for stream in {*ours, sys.stdout, sys.stderr}:  # main may have replaced ours
                with contextlib.suppress(OSError, ValueError):
                    stream.close()  # flushed; the descriptor stays open (closefd=False)
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            sys.stdout, sys.stderr = saved_streams
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            if os.environ != saved_env:
                os.environ.clear()
                os.environ.update(saved_env)
            for s, handler in saved_signals.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(s, handler)
            torch.set_num_threads(threads)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["mgrow", *map(str, args)], code,
                                           _as_text(out.read()), _as_text(err.read()))


def _exit_status(main) -> int:
    """Call main() and return the exit status a process ending in it would have."""
    try:
        main()
    except SystemExit as e:  # as the interpreter ends on it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:  # an uncaught exception: its traceback and status 1
        traceback.print_exc()
        return 1
    return 0


def _as_text(data: bytes) -> str:
    """Decode captured output as subprocess.run(text=True) does (universal newlines)."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")
