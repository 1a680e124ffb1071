"""`mgrow deepen`: new residual blocks keep the function, carry every tensor, and start from
what the issue asks (zero, copy, mixture); deepening and widening compose."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_bundle, run_main

from mgrow.arch import block_paths, build, deepened, depths
from mgrow.bundle import load, save
from mgrow.errors import MgrowError
from mgrow.growth import deepen, fuse
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.mixing import mixed_layers

PLAIN, MIXED, GROWN = None, MixingSpec(), MixingSpec(factor=2, members=2)
CASES = [  # arch, width, norm, mixing, init, stage
    ("wrn-10-1", 0.5, "block", MIXED, "mixture", "all"),
    ("wrn-10-1", 0.5, "every", PLAIN, "zero", "all"),
    ("wrn-16-2", 0.5, "every", PLAIN, "copy", "last"),
    ("wrn-16-2", 0.5, "block", MIXED, "zero", 1),
    ("wrn-16-1", 0.5, "block", GROWN, "mixture", "all"),
    ("resnet18", 0.25, "every", MIXED, "mixture", "last"),
    ("resnet18", 0.25, "every", PLAIN, "copy", "all"),
    ("resnet50", 0.125, "every", PLAIN, "zero", 2),
    ("resnet50", 0.125, "every", GROWN, "mixture", "last"),
]


def _bundle(tmp_path, name, width, norm, mixing, seed=0):
    arch = ArchSpec(name=name, width=width, norm=norm)
    return make_bundle(tmp_path / f"{name}-{seed}.safetensors", arch, mixing, seed=seed)


def _logits(model, x, train=False):
    model = model.train(train)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name,width,norm,mixing,init,stage", CASES)
def test_deepen_keeps_the_function_and_every_tensor(tmp_path, cifar_batch, name, width, norm,
                                                     mixing, init, stage):
    b = _bundle(tmp_path, name, width, norm, mixing)
    man, tensors, _ = deepen(b, 2, stage, init, seed=3)
    old = depths(b.manifest.arch)
    chosen = range(len(old)) if stage == "all" else [len(old) - 1 if stage == "last"
                                                      else stage - 1]
    assert depths(man.arch) == tuple(n + 2 * (s in chosen) for s, n in enumerate(old))
    assert man.lineage.operation == "deepen" and man.phases == b.manifest.phases
    new = load(save(tmp_path / "deep.safetensors", man, tensors))  # rebuilds from its manifest
    x = cifar_batch[:8]
    for train in (False, True):  # batch statistics too: new blocks output exactly zero
        assert torch.equal(_logits(new.model(), x, train), _logits(b.model(), x, train))
    # every old tensor sits at its new place, bit for bit (a bank's old templates first)
    rename = {o: n for os_, ns in zip(block_paths(b.manifest.arch), block_paths(man.arch))
              for o, n in zip(os_, ns)}
    def moved(key):
        head = ".".join(key.split(".")[:2])
        return rename[head] + key[len(head):] if head in rename else key
    old_mixed, new_mixed = mixed_layers(b.model()), mixed_layers(new.model())
    for key, value in b.tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner == "banks":
            layer = next(k for k, v in old_mixed.items() if v.bank_index == int(leaf))
            got = new.tensors[f"banks.{new_mixed[moved(layer)].bank_index}"]
            got = got[:, :value.shape[1]]
        else:
            got = new.tensors[moved(key)]
            if leaf == "alpha":
                assert not got[..., value.shape[-1]:].any()  # not over new templates
                got = got[..., :value.shape[-1]]
        assert torch.equal(got, value), key


def test_mixture_mixes_the_stage_templates_orthogonally(tmp_path):
    b = _bundle(tmp_path, "wrn-10-1", 0.5, "block", MIXED)
    man, tensors, notes = deepen(b, 1, "all", "mixture", seed=0)
    assert notes == []
    model = build(man.arch, man.mixing, meta=True)
    layers = mixed_layers(model)
    for s, (olds, news) in enumerate(zip(block_paths(b.manifest.arch),
                                         block_paths(man.arch))):
        (path,) = news[len(olds):]
        assert not tensors[f"{path}.conv2.alpha"].any()  # the residual output: zero
        conv1 = layers[f"{path}.conv1"]
        a = tensors[f"{path}.conv1.alpha"].double()
        peers = [k for k, v in layers.items() if v.bank_index == conv1.bank_index and
                 not k.startswith(path + ".")]
        if not peers:  # a bank of its own: a copy of the stage's learned one of its shape
            src = layers[f"{news[len(olds) - 1]}.conv2"].bank_index
            bank = tensors[f"banks.{conv1.bank_index}"]
            n = min(bank.shape[1], tensors[f"banks.{src}"].shape[1])
            assert torch.equal(bank[:, :n], tensors[f"banks.{src}"][:, :n])
            peers = [k for k, v in layers.items() if v.bank_index == src]
        refs = [tensors[f"{k}.alpha"].double() for k in peers]
        for r in refs:
            t = min(r.shape[-1], a.shape[-1])
            dots = (a[..., :t] * r[..., :t]).sum(-1)
            assert dots.abs().max() < 1e-5, (s, dots)  # orthogonal per tile
        mean = torch.stack([r.norm(dim=-1) for r in refs]).mean(0)
        assert torch.allclose(a.norm(dim=-1), mean, rtol=1e-5)  # at the learned scale


def test_copy_duplicates_the_last_block_and_refuses_a_shape_change(tmp_path):
    b = _bundle(tmp_path, "wrn-16-2", 0.5, "every", PLAIN)
    man, tensors, _ = deepen(b, 1, "last", "copy", seed=0)
    src, new = block_paths(man.arch)[2][1], block_paths(man.arch)[2][2]
    for key in [k for k in tensors if k.startswith(new + ".")]:
        twin = tensors[src + key[len(new):]]
        if key == f"{new}.conv2.weight":
            assert not tensors[key].any()
        else:
            assert torch.equal(tensors[key], twin), key
    one = _bundle(tmp_path, "wrn-10-1", 0.5, "every", PLAIN)  # stage 2's only block widens
    with pytest.raises(MgrowError, match=r"stage 2's last block \(blocks.1\) changes"):
        deepen(one, 1, 2, "copy")


@pytest.mark.parametrize("name,mixing,kw,message", [
    ("torchvision:mobilenet_v2", PLAIN, {}, "no stage of residual blocks"),
    ("torchvision:resnet18", MIXED, {"init": "identity"},
     "residual network deepens by zero .*, copy or mixture"),
    ("torchvision:resnet18", PLAIN, {"init": "mixture"}, "plain; --init mixture mixes"),
    ("vgg11_bn", PLAIN, {"init": "zero"}, "identity \\(Net2DeeperNet\\) is the one way"),
    ("wrn-10-1", PLAIN, {"init": "identity"}, "x \\+ f\\(x\\) is the identity when f is 0"),
    ("vgg11_bn", MIXED, {"stage": 4}, r"features.\d+: the new blocks would change which layers"),
    ("wrn-10-1", PLAIN, {"init": "mixture"}, "plain; --init mixture"),
    ("wrn-10-1", MIXED, {"init": "copy"}, "template-mixed; --init copy"),
    ("wrn-10-1", MIXED, {"stage": 4}, r"--stage 4: expected 1\.\.3"),
    ("resnet18", MIXED, {"stage": "first"}, r"expected 1\.\.4, last or all"),
    ("wrn-10-1", MIXED, {"blocks": 0}, "--blocks takes a whole number >= 1"),
])
def test_refusals_name_the_problem(tmp_path, name, mixing, kw, message):
    width = {"wrn-10-1": 0.5, "vgg11_bn": 0.125}.get(name, 1.0 if ":" in name else 0.25)
    b = _bundle(tmp_path, name, width, "every", mixing)
    with pytest.raises(MgrowError, match=message):
        deepen(b, **{"blocks": 1, **kw})


@pytest.mark.parametrize("mixing,stage", [(PLAIN, "all"), (MIXED, 5), (GROWN, 3)])
def test_vgg_grows_deeper_by_identity_layers(tmp_path, cifar_batch, mixing, stage):
    """Net2DeeperNet: new conv-BN-ReLU layers that pass their input through in eval mode."""
    b = _bundle(tmp_path, "vgg11_bn", 0.125, "every", mixing)
    man, tensors, _ = deepen(b, 1, stage)
    assert man.lineage.options["init"] == "identity"
    new = load(save(tmp_path / "deep.safetensors", man, tensors)).model()
    x = cifar_batch[:8]
    want = _logits(b.model(), x)
    err = (_logits(new, x) - want).norm() / want.norm()
    assert err < 1e-6  # rounding of the BN's sqrt(1 + eps)
    paths = block_paths(man.arch)
    s = 0 if stage == "all" else stage - 1
    conv = new.get_submodule(paths[s][-1])
    w = conv.weight() if mixing else conv.weight
    c = w.shape[0]
    eye = torch.zeros_like(w)
    eye[range(c), range(c), 1, 1] = 1
    assert torch.equal(w.detach(), eye)


def test_depths_name_the_net_canonically():
    wrn = ArchSpec(name="wrn-10-2", width=0.5)
    assert deepened(wrn, (2, 2, 2)) == wrn.model_copy(update={"name": "wrn-16-2"})
    assert deepened(wrn, (1, 1, 3)).depths == (1, 1, 3)
    r18 = ArchSpec(name="resnet18")
    assert deepened(r18, (3, 4, 6, 3)).name == "resnet34"
    assert deepened(ArchSpec(name="resnet50"), (2, 2, 2, 2)).depths == (2, 2, 2, 2)
    with pytest.raises(MgrowError, match="one count per stage"):
        build(r18.model_copy(update={"depths": (2, 2)}), meta=True)
    # wrn-10-2 deepened to (2, 2, 2) is wrn-16-2: the same keys and shapes
    a = build(deepened(wrn, (2, 2, 2)), MIXED, meta=True).state_dict()
    b = build(ArchSpec(name="wrn-16-2", width=0.5), MIXED, meta=True).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_deeper_then_wider_and_wider_then_deeper(tmp_path, cifar_batch):
    x = cifar_batch[:8]
    a = _bundle(tmp_path, "wrn-10-1", 0.5, "block", MIXED, seed=0)
    man, tensors, _ = deepen(a, 1, "all", "mixture", seed=1)
    deep_a = load(save(tmp_path / "deep-a.safetensors", man, tensors))
    # a sibling of the deepened architecture, then MixtureGrowth with zero init: the mean
    sib = make_bundle(tmp_path / "sib.safetensors", man.arch, MIXED, seed=5)
    grown = fuse([deep_a, sib], factor=2, init="zero")
    wide = load(save(tmp_path / "wide.safetensors", grown.manifest, grown.tensors))
    mean = (_logits(deep_a.model(), x) + _logits(sib.model(), x)) / 2
    assert torch.allclose(_logits(wide.model(), x), mean, atol=1e-5)
    # and deeper again: the grown (g = 2) net keeps its function
    man2, tensors2, _ = deepen(wide, 1, "last", "mixture", seed=2)
    deeper = load(save(tmp_path / "deeper.safetensors", man2, tensors2))
    assert torch.equal(_logits(deeper.model(), x), _logits(wide.model(), x))
    assert man2.arch.depths == (2, 2, 3) and man2.arch.width == 1.0
    # a plain net: deepen (zero) then net2net without noise keeps the logits
    p = _bundle(tmp_path, "resnet18", 0.25, "every", PLAIN)
    man3, tensors3, _ = deepen(p, 1, 2, "zero")
    deep_p = load(save(tmp_path / "deep-p.safetensors", man3, tensors3))
    grown = fuse([deep_p], factor=2, method="net2net", noise=0.0)
    wide_p = load(save(tmp_path / "wide-p.safetensors", grown.manifest, grown.tensors))
    assert torch.allclose(_logits(wide_p.model(), x), _logits(p.model(), x), atol=1e-4,
                          rtol=1e-4)


def test_cli_deepen_writes_refuses_and_cka_pairs_blocks(tmp_path, digits_200):
    small = tmp_path / "small.safetensors"
    shutil.copy(digits_200, small)
    r = run_main("deepen", small, "--stage", "all")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "small-deep.safetensors"
    assert f"wrote {out} (wrn-16-1 mixed, init mixture, blocks per stage 2-2-2)" in r.stdout
    r = run_main("deepen", small, "--init", "copy", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--init copy" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    for stage, message in (("0", "'0': expected a stage number (1, 2, ...), last or all"),
                           ("9", "--stage 9: expected 1..3, last or all")):
        r = run_main("deepen", small, "--stage", stage, "-o", tmp_path / "x.safetensors")
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1
    r = run_main("info", out)
    assert "deepen: blocks 1, stages [1, 2, 3], init mixture" in r.stdout
    assert "stages (deepen --stage N): 1 blocks.0..blocks.1 (2 blocks), 2 blocks.2..blocks.3 " \
        "(2 blocks), 3 blocks.4..blocks.5 (2 blocks)" in r.stdout
    r = run_main("flops", out)  # the depth history under the ledger
    assert "grown by: deepen: blocks per stage -> 2-2-2, mixture" in r.stdout
    r = run_main("cka", small, out, "--images", "64", "--json")
    res = json.loads(r.stdout)
    assert res["renamed"] == {"blocks.1": "blocks.2", "blocks.2": "blocks.4"}
    assert len(res["matched"]) == len(res["layers_a"])  # every layer of A has its twin
    assert min(res["matched"].values()) > 1 - 1e-6  # the same function, layer by layer


def test_the_command_line_offers_every_init():
    from mgrow.cli.options import DeepInit
    from mgrow.growth import DEEPEN_INITS
    assert [e.value for e in DeepInit] == list(DEEPEN_INITS)


def test_a_deepened_net_trains_on(tmp_path, digits_200):
    """The new blocks learn: one more epoch of the deepened net lowers its test loss, and
    the epoch is charged to the growth stage (deepening is growth)."""
    from mgrow.data import DataSource
    from mgrow.engine import TrainConfig, evaluate
    from mgrow.phases import finetune
    small = load(digits_200)
    man, tensors, _ = deepen(small, 1, "all", "mixture")
    deep = save(tmp_path / "deep.safetensors", man, tensors)
    data = DataSource("digits", subset=200).load()
    before = evaluate(load(deep).model(), data)[1]
    cfg = TrainConfig(epochs=1, batch_size=50, lr=0.05, device="cpu", eval_every_epoch=False)
    out = finetune(deep, DataSource("digits", subset=200), cfg, tmp_path / "ft.safetensors",
                   progress="quiet")
    trained = load(out.path)
    assert evaluate(trained.model(), data)[1] < before
    assert [p.stage for p in trained.manifest.phases] == ["base", "growth"]
    new = f"{block_paths(man.arch)[0][1]}.conv2.alpha"  # the zeroed layer left zero
    assert trained.tensors[new].abs().max() > 0


def test_the_depth_experiment_charges_growth_and_keeps_the_start(tmp_path, tiny_cifar,
                                                                 cifar_batch):
    """examples/deepen.py at its tiny scale on real CIFAR-10: the deepened start computes
    the start's logits, the finetune is the only charged phase and spends the budget."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("deepen_ex", ROOT / "examples/deepen.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    out = tmp_path / "run"
    ex.main(["--scale", "tiny", "--out", str(out), "--data", f"npz:{tiny_cifar}",
             "--rows", "base,deepen-mixture,large-match", "--quiet"])
    runs = {r["row"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"base", "deepen-mixture", "large-match"}
    base, deep = runs["base"], runs["deepen-mixture"]
    assert deep["ledger"][:-1] == base["ledger"] and deep["ledger"][-1]["stage"] == "growth"
    budget = ex.SCALES["tiny"]["budget"]
    assert budget <= deep["flops_norm"] <= budget * 1.2  # whole batches: at most one more
    assert abs(runs["large-match"]["flops_norm"] - deep["flops_norm"]) < 0.1
    x = cifar_batch[:8]
    start = load(out / "seed0/base.safetensors").model().eval()
    grown = load(out / "seed0/deepen-mixture.grown.safetensors").model().eval()
    assert torch.equal(grown(x), start(x))
    assert "deepen-mixture" in (out / "results.md").read_text()


TRACED = [  # name, input size, builder options, stage
    ("torchvision:resnet18", 32, {}, "all"),
    ("torchvision:convnext_tiny", 32, {}, "all"),
    ("torchvision:swin_t", 64, {}, "all"),  # integer buffers (relative position index)
    ("torchvision:regnet_y_400mf", 32, {}, "last"),  # a builder that needs the CPU to plan
    ("torchvision:efficientnet_b0", 32, {}, 4),
    ("timm:resnet18", 32, {}, "all"),
    ("timm:convnext_atto", 32, {}, "all"),  # the shortcut an Identity module
    ("timm:vit_tiny_patch16_224", 32, {"img_size": 32}, "all"),
]


def _traced(tmp_path, name, size, options):
    arch = ArchSpec(name=name, input_size=size, options=options)
    model = build(arch, seed=0)
    with torch.no_grad():  # a classifier head some builders start at zero: logits that move
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == arch.num_classes:
                m.weight.normal_(0, 0.05)
    from mgrow.bundle import save_model
    from mgrow.manifest import Lineage, Manifest
    path = tmp_path / f"{name.replace(':', '-')}.safetensors"
    return load(save_model(path, Manifest(arch=arch, lineage=Lineage(operation="init")), model))


@pytest.mark.parametrize("name,size,options,stage", TRACED)
@pytest.mark.parametrize("init", ["copy", "zero"])
def test_builders_networks_grow_deeper_keeping_the_function(tmp_path, name, size, options,
                                                             stage, init):
    b = _traced(tmp_path, name, size, options)
    man, tensors, notes = deepen(b, 1, stage, init, seed=1)
    assert man.arch.depths is not None and len(notes) >= 1
    assert man.lineage.options["notes"] == notes  # what was zeroed, kept
    new = load(save(tmp_path / "deep.safetensors", man, tensors))  # rebuilt from its manifest
    assert len(new.tensors) > len(b.tensors)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(new.model(), x), _logits(b.model(), x))


