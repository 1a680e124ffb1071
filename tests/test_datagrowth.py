"""GradMax and Firefly (`fuse --method gradmax|firefly`) on real CIFAR-10: the growth step as
a ledger phase, the CLI, every architecture, refusals. What each method promises is in
tests/test_baselines.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.bundle import Bundle, load
from mgrow.flops import forward_flops, ledger
from mgrow.growth import fuse
from mgrow.growth.firefly import OVERGROW
from mgrow.growth.gradmax import singular
from mgrow.growth.units import Steps, find_groups
from mgrow.phases import fuse_files
from mgrow.manifest import ArchSpec

from conftest import CIFAR, make_bundle, run_main

# the paper's (and GradMax's) CIFAR WRN: BN only before each block
ARCH = ArchSpec(name="wrn-10-2", width=0.5, norm="block")
BATCH, STEPS = 32, 2


@pytest.fixture(scope="module")
def data(cifar_256):
    return cifar_256


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("dg") / "a.safetensors", ARCH, seed=1)


def _model(grown) -> torch.nn.Module:
    return Bundle(grown.manifest, grown.tensors, Path("grown"), "").model()


def _batches(data):
    return list(Steps(data, BATCH, 0, STEPS))  # the batches fuse used (seed 0)


@pytest.mark.parametrize("method,passes", [("gradmax", 1), ("firefly", 2)])
def test_growth_step_is_a_ledger_phase(member, data, method, passes):
    grown = fuse([member], method=method, data=data, batch_size=BATCH,
                 steps=STEPS)
    phase = grown.manifest.phases[-1]
    images = passes * STEPS * BATCH
    # gradmax: one pass of the wide net; firefly: two of A over-grown by 2 x the new units
    fwd = forward_flops(ARCH.widened(2 if method == "gradmax" else 1 + OVERGROW))
    assert (phase.operation, phase.stage, phase.images) == ("fuse", "growth", images)
    assert phase.train_flops == 3 * fwd * images and phase.forward_flops == fwd
    led = ledger(grown.manifest.model_copy(update={"data": data.spec}))
    assert led["growth_flops"] == sum(p.train_flops for p in member.manifest.phases
                                      if p.stage == "growth") + phase.train_flops
    assert grown.manifest.lineage.options["growth_steps"] == STEPS


def test_cli_gradmax_reads_data_and_refuses_bad_input(member, tmp_path):
    out = tmp_path / "g.safetensors"
    r = run_main("fuse", member.path, "-o", out, "--method", "gradmax", "--data",
                 f"npz:{CIFAR}", "--batch-size", "8", "--growth-steps", "1", "--subset", "64")
    assert r.returncode == 0, r.stderr
    phase = load(out).manifest.phases[-1]
    assert phase.operation == "fuse" and phase.images == 8
    r = run_main("fuse", member.path, member.path, "-o", tmp_path / "x.safetensors",
                 "--method", "firefly", "--data", f"npz:{CIFAR}")
    assert r.returncode == 2 and "give only A" in r.stderr
    r = run_main("fuse", member.path, "-o", tmp_path / "y.safetensors", "--method", "gradmax")
    assert r.returncode == 2 and "no data set" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y.safetensors").exists()


def test_every_architecture_grows_with_data(tmp_path, data):
    """ResNet and VGG channel groups keep the function with GradMax (exactly at eps 0: zero
    fan-in or zero fan-out everywhere) and grow with Firefly."""
    for arch in (ArchSpec(name="resnet18", width=0.0625), ArchSpec(name="vgg11_bn", width=0.0625)):
        a = make_bundle(tmp_path / f"{arch.name}.safetensors", arch, seed=3)
        grown = fuse([a], method="gradmax", data=data, batch_size=8, steps=1, noise=0.0)
        x = _batches(data)[0][0][:8]
        with torch.no_grad():
            assert torch.allclose(_model(grown).eval()(x), a.model().eval()(x),
                                  rtol=1e-4, atol=1e-4), arch.name
        wide = arch.widened(2)
        assert find_groups(build(wide), (3, wide.input_size, wide.input_size))
        assert "firefly kept" in fuse([a], method="firefly", data=data, batch_size=8,
                                      steps=1).notes[0]


def test_data_methods_refuse_without_data(member, tmp_path):
    with pytest.raises(MgrowError, match="gradmax reads training data; none was given"):
        fuse([member], method="gradmax")
    with pytest.raises(MgrowError, match="no data set: pass --data"):  # none recorded either
        fuse_files(member.path, None, tmp_path / "grown.safetensors", method="gradmax")
    assert not (tmp_path / "grown.safetensors").exists()


@pytest.mark.parametrize("dims,cols", [(12, 40), (40, 12), (25_088, 16)])
def test_gradmax_directions_are_the_top_singular_vectors(dims, cols):
    """GradMax's directions: the top left (fan-in) or right (fan-out) singular vectors of
    its statistic M, found from the smaller Gram matrix (a VGG classifier's 25,088 fan-in
    dims never make a dims x dims matrix), at most M's rank of them."""
    m = torch.randn(dims, cols, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = 8
    s = torch.linalg.svdvals(m)
    for side, size, apply in (("in", dims, lambda r: r @ m), ("out", cols, lambda r: m @ r.T)):
        rows = singular(m, n, side).double()
        assert rows.shape == (n, size)
        torch.testing.assert_close(rows @ rows.T, torch.eye(n, dtype=m.dtype))
        gains = apply(rows).norm(dim=0 if side == "out" else 1) ** 2
        torch.testing.assert_close(gains, s[:n] ** 2, rtol=1e-4, atol=1e-6)  # top n
    assert len(singular(m[:, :3], n, "in")) == 3  # no more directions than M's rank
    assert len(singular(m[:3], n, "out")) == 3


def test_growth_batches_are_drawn_again_per_pass_not_held(data):
    """Firefly passes over its batches twice: each pass draws the same `steps` batches
    again (the seed's order) instead of keeping them all in memory."""
    steps = Steps(data, BATCH, seed=3, steps=3)
    first, second = list(steps), list(steps)
    assert len(first) == 3 and all(len(y) == BATCH for _, y in first)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][1], first[1][1])  # a stream, not one batch repeated
    other = next(iter(Steps(data, BATCH, seed=4, steps=1)))
    assert not torch.equal(other[1], first[0][1])
