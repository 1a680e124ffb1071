"""benchmarks/gpu_check.py, the one script a session with a GPU gets to run, works end to end:
its CPU smoke run (toy sizes, the same code) on real CIFAR-10, as the GPU machine runs it
(mgrow imported from the checkout, where it is not installed; --cifar naming the images)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import CIFAR, ROOT


def test_gpu_check_smoke_runs_every_section():
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--cifar",
                        str(CIFAR), "--workers", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    for section in ("(a) pytest -m cuda", "(b) wrn-10-1", "(c) fuse two", "(d) streamed"):
        assert section in out, out
    assert "real CIFAR-10 images" in out and "3 skipped" in out  # the CUDA tests, skipped here
    ratio = float(re.search(r"images/s mixed / plain: ([\d.]+)", out).group(1))
    assert 0.2 < ratio < 5
    err = float(re.search(r"max relative difference ([\d.e+-]+)", out).group(1))
    assert err < 1e-5  # CPU against CPU
    assert float(re.search(r"the loader alone: +([\d.]+) images/s", out).group(1)) > 0
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--cifar",
                        str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no CIFAR-10 npz files" in r.stderr