def test_a_builders_network_deepens_and_widens_in_either_order(tmp_path, cifar_batch):
    x = cifar_batch[:4]
    b = _traced(tmp_path, "timm:resnet10t", 32, {})  # stages of one block: the first keeps
    want = _logits(b.model(), x)  # the shape
    man, tensors, _ = deepen(b, 1, 1, "copy")  # deeper, then wider (net2net)
    deep = load(save(tmp_path / "deep.safetensors", man, tensors))
    grown = fuse([deep], factor=2, method="net2net", noise=0.0)
    wide = load(save(tmp_path / "wide.safetensors", grown.manifest, grown.tensors))
    assert torch.allclose(_logits(wide.model(), x), want, rtol=1e-4, atol=1e-4)
    grown = fuse([b], factor=2, method="net2net", noise=0.0)  # wider, then deeper
    wide = load(save(tmp_path / "wide2.safetensors", grown.manifest, grown.tensors))
    man, tensors, _ = deepen(wide, 1, 1, "zero")
    both = load(save(tmp_path / "both.safetensors", man, tensors))
    assert torch.equal(_logits(both.model(), x), _logits(wide.model(), x))
    assert {k: v.shape for k, v in both.tensors.items()} == \
        {k: v.shape for k, v in load(tmp_path / "wide.safetensors").tensors.items()}


