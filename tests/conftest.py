"""Shared fixtures: real CIFAR-10 images, small bundles on disk, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
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
    """Run the real `mgrow` CLI in a subprocess and return the completed process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mgrow", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
