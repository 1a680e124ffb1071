"""`fuse --bn-correct` fits every grown channel block against the member block its
statistics were carried from, by the map of whichever method built the grid (issue 24,
item 1): every method x grid (g = 2, 3, 4; one or two members; first growth and regrowth
of an odd grid)."""

from __future__ import annotations

import pytest
import torch

from mgrow.bundle import load, save
from mgrow.data import DataSource
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec

from conftest import CIFAR, make_bundle

ARCH = ArchSpec(name="wrn-10-1", width=0.25)
OPTIONS = {"mixture": {"init": "zero"}, "random": {}, "net2net": {"noise": 0.0},
           "gradmax": {"batch_size": 8, "steps": 1}, "firefly": {"batch_size": 8, "steps": 1}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Members A and B, and A B A: the two grown by 3 with zero init, saved."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    d = tmp_path_factory.mktemp("bnsrc")
    a = make_bundle(d / "a.safetensors", ARCH, seed=1)
    b = make_bundle(d / "b.safetensors", ARCH, seed=2)
    aba = fuse([a, b], factor=3, init="zero")
    return a, b, load(save(d / "aba.safetensors", aba.manifest, aba.tensors)), \
        DataSource(f"npz:{CIFAR}", subset=64).load()


def cases():
    for method in OPTIONS:
        for g in (2, 3, 4):
            yield method, g, "first", 1
            if method in ("mixture", "random"):
                yield method, g, "first", 2
        yield method, 2, "regrow", 1


def _norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.endswith((".running_mean", ".running_var"))}


@pytest.mark.parametrize("method, g, when, m", list(cases()))
def test_correction_uses_the_grids_own_block_map(bundles, method, g, when, m):
    a, b, aba, data = bundles
    members = [aba] if when == "regrow" else [a, b][:m]
    kwargs = {**OPTIONS[method], "method": method, "factor": g, "seed": 3}
    if method in ("gradmax", "firefly"):
        kwargs["data"] = data
    raw = fuse(members, **kwargs)
    states = [member.model().state_dict() for member in members]
    # the map is the one the carried statistics were assembled by
    for key, grown in _norms(raw.tensors).items():
        size = grown.shape[0] // len(raw.sources)
        if method in ("gradmax", "firefly") and key.endswith("running_var"):
            continue  # new units' statistics are the method's own (copies of A's units)
        carried = torch.cat([states[i][key].reshape(-1, size)[k] for i, k in raw.sources])
        assert torch.equal(grown, carried), key
    # where new tiles add nothing to what a channel sees, the correction changes nothing:
    # every block of Net2Net without noise; the carried blocks of zero-init mixture (its new
    # blocks see all-zero weights, and their fitted statistics are those of a zero input)
    if method in ("net2net", "mixture"):
        fixed = fuse(members, **kwargs, bn_correct=True)
        live = len(raw.sources) if method == "net2net" else 3 if when == "regrow" else m
        for key, value in _norms(raw.tensors).items():
            size = value.shape[0] // len(raw.sources)
            old, new = value[:live * size], fixed.tensors[key][:live * size]
            rel = (new - old).norm() / old.norm().clamp_min(1e-12)
            assert rel < 1e-3, (key, float(rel))