def test_a_stage_without_an_identity_block_is_refused(tmp_path):
    b = _traced(tmp_path, "torchvision:efficientnet_b0", 32, {})
    import mgrow
    assert [(s["where"], s["blocks"]) for s in mgrow.info(b.path)["stages"]] == [
        ("features.1", 1), ("features.2", 2), ("features.3", 2), ("features.4", 3),
        ("features.5", 3), ("features.6", 4), ("features.7", 1)]
    with pytest.raises(MgrowError, match=r"features.7: its last block \(MBConv\) changes the "
                       r"shape \(192, 1, 1\) -> \(320, 1, 1\).*choose another --stage"):
        deepen(b, 1, "last")
    with pytest.raises(MgrowError, match=r"--stage 9: expected 1..7 \(features.1, "):
        deepen(b, 1, 9)
    with pytest.raises(MgrowError, match="plain; --init mixture mixes a template-mixed"):
        deepen(b, 1, 4, "mixture")
    with pytest.raises(MgrowError, match="deepens by zero .*, copy or mixture"):
        deepen(b, 1, 4, "identity")
    # RepVGG's third branch is a BN of the input, not the input: no block to start at zero
    b = _traced(tmp_path, "timm:repvgg_a0", 32, {})
    with pytest.raises(MgrowError, match=r"stages.2.14: RepVggBlock has no residual branch "
                       r"ending in a weighted layer beside an identity shortcut"):
        deepen(b, 1, 3, "copy")


