"""GradMax and Firefly (`fuse --method gradmax|firefly`) on real CIFAR-10: what each promises."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgrow import MgrowError
from mgrow.growth import datadriven as dg
from mgrow.arch import build
from mgrow.bundle import Bundle, load
from mgrow.flops import forward_flops, ledger
from mgrow.growth import Job, fuse
from mgrow.phases import fuse_files
from mgrow.growth.grid import block_sources, common, grid_size, head_name, plain_state
from mgrow.manifest import ArchSpec
from mgrow.data import DataSource

from conftest import CIFAR, make_bundle, run_cli

# the paper's (and GradMax's) CIFAR WRN: BN only before each block
ARCH = ArchSpec(name="wrn-10-2", width=0.5, norm="block")
BATCH, STEPS = 32, 2


@pytest.fixture(scope="module")
def data():
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    return DataSource(f"npz:{CIFAR}", subset=256).load()


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("dg") / "a.safetensors", ARCH, seed=1)


def _model(grown) -> torch.nn.Module:
    return Bundle(grown.manifest, grown.tensors, Path("grown"), "").model()


def _batches(data):
    stream = dg._batches(data, BATCH, 0)  # the batches fuse used (seed 0)
    return [next(stream) for _ in range(STEPS)]


def _fanout_grad_norms(model, pairs, batches) -> dict[str, float]:
    """Return, per pair, the norm of the loss gradient w.r.t. the new units' zero fan-out
    tile in C (training mode, summed over the batches), measured by autograd."""
    probe = copy.deepcopy(model).train()
    for m in probe.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    total = {}
    for x, y in batches:
        probe.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        for l_name, c_name in pairs:
            o_c = probe.get_submodule(c_name).weight.shape[0] // 2
            o_l = probe.get_submodule(l_name).weight.shape[0] // 2
            g = probe.get_submodule(c_name).weight.grad[:o_c, o_l:]
            total[c_name] = total.get(c_name, 0) + g
    return {k: float(v.norm()) for k, v in total.items()}


def test_gradmax_preserves_function_and_beats_random_directions(member, data, cifar_batch):
    grown = fuse([member], method="gradmax", data=data, batch_size=BATCH,
                 steps=STEPS)
    model = _model(grown)
    assert grown.manifest.mixing is None and grown.manifest.arch == ARCH.widened(2)
    with torch.no_grad():
        assert torch.allclose(model.eval()(cifar_batch), member.model().eval()(cifar_batch),
                              rtol=1e-5, atol=1e-5)
    pairs = list(dg.find_pairs(model, ARCH.widened(2)))
    assert len(pairs) == 3  # conv1 -> conv2 of each block; stream channels are no pair
    batches = _batches(data)
    chosen = _fanout_grad_norms(model, pairs, batches)
    gen = torch.Generator().manual_seed(0)
    for trial in range(2):  # random directions, each new row at the GradMax row's norm
        rand = copy.deepcopy(model)
        with torch.no_grad():
            for l_name, _ in pairs:
                w = rand.get_submodule(l_name).weight
                o = w.shape[0] // 2
                norms = w[o:].flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                w[o:] = dg._unit(torch.randn(w[o:].shape, generator=gen)) * norms
        random = _fanout_grad_norms(rand, pairs, batches)
        for c_name in chosen:
            assert chosen[c_name] > 1.3 * random[c_name], (c_name, chosen, random)


def test_firefly_keeps_the_candidates_that_decrease_the_loss_more(member, data):
    skeleton = build(ARCH.widened(2), member.manifest.mixing.model_copy(
        update={"factor": 2}), meta=True)
    job = Job([member], skeleton, ARCH.widened(2), member.manifest.mixing, "orthogonal", 0.1,
              torch.Generator().manual_seed(0), 0)
    state = plain_state(member)
    srcs = block_sources(grid_size(job.skeleton), 1)
    wide = dg.widen(job, state, common([state], job.skeleton, srcs, head_name(job.skeleton)))
    batches = _batches(data)
    probe = dg._probe(wide)
    kinds = [dg.candidates(wide, kind, 0.1, job.gen) for kind in ("split", "new")]
    for cand in kinds:
        dg.optimise(wide, cand, batches, probe)
    kept, rejected = dg.select(wide, *kinds), dg.select(wide, *kinds, keep_best=False)
    first_order = {c.kind: sum(float(c.decrease(cn).sum()) for _, cn in wide.pairs)
                   for c in (kept, rejected)}
    assert first_order["kept"] > first_order["rejected"] > -1e-9
    with torch.no_grad():
        zero = {k: torch.zeros_like(v) for k, v in kept.eps.items()}
        measured = {name: sum(float(dg.loss_with(probe, dg.weights(wide, c, eps), b))
                              for b in batches) for name, c, eps in
                    (("kept", kept, None), ("rejected", rejected, None), ("none", kept, zero))}
    assert measured["kept"] < measured["rejected"] < measured["none"] + 1e-6, measured
    assert measured["none"] - measured["kept"] > 2 * (measured["none"] - measured["rejected"])


def test_firefly_grown_net_starts_below_the_members_loss(member, data):
    grown = fuse([member], method="firefly", data=data, batch_size=BATCH,
                 steps=STEPS)
    assert grown.notes and "firefly kept" in grown.notes[0]
    x, y = _batches(data)[0]
    with torch.no_grad():
        wide = F.cross_entropy(_model(grown).train()(x), y)
        small = F.cross_entropy(member.model().train()(x), y)
    assert float(wide) < float(small)


@pytest.mark.parametrize("method,passes", [("gradmax", 1), ("firefly", 2)])
def test_growth_step_is_a_ledger_phase(member, data, method, passes):
    grown = fuse([member], method=method, data=data, batch_size=BATCH,
                 steps=STEPS)
    phase = grown.manifest.phases[-1]
    images = passes * STEPS * BATCH
    fwd = forward_flops(ARCH.widened(2))
    assert (phase.operation, phase.stage, phase.images) == ("fuse", "growth", images)
    assert phase.train_flops == 3 * fwd * images and phase.forward_flops == fwd
    led = ledger(grown.manifest.model_copy(update={"data": data.spec}))
    assert led["growth_flops"] == sum(p.train_flops for p in member.manifest.phases
                                      if p.stage == "growth") + phase.train_flops
    assert grown.manifest.lineage.options["growth_steps"] == STEPS


def test_cli_gradmax_reads_data_and_refuses_bad_input(member, tmp_path):
    out = tmp_path / "g.safetensors"
    r = run_cli("fuse", member.path, "-o", out, "--method", "gradmax", "--data",
                f"npz:{CIFAR}", "--batch-size", "8", "--growth-steps", "1", "--subset", "64")
    assert r.returncode == 0, r.stderr
    phase = load(out).manifest.phases[-1]
    assert phase.operation == "fuse" and phase.images == 8
    r = run_cli("fuse", member.path, member.path, "-o", tmp_path / "x.safetensors",
                "--method", "firefly", "--data", f"npz:{CIFAR}")
    assert r.returncode == 2 and "give only A" in r.stderr
    r = run_cli("fuse", member.path, "-o", tmp_path / "y.safetensors", "--method", "gradmax")
    assert r.returncode == 2 and "no data set" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y.safetensors").exists()


def test_every_architecture_grows_with_data(tmp_path, data):
    """ResNet and VGG pairs (and their stream channels) keep the function with GradMax."""
    for arch in (ArchSpec(name="resnet18", width=0.0625), ArchSpec(name="vgg11_bn", width=0.0625)):
        a = make_bundle(tmp_path / f"{arch.name}.safetensors", arch, seed=3)
        grown = fuse([a], method="gradmax", data=data, batch_size=8, steps=1)
        x = _batches(data)[0][0][:8]
        with torch.no_grad():
            assert torch.allclose(_model(grown).eval()(x), a.model().eval()(x),
                                  rtol=1e-4, atol=1e-4), arch.name
        assert dg.find_pairs(_model(grown), arch.widened(2))


def test_data_methods_refuse_without_data(member, tmp_path):
    with pytest.raises(MgrowError, match="gradmax reads training data; none was given"):
        fuse([member], method="gradmax")
    with pytest.raises(MgrowError, match="no data set: pass --data"):  # none recorded either
        fuse_files(member.path, None, tmp_path / "grown.safetensors", method="gradmax")
    assert not (tmp_path / "grown.safetensors").exists()


@pytest.mark.parametrize("dims,cols", [(12, 40), (40, 12), (25_088, 16)])
def test_gradmax_directions_are_the_top_singular_vectors(dims, cols):
    """GradMax's fan-in rows: the top left singular vectors of its statistic T, found by a
    thin SVD (a VGG classifier's 25,088 fan-in dims never make a dims x dims matrix), equal
    to the eigenvectors of T T^T where that is small enough to form."""
    from mgrow.growth.datadriven import top_directions
    t = torch.randn(dims, cols, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = 8
    rows = top_directions(t, None, n)
    assert rows.shape == (n, dims)
    torch.testing.assert_close(rows @ rows.T, torch.eye(n, dtype=t.dtype))
    s = torch.linalg.svdvals(t)
    torch.testing.assert_close((rows @ t).norm(dim=1) ** 2, s[:n] ** 2)  # ||x T||^2, top n
    if dims <= 100:
        values, vectors = torch.linalg.eigh(t @ t.T)
        top = vectors[:, -n:]
        torch.testing.assert_close(rows.T @ rows, top @ top.T)  # the same subspace
    assert len(top_directions(t[:, :3], None, n)) == 3  # no more directions than T's rank


def test_growth_batches_are_drawn_again_per_pass_not_held(data):
    """Firefly passes over its batches twice: each pass draws the same `steps` batches
    again (the seed's order) instead of keeping them all in memory."""
    steps = dg._Steps(data, BATCH, seed=3, steps=3)
    first, second = list(steps), list(steps)
    assert len(first) == 3 and all(len(y) == BATCH for _, y in first)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][1], first[1][1])  # a stream, not one batch repeated
    other = next(iter(dg._Steps(data, BATCH, seed=4, steps=1)))
    assert not torch.equal(other[1], first[0][1])
