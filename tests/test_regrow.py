"""Growing a grown bundle again (0.25 -> 0.5 -> 1 width) with every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.bundle import load, save
from mgrow.flops import param_counts
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec, Phase
from mgrow.mixing import mixed_layers
from mgrow.data import DataSource

from conftest import CIFAR, make_bundle, run_main

ARCH = ArchSpec(name="wrn-10-2", width=0.25)
PHASE = Phase(operation="train", arch="x", stage="base", images=10, forward_flops=1,
              train_flops=30, wall_s=0, device="cpu")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("regrow")
    a = make_bundle(d / "a.safetensors", ARCH, seed=1, phases=(PHASE,))
    b = make_bundle(d / "b.safetensors", ARCH, seed=2, phases=(PHASE,))
    return a, b, d


@pytest.fixture(scope="module")
def source():
    """64 real CIFAR-10 training images, loaded once (the data gradmax and firefly read)."""
    if not CIFAR.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR}")
    return DataSource(f"npz:{CIFAR}", subset=64).load()


def _saved(grown, path: Path):
    return load(save(path, grown.manifest, grown.tensors))


def _logits(bundle_or_model, x):
    model = bundle_or_model.model() if hasattr(bundle_or_model, "model") else bundle_or_model
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("tiling", ["vertical", "horizontal"])
def test_zero_init_stays_exact_through_two_growths(members, cifar_batch, tiling):
    a, b, d = members
    half = _saved(fuse([a, b], init="zero", tiling=tiling), d / f"half-{tiling}.safetensors")
    full = fuse([half], init="zero", tiling=tiling)
    assert full.manifest.arch.width == 1.0
    assert full.manifest.mixing.factor == 4 and full.manifest.mixing.members == 2
    mean = (_logits(a, cifar_batch) + _logits(b, cifar_batch)) / 2
    out = _logits(load(save(d / f"full-{tiling}.safetensors", full.manifest, full.tensors)),
                  cifar_batch)
    assert torch.allclose(out, _logits(half, cifar_batch), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, mean, rtol=1e-5, atol=1e-5)
    # the previous grid is carried bit-equal: every tile of the half net's layers
    before, after = mixed_layers(half.model()), mixed_layers(_model(full))
    for name, layer in before.items():
        w = layer.weight().detach()
        assert torch.equal(after[name].weight().detach()[:w.shape[0], :w.shape[1]], w), name


def _model(grown):
    from mgrow.bundle import Bundle
    return Bundle(grown.manifest, grown.tensors, Path("g"), "").model()


def test_parameter_count_through_two_growths(members):
    a, b, d = members
    half = _saved(fuse([a, b]), d / "half-count.safetensors")
    full = fuse([half])  # without a sibling: the same banks, a 4 x 4 grid of coefficients
    banks = sum(t.numel() for k, t in a.tensors.items() if k.startswith("banks."))
    for grown, g in ((half.manifest, 2), (full.manifest, 4)):
        tensors = half.tensors if g == 2 else full.tensors
        counts = param_counts(tensors, grown.arch, grown.mixing)
        assert counts["templates"] == 2 * banks  # growth adds no templates, ever
        layers = mixed_layers(build(grown.arch, grown.mixing, meta=True))
        t = {n: l.alpha.shape[-1] for n, l in layers.items()}
        grids = {n: l.grid for n, l in layers.items()}
        assert counts["coefficients"] == sum(grids[n][0] * grids[n][1] * t[n] for n in t)
        assert grids["blocks.0.conv1"] == (g, g) and grids["fc"] == (1, g)
        assert counts["plain_equivalent"] == sum(
            p.numel() for p in build(ARCH.widened(g)).parameters())
        def norms(t: dict) -> int:
            return sum(v.numel() for k, v in t.items() if (".bn" in k or k.startswith("bn."))
                       and k.endswith(("weight", "bias")))
        assert counts["norms"] == norms(tensors) == g * norms(a.tensors)
    assert [p.stage for p in full.manifest.phases] == ["base", "growth"]  # the ledger goes on
    assert len(full.manifest.lineage.history) == len(half.manifest.lineage.history) + 1


@pytest.mark.parametrize("method", ["net2net", "gradmax"])
def test_function_preserving_methods_preserve_through_two_growths(members, cifar_batch,
                                                                  source, method):
    a, _, d = members
    options = {"noise": 0.0} if method == "net2net" else {
        "data": source, "batch_size": 8, "steps": 1}
    half = _saved(fuse([a], method=method, **options), d / f"half-{method}.safetensors")
    full = fuse([half], method=method, **options)
    assert full.manifest.arch == ARCH.widened(4) and full.manifest.mixing is None
    assert torch.allclose(_logits(_model(full), cifar_batch), _logits(a, cifar_batch),
                          rtol=1e-4, atol=1e-4)
    counts = param_counts(full.tensors, full.manifest.arch, None)
    assert counts["total"] == counts["plain_equivalent"] == sum(
        p.numel() for p in build(ARCH.widened(4)).parameters())
    stages = [p.operation for p in full.manifest.phases]
    assert stages == ["train"] + (["fuse", "fuse"] if method == "gradmax" else [])


@pytest.mark.parametrize("first,second", [
    ({"method": "mixture"}, {"method": "random"}),
    ({"method": "mixture", "sibling": False}, {"method": "mixture"}),
    ({"method": "random"}, {"method": "firefly"}),
    ({"method": "firefly"}, {"method": "net2net"}),
    ({"method": "mixture"}, {"method": "gradmax"}),
])
def test_every_method_grows_a_grown_net(members, source, cifar_batch, first, second):
    a, b, d = members
    data = {"data": source, "batch_size": 8, "steps": 1}
    sibling = first.pop("sibling", first["method"] == "mixture")
    first_members = [a, b] if sibling else [a]
    half = _saved(fuse(first_members, **first, **data),
                  d / f"h-{first['method']}-{sibling}-{second['method']}.safetensors")
    full = fuse([half], **second, **data)
    assert full.manifest.arch.width == 1.0
    assert _logits(_model(full), cifar_batch).shape == (32, 10)
    counts = param_counts(full.tensors, full.manifest.arch, full.manifest.mixing)
    assert counts["plain_equivalent"] == sum(p.numel() for p in build(ARCH.widened(4))
                                             .parameters())
    assert full.manifest.phases[:len(half.manifest.phases)] == half.manifest.phases


def test_regrowth_refusals(members, tmp_path):
    a, b, d = members
    half = _saved(fuse([a, b]), tmp_path / "half.safetensors")
    with pytest.raises(MgrowError, match="same tiling"):
        fuse([half], tiling="horizontal")
    with pytest.raises(MgrowError, match="grow a grown bundle alone"):
        fuse([half, half])
    plain = _saved(fuse([a], method="net2net"), tmp_path / "plain.safetensors")
    with pytest.raises(MgrowError, match="plain network"):
        fuse([plain])
    r = run_main("fuse", half.path, "-o", tmp_path / "full.safetensors", "--init", "zero")
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "full.safetensors").manifest.arch.width == 1.0


def test_regrowing_an_odd_grid_keeps_every_tile_with_its_owner(members):
    """A and B fused by 3 (rows owned A B A), grown again by 2 with --init copy: every tile of
    row r and BN block r is member r mod 2's, as in a first fuse (new row 3 used to copy row
    0, A's coefficients over B's templates, and block 3 A's statistics)."""
    a, b, d = members
    third = _saved(fuse([a, b], factor=3, init="copy", noise=0), d / "third.safetensors")
    full = fuse([third], init="copy", noise=0)
    assert full.manifest.mixing.factor == 6 and full.manifest.mixing.members == 2
    own = (a.tensors, b.tensors)
    layers = mixed_layers(_model(full))
    inner = [n for n, layer in layers.items() if layer.role == "inner"]
    assert inner
    for name in inner:
        alpha = full.tensors[f"{name}.alpha"]  # (6, 6, t)
        for r in range(6):
            for c in range(6):
                assert torch.equal(alpha[r, c], own[r % 2][f"{name}.alpha"][0, 0]), (name, r, c)
    norms = [k for k in a.tensors if k.endswith(("running_mean", "running_var", ".weight"))
             and k.rpartition(".")[0] not in layers and a.tensors[k].dim() == 1]
    assert norms
    for key in norms:
        for j, block in enumerate(full.tensors[key].chunk(6)):
            assert torch.equal(block, own[j % 2][key]), (key, j)
    # with every tile copied, the blocks of one owner compute the same: --bn-correct gives
    # them the same statistics (block 3 was corrected with A's member statistics)
    corrected = fuse([third], init="copy", noise=0, bn_correct=True).tensors
    for key in (k for k in norms if "running" in k):
        blocks = corrected[key].chunk(6)
        for j in range(2, 6):
            torch.testing.assert_close(blocks[j], blocks[j % 2], rtol=1e-5, atol=1e-6,
                                       msg=f"{key} block {j}")


def test_regrowth_beyond_the_grid_limit_is_refused_and_never_written(members, tmp_path):
    a, b, d = members
    half = _saved(fuse([a, b]), tmp_path / "half.safetensors")
    with pytest.raises(MgrowError, match="2 x 2 grid of tiles grown by 33 would be 66 x 66; "
                                         "the limit is 64"):
        fuse([half], factor=33)
    # whatever a manifest update sets, a bundle `load` would refuse is never written
    mixing = half.manifest.mixing.model_copy(update={"factor": 128})  # not validated
    with pytest.raises(MgrowError, match="the bundle to write: invalid manifest: "
                                         "mixing.factor"):
        save(tmp_path / "bad.safetensors", half.manifest.model_copy(update={"mixing": mixing}),
             half.tensors)
    assert not (tmp_path / "bad.safetensors").exists()