def test_integer_buffers_load_as_integers_and_only_there(tmp_path):
    """Swin's relative position index is an int64 buffer: a bundle holds and reloads it;
    a float tensor at its key is refused, as an integer one at a weight's is."""
    b = _traced(tmp_path, "torchvision:swin_t", 64, {})
    key = next(k for k in b.tensors if k.endswith("relative_position_index"))
    assert b.tensors[key].dtype == torch.int64
    bad = dict(b.tensors, **{key: b.tensors[key].float()})
    save(tmp_path / "bad.safetensors", b.manifest, bad)
    with pytest.raises(MgrowError, match=f"tensor {key} is float32; the network's buffer"):
        load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name,size", [("torchvision:resnet18", 32), ("wrn-16-2", 32)])
def test_a_deepening_that_would_not_fit_is_refused_before_it_allocates(tmp_path, monkeypatch,
                                                                       name, size):
    b = _traced(tmp_path, name, size, {}) if ":" in name else \
        _bundle(tmp_path, name, 4.0, "every", PLAIN)
    monkeypatch.setenv("MGROW_MEMORY_LIMIT", "1G")
    with pytest.raises(MgrowError, match=r"needs about [\d.]+ GB of memory; "
                       "MGROW_MEMORY_LIMIT allows 1.0 GB"):
        deepen(b, 400, "last")
