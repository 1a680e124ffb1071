"""`fuse`: what growth preserves, what it creates, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.bundle import Bundle, load, save
from mgrow.flops import forward_flops, param_counts, report
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec, DatasetSpec, MixingSpec
from mgrow.mixing import mixed_layers

from conftest import make_bundle, run_main

ARCH = ArchSpec(name="wrn-16-2", width=0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    return make_bundle(d / "a.safetensors", ARCH, seed=1), \
        make_bundle(d / "b.safetensors", ARCH, seed=2)


def _model(grown) -> torch.nn.Module:
    return Bundle(grown.manifest, grown.tensors, Path("grown"), "").model().eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _assert_carried(grown: torch.nn.Module, members: list[Bundle]) -> None:
    """Every member's generated weights sit bit-equal in its diagonal tile of the grown net
    (the head's input halves each scaled 1/2: the grown head averages the members')."""
    mixed = [mixed_layers(m.model()) for m in members]
    for name, layer in mixed_layers(grown).items():
        w = layer.weight().detach()
        for j, member in enumerate(mixed):
            mw = member[name].weight().detach()
            o, i = mw.shape[:2]
            if layer.role == "stem":
                assert torch.equal(w[j * o:(j + 1) * o], mw), name
            elif layer.role == "head":
                assert torch.equal(w[:, j * i:(j + 1) * i], mw / 2), name
            else:
                assert torch.equal(w[j * o:(j + 1) * o, j * i:(j + 1) * i], mw), name


@pytest.mark.parametrize("init", ["orthogonal", "random", "copy", "zero"])
@pytest.mark.parametrize("tiling", ["vertical", "horizontal"])
def test_carried_tiles_bit_equal_and_norms_concatenated(pair, init, tiling):
    a, b = pair
    grown = _model(fuse([a, b], init=init, tiling=tiling))
    _assert_carried(grown, [a, b])
    state = grown.state_dict()
    for key in ("blocks.3.bn1.running_var", "bn.weight", "blocks.0.bn2.running_mean"):
        assert torch.equal(state[key], torch.cat([a.tensors[key], b.tensors[key]]))


@pytest.mark.parametrize("tiling", ["vertical", "horizontal"])
def test_zero_init_is_the_members_mean(pair, tiling, cifar_batch):
    a, b = pair
    grown = _model(fuse([a, b], init="zero", tiling=tiling))
    mean = (_logits(a.model(), cifar_batch) + _logits(b.model(), cifar_batch)) / 2
    assert torch.allclose(_logits(grown, cifar_batch), mean, rtol=1e-5, atol=1e-5)


def test_biases_follow_their_blocks_and_the_classifier_averages(tmp_path, cifar_batch):
    """VGG has conv and linear biases: block j comes from member j, the classifier's is the
    mean, so the zero-init identity holds through them too."""
    arch = ArchSpec(name="vgg11_bn", width=0.125)
    a = make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    b = make_bundle(tmp_path / "b.safetensors", arch, seed=2)
    for bundle, shift in ((a, 0.1), (b, -0.2)):  # nonzero conv and linear biases
        for name in mixed_layers(bundle.model()):
            bundle.tensors[f"{name}.bias"].add_(shift)
    grown = fuse([a, b], init="zero")
    t = grown.tensors
    assert torch.equal(t["features.0.bias"], torch.cat([a.tensors["features.0.bias"],
                                                        b.tensors["features.0.bias"]]))
    assert torch.equal(t["classifier.6.bias"],
                       (a.tensors["classifier.6.bias"] + b.tensors["classifier.6.bias"]) / 2)
    mean = (_logits(a.model(), cifar_batch) + _logits(b.model(), cifar_batch)) / 2
    assert torch.allclose(_logits(_model(grown), cifar_batch), mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor,members", [(3, 2), (4, 2), (3, 1), (4, 1)])
def test_larger_factors(pair, factor, members, cifar_batch):
    sources = list(pair[:members])
    grown = fuse(sources, factor=factor, init="zero")
    assert grown.manifest.arch.width == ARCH.width * factor
    model = _model(grown)
    mean = sum(_logits(s.model(), cifar_batch) for s in sources) / members
    assert torch.allclose(_logits(model, cifar_batch), mean, rtol=1e-5, atol=1e-5)
    assert _model(fuse(sources, factor=factor))(cifar_batch).shape == (32, 10)


@pytest.mark.parametrize("factor", [2, 3])
def test_net2net_preserves_function(pair, factor, cifar_batch):
    a = pair[0]
    grown = fuse([a], factor=factor, method="net2net", noise=0.0)
    assert grown.manifest.mixing is None
    out = _logits(_model(grown), cifar_batch)
    assert torch.allclose(out, _logits(a.model(), cifar_batch), rtol=1e-4, atol=1e-4)
    noisy = _logits(_model(fuse([a], factor=factor, method="net2net")), cifar_batch)
    assert not torch.allclose(noisy, out, atol=1e-6)


def _vectors_by_bank(model, owner_tiles):
    """(bank id, member) -> list of (layer, tile, coefficient vector)."""
    out = {}
    for name, layer in mixed_layers(model).items():
        g_out, g_in = layer.grid
        for r in range(g_out):
            for c in range(g_in):
                j = (r if layer.axis == "row" else c) % 2
                out.setdefault((layer.bank_index, j), []).append(
                    (name, (r, c), layer.alpha.detach()[r, c].double()))
    return out


def test_orthogonal_init_is_orthogonal_and_well_scaled(pair):
    a, b = pair
    grown = fuse([a, b], init="orthogonal")
    assert grown.notes == []  # the default layout leaves room for every vector
    model = _model(grown)
    for (bank, j), vecs in _vectors_by_bank(model, None).items():
        if any(mixed_layers(model)[n].role != "inner" for n, _, _ in vecs):
            continue
        v = torch.stack([x for _, _, x in vecs])
        v = v / v.norm(dim=1, keepdim=True)
        gram = v @ v.T
        assert torch.allclose(gram, torch.eye(len(v), dtype=gram.dtype), atol=1e-5)
    for name, layer in mixed_layers(model).items():
        if layer.role != "inner":
            continue
        w = layer.weight().detach()
        o, i = layer.tile_shape[:2]
        tiles = {(r, c): w[r * o:(r + 1) * o, c * i:(c + 1) * i] for r in range(2)
                 for c in range(2)}
        diag = (tiles[0, 0].norm() + tiles[1, 1].norm()) / 2
        for rc in ((0, 1), (1, 0)):
            assert 0.5 < float(tiles[rc].norm() / diag) < 2, (name, rc)
        # new tiles are not copies (or negated copies) of the carried ones
        for rc in ((0, 1), (1, 0)):
            for other in ((0, 0), (1, 1)):
                cos = torch.nn.functional.cosine_similarity(
                    tiles[rc].flatten(), tiles[other].flatten(), dim=0)
                assert abs(float(cos)) < 0.5


@pytest.mark.parametrize("case", ["independent", "with zero vectors", "repeated",
                                  "more than t"])
def test_orthogonal_init_uses_every_free_direction_at_the_existing_norm(case):
    """New coefficient vectors are orthonormal to each other and to the span of the
    existing ones, scaled to the existing non-zero vectors' mean norm, whatever the existing
    set looks like (a regrown net holds zero tiles, copies, more vectors than t)."""
    from mgrow.growth import init_orthogonal
    t, gen = 6, torch.Generator().manual_seed(0)
    base = torch.randn(2, t, dtype=torch.float64, generator=gen) * torch.tensor([[1.], [3.]])
    existing = {"independent": base,
                "with zero vectors": torch.cat([base, torch.zeros(5, t, dtype=base.dtype)]),
                "repeated": torch.cat([base, base, -base]),
                "more than t": torch.cat([base, 2 * base, base.flip(0), base])}[case]
    n = t - 2  # the free directions left
    new, note = init_orthogonal(existing, torch.zeros(n, t, dtype=base.dtype), gen)
    assert note is None
    scale = float(base.norm(dim=1).mean()) if case != "more than t" else \
        float(existing.norm(dim=1).mean())
    unit = new / scale
    torch.testing.assert_close(unit @ unit.T, torch.eye(n, dtype=base.dtype))
    torch.testing.assert_close(new @ base.T, torch.zeros(n, 2, dtype=base.dtype))


def test_copy_init_copies_and_fallback_is_reported(pair):
    a, b = pair
    model = _model(fuse([a, b], init="copy"))
    layer = mixed_layers(model)["blocks.1.conv1"]
    w = layer.weight().detach()
    o, i = layer.tile_shape[:2]
    assert torch.equal(w[:o, i:], w[:o, :i]) and torch.equal(w[o:, :i], w[o:, i:])
    alone = fuse([a], init="orthogonal")
    assert alone.notes and "free directions" in alone.notes[0]
    assert alone.manifest.growth.rank_notes == tuple(alone.notes)


def test_parameter_budget_wrn28(tmp_path):
    """Two template-mixed WRN-28-5 members grow into a net as large as the plain one."""
    arch = ArchSpec(name="wrn-28-5")
    a = make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    b = make_bundle(tmp_path / "b.safetensors", arch, seed=2)
    grown = fuse([a, b])
    counts = param_counts(grown.tensors, grown.manifest.arch, grown.manifest.mixing)
    plain = counts["plain_equivalent"]
    assert counts["templates"] == 2 * sum(t.numel() for k, t in a.tensors.items()
                                          if k.startswith("banks."))
    assert counts["total"] - plain == counts["coefficients"]  # the mixing's only extra
    assert 36_000_000 < plain < 37_000_000  # WRN-28-10 with a 32-channel stem


def test_flops_of_fused_wrn28_10_match_fvcore(tmp_path):
    arch = ArchSpec(name="wrn-28-10", width=0.5)
    a = make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    b = make_bundle(tmp_path / "b.safetensors", arch, seed=2)
    grown = fuse([a, b])
    save(tmp_path / "g.safetensors", grown.manifest, grown.tensors)
    assert grown.manifest.arch == ArchSpec(name="wrn-28-10")
    plain = build(ArchSpec(name="wrn-28-10")).eval()
    direct = FlopCountAnalysis(plain, torch.zeros(1, 3, 32, 32))
    direct.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert report(tmp_path / "g.safetensors")["forward_flops"] == direct.total()
    assert forward_flops(grown.manifest.arch) == direct.total()


@pytest.mark.parametrize("arch", [ArchSpec(name="resnet18", width=0.25),
                                  ArchSpec(name="resnet50", width=0.125),
                                  ArchSpec(name="vgg11_bn", width=0.125),
                                  ArchSpec(name="wrn-16-2", width=0.5, norm="block")],
                         ids=lambda a: a.name)
@pytest.mark.parametrize("method", ["mixture", "random", "net2net"])
def test_every_architecture_grows(tmp_path, arch, method, cifar_batch):
    a = make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    b = make_bundle(tmp_path / "b.safetensors", arch, seed=2)
    members = [a] if method == "net2net" else [a, b]
    grown = fuse(members, method=method)
    assert grown.manifest.arch == arch.widened(2)
    model = _model(grown)
    assert _logits(model, cifar_batch).shape == (32, 10)
    wide = build(arch.widened(2))
    assert sum(p.numel() for p in wide.parameters()) == \
        param_counts(grown.tensors, grown.manifest.arch, grown.manifest.mixing)[
            "plain_equivalent"]
    if method == "mixture":
        _assert_carried(model, members)
    if method == "net2net":  # function preserving without its symmetry-breaking noise
        exact = _model(fuse(members, method=method, noise=0.0))
        torch.testing.assert_close(_logits(exact, cifar_batch),
                                   _logits(a.model(), cifar_batch), rtol=1e-4, atol=1e-4)
    if method == "random":  # carried tiles kept exactly, new tiles fresh
        from mgrow.mixing import plain_state_dict
        name = [n for n, m in mixed_layers(a.model()).items() if m.role == "inner"][1]
        wa, wb = (plain_state_dict(m.model())[f"{name}.weight"] for m in (a, b))
        w = grown.tensors[f"{name}.weight"]
        o, i = wa.shape[:2]
        assert torch.equal(w[:o, :i], wa) and torch.equal(w[o:, i:], wb)
        assert not torch.equal(w[:o, i:], wa) and float(w[:o, i:].std()) > 0


def test_manifest_records_growth_and_lineage(pair):
    a, b = pair
    grown = fuse([a, b], seed=7, init="random", tiling="horizontal")
    man = grown.manifest
    assert man.lineage.operation == "fuse"
    assert [p.sha256 for p in man.lineage.parents] == [a.sha256, b.sha256]
    assert man.growth.init == "random" and man.growth.tiling == "horizontal"
    assert man.growth.seed == 7 and man.mixing.factor == 2 and man.mixing.members == 2
    again = fuse([a, b], seed=7, init="random", tiling="horizontal")
    assert all(torch.equal(grown.tensors[k], again.tensors[k]) for k in grown.tensors)


def test_refusals(tmp_path, pair):
    a, b = pair
    d = tmp_path
    other_arch = make_bundle(d / "o1.safetensors", ArchSpec(name="wrn-10-1"))
    other_templates = make_bundle(d / "o2.safetensors", ARCH, MixingSpec(templates=3))
    other_classes = make_bundle(d / "o3.safetensors", ARCH.model_copy(
        update={"num_classes": 100}))
    data = DatasetSpec(spec="cifar10", num_classes=10, channels=3, input_size=32,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_size=10)
    on_a = make_bundle(d / "d1.safetensors", ARCH, data=data)
    on_b = make_bundle(d / "d2.safetensors", ARCH,
                       data=data.model_copy(update={"spec": "npz:elsewhere"}))
    plain = make_bundle(d / "p.safetensors", ARCH, mixing=None)
    grown = fuse([a, b])
    save(d / "g.safetensors", grown.manifest, grown.tensors)
    cases = [
        (([a, other_arch], {}), "different architectures"),
        (([a, other_templates], {}), "different mixing specs"),
        (([a, other_classes], {}), "different class counts"),
        (([on_a, on_b], {}), "different data sets"),
        (([load(d / "g.safetensors"), a], {}), "already grown"),
        (([a, b], {"factor": 1}), "at least 2"),
        (([a, b], {"method": "net2net"}), "give only A"),
        (([plain, plain], {}), "plain network"),
    ]
    for (members, kwargs), message in cases:
        with pytest.raises(MgrowError, match=message):
            fuse(members, **kwargs)
    r = run_main("fuse", a.path, other_arch.path, "-o", d / "out.safetensors")
    assert r.returncode == 2 and "different architectures" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (d / "out.safetensors").exists()


def test_cli_fuse_options_take_effect_and_read_no_data(tmp_path, cifar_batch):
    """`mgrow fuse` as a user runs it: --init zero and --tiling reach the grown net (the
    members' mean, recorded), --bn-correct changes the BN statistics and nothing else,
    every coefficient trains after growth (the paper's step 6), and the mixture growth
    reads no data: members recording a data set that is not there grow all the same."""
    gone = DatasetSpec(spec="npz:/nonexistent/data", num_classes=10, channels=3,
                       input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, train_size=10)
    a = make_bundle(tmp_path / "a.safetensors", ARCH, seed=1, data=gone)
    b = make_bundle(tmp_path / "b.safetensors", ARCH, seed=2, data=gone)
    out = {}
    for name, options in {"zero": ("--init", "zero", "--tiling", "horizontal"),
                          "plain": (), "corrected": ("--bn-correct",)}.items():
        r = run_main("fuse", a.path, b.path, *options, "-o", tmp_path / f"{name}.safetensors")
        assert r.returncode == 0, r.stderr
        out[name] = load(tmp_path / f"{name}.safetensors")
    growth = out["zero"].manifest.growth
    assert (growth.init, growth.tiling, growth.bn_correct) == ("zero", "horizontal", False)
    mean = (_logits(a.model(), cifar_batch) + _logits(b.model(), cifar_batch)) / 2
    torch.testing.assert_close(_logits(out["zero"].model(), cifar_batch), mean, rtol=1e-5,
                               atol=1e-5)
    assert out["corrected"].manifest.growth.bn_correct
    plain, corrected = out["plain"].tensors, out["corrected"].tensors
    changed = {k for k in plain if not torch.equal(plain[k], corrected[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    model = out["plain"].model()
    assert out["plain"].manifest.mixing.freeze_edges is False
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    alphas = {k for k in plain if k.endswith(".alpha")}
    assert alphas and alphas <= trainable  # stem and classifier coefficients included
