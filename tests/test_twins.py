"""Template-mixed twins of builders' networks, and MixtureGrowth of them.

Real torchvision and timm builders at small inputs, real bundles on disk, the CLI's entry
point; the claims are numerical: a twin computes its plain network, a converted checkpoint
its logits, carried tiles are bit-equal, and `--init zero` gives the members' mean logits.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from conftest import run_main
from mgrow.arch import build, empty
from mgrow.arch.twins import copies, twin
from mgrow.bundle import load, save, save_model
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec, Lineage, Manifest, MixingSpec
from mgrow.mixing import decompose, generated, mixed_layers, plain_state_dict


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _members(tmp_path, arch: ArchSpec, spec: MixingSpec = MixingSpec()):
    """Two template-mixed twins of different seeds, norms and biases moved off their init
    (so that every carried statistic and the averaged classifier bias are tested)."""
    out = []
    for seed in (1, 2):
        model = build(arch, spec, seed=seed).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in model.named_parameters():
                if t.dim() == 1:
                    t.add_(0.1 * torch.randn(t.shape, generator=gen))
            for name, t in model.named_buffers():
                if name.endswith("running_var"):
                    t.mul_(1 + torch.rand(t.shape, generator=gen))
        manifest = Manifest(arch=arch, mixing=spec, lineage=Lineage(
            operation="train", options={"seed": seed}))
        out.append(load(save_model(tmp_path / f"m{seed}.safetensors", manifest, model)))
    return out


def _grown(grown) -> torch.nn.Module:
    net = empty(grown.manifest.arch, grown.manifest.mixing)
    net.load_state_dict(grown.tensors, strict=True)
    return net.eval()


def test_copies_count_each_old_index_in_order():
    assert copies(torch.tensor([0, 0, 1, 1, 0, 2])).tolist() == [0, 1, 0, 1, 2, 0]


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                  "timm:vit_tiny_patch16_224"])
def test_a_twin_computes_its_builders_network(name):
    """Built template-mixed, a builder's network computes the builder's own initial
    weights (templates decomposed from them); the meta build has the same tensors; its
    plain state_dict loads strictly into the builder's network and gives the same logits."""
    options = {"img_size": 32} if name.startswith("timm:") else {}
    arch = ArchSpec(name=name, num_classes=10, input_size=32, options=options)
    plain, mixed = build(arch, seed=4).eval(), build(arch, MixingSpec(), seed=4).eval()
    state = plain_state_dict(mixed)
    assert state.keys() == plain.state_dict().keys()
    for key, want in plain.state_dict().items():  # every weight the builder's own
        assert (state[key] - want).abs().max() <= 1e-6 * (1 + want.abs().max()), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (mixed(x) - plain(x)).abs().max() <= 1e-5 * (1 + plain(x).abs().max())
    meta = build(arch, MixingSpec(), meta=True)
    assert {k: v.shape for k, v in meta.state_dict().items()} == \
        {k: v.shape for k, v in mixed.state_dict().items()}
    assert not any(k.endswith(".weight") and v.dim() > 1 for k, v in mixed.state_dict().items())
    roles = [layer.role for layer in mixed_layers(mixed).values()]
    assert roles.count("stem") == 1 and roles.count("head") == 1
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), mixed(x))


def test_multihead_attention_and_weights_read_by_a_parent_are_generated():
    """nn.MultiheadAttention reads its packed input projection and its out_proj's weight in
    its own code: both are generated (the twin's weight is a property), so the encoder
    block computes what the plain one does."""
    from torchvision.models.vision_transformer import EncoderBlock

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = EncoderBlock(2, 8, 16, 0.0, 0.0), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(x))

    torch.manual_seed(0)
    block = Net().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = block(x)
    state = block.state_dict()
    twin(block, MixingSpec(), tuple(x.shape))
    block.load_state_dict(decompose(block, state, torch.Generator().manual_seed(0)))
    attention = block.block.self_attention
    held = attention.state_dict()  # (the stem here: its coefficients a frozen buffer)
    assert {"alpha", "out_proj.alpha"} <= held.keys() and "in_proj_weight" not in held
    with torch.no_grad():
        assert _relative(block(x), want) <= 1e-6


def test_convert_is_template_mixed_by_default_and_exact(tmp_path):
    """A torchvision checkpoint converts to a template-mixed twin (the default, as for
    mgrow's own families) computing its logits; --plain keeps it plain; the export's
    state_dict loads strictly into the builder's network."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    torch.save(net.state_dict(), tmp_path / "net.pth")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    for flag, mixed in (((), True), (("--plain",), False)):
        out = tmp_path / f"{mixed}.safetensors"
        r = run_main("convert", tmp_path / "net.pth", "--arch", "torchvision:mobilenet_v3_small",
                     "--input-size", 32, *flag, "-o", out)
        assert r.returncode == 0, r.stderr
        b = load(out)
        assert (b.manifest.mixing is not None) == mixed
        assert any(k.startswith("banks.") for k in b.tensors) == mixed
        with torch.no_grad():
            assert _relative(b.model().eval()(x), want) <= 1e-5
    r = run_main("export", tmp_path / "True.safetensors", "-o", tmp_path / "plain.safetensors")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    fresh = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    fresh.load_state_dict(load_file(tmp_path / "plain.safetensors"), strict=True)
    with torch.no_grad():
        assert _relative(fresh(x), want) <= 1e-5


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_mixture_growth_of_builders_nets(tmp_path, name):
    """A builder's twin and a sibling fused by MixtureGrowth: every carried tile is the
    member's weight bit-equal (residual additions, depthwise convolutions, squeeze-
    excitation products between them); `--init zero` computes the members' mean logits, by
    2 and by 3 (a third copy of new units); `orthogonal` new tiles change them."""
    arch = ArchSpec(name=name, num_classes=10, input_size=32)
    a, b = _members(tmp_path, arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        members = [a.model().eval(), b.model().eval()]
        mean = (members[0](x) + members[1](x)) / 2
    for init, g in (("zero", 2), ("zero", 3), ("orthogonal", 2)):
        grown = fuse([a, b], factor=g, init=init, method="mixture")
        assert grown.manifest.arch.width == g and grown.manifest.mixing.factor == g
        net = _grown(grown)
        with torch.no_grad():
            err = _relative(net(x), mean)
        assert err <= 1e-5 if init == "zero" else err > 1e-3, (init, g, err)
        for path, layer in mixed_layers(net).items():
            w = generated(layer).detach()
            for j, member in enumerate(members):
                own = generated(mixed_layers(member)[path]).detach()
                rows = w.index_select(0, torch.arange(j, w.shape[0], g)) \
                    if layer.grid[0] > 1 else w
                tile = rows.index_select(1, torch.arange(j, w.shape[1], g)) \
                    if layer.grid[1] > 1 else rows
                if layer.role == "head":
                    tile = tile * 2  # the classifier averages the members
                assert torch.equal(tile, own), (path, j)


@pytest.mark.parametrize("name,factors", [("torchvision:resnet18", (2,)),  # x6: 400M weights
                                          ("torchvision:mobilenet_v3_small", (2, 3))])
def test_a_grown_twin_grows_again_by_mixture(tmp_path, name, factors):
    """A grown twin fused again alone: its 2 x 2 grid is carried bit-equal (coefficients,
    banks, and every other tensor at its old copies), new copies start from old blocks of
    the same owner, and `--init zero` keeps its logits, by 2 and by 3."""
    arch = ArchSpec(name=name, num_classes=10, input_size=32)
    a, b = _members(tmp_path, arch)
    first = fuse([a, b], factor=2, init="zero", method="mixture")
    ab = load(save(tmp_path / "ab.safetensors", first.manifest, first.tensors))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ab.model().eval()(x)
    for g in factors:
        again = fuse([ab], factor=g, init="zero", method="mixture")
        assert again.manifest.mixing.factor == 2 * g and again.manifest.arch.width == 2 * g
        net = load(save(tmp_path / f"x{g}.safetensors", again.manifest, again.tensors))
        with torch.no_grad():
            assert _relative(net.model().eval()(x), want) <= 1e-5, g
        for key, old in ab.tensors.items():
            new = net.tensors[key]
            if key.endswith(".alpha"):
                new = new[:old.shape[0], :old.shape[1]]
            elif not key.startswith("banks.") and old.dim() and new.shape != old.shape:
                continue  # laid out by the new plan: checked through the logits
            assert torch.equal(new, old), key


def test_mixture_of_a_builders_net_through_the_commands(tmp_path):
    """fuse, save, rebuild from the manifest alone: the grown bundle's logits are the
    members' mean; what mixture does not take is refused in one line, nothing written."""
    arch = ArchSpec(name="torchvision:resnet18", num_classes=10, input_size=32)
    a, b = _members(tmp_path, arch)
    out = tmp_path / "ab.safetensors"
    r = run_main("fuse", a.path, b.path, "--init", "zero", "-o", out)
    assert r.returncode == 0, r.stderr
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mean = (a.model().eval()(x) + b.model().eval()(x)) / 2
        assert _relative(load(out).model().eval()(x), mean) <= 1e-5
    r = run_main("fuse", out, "--init", "zero", "-o", tmp_path / "abab.safetensors")
    assert r.returncode == 0, r.stderr  # a grown twin grows again, alone
    with torch.no_grad():
        assert _relative(load(tmp_path / "abab.safetensors").model().eval()(x), mean) <= 1e-5
    for args, message in [((a.path, b.path, "--bn-correct"), "--bn-correct corrects mgrow's")]:
        bad = tmp_path / "bad.safetensors"
        r = run_main("fuse", *args, "-o", bad)
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not bad.exists()
    r = run_main("fuse", a.path, "--method", "net2net", "--noise", 0, "-o",
                 tmp_path / "n.safetensors")  # a twin grows plain by net2net, keeping it
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert _relative(load(tmp_path / "n.safetensors").model().eval()(x),
                         a.model().eval()(x)) <= 1e-5


@pytest.mark.parametrize("init", ["zero", "copy", None])
def test_a_twin_deepens_keeping_its_function_and_its_banks(tmp_path, init):
    """deepen of a builder's template-mixed twin: the logits are kept, the result is a
    twin again (rebuilt from its manifest), and every bank that serves the same layers as
    before is carried bit-equal with their coefficients."""
    from mgrow.growth import deepen
    from mgrow.mixing import bank_groups
    arch = ArchSpec(name="torchvision:resnet18", num_classes=10, input_size=32)
    a, _ = _members(tmp_path, arch)
    man, tensors, _ = deepen(a, 1, "all", init)
    deep = load(save(tmp_path / "deep.safetensors", man, tensors))
    assert deep.manifest.mixing == a.manifest.mixing and man.arch.depths == (3, 3, 3, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deep.model().eval()(x), a.model().eval()(x), rtol=0, atol=1e-5)
    old = {tuple(names): n for n, names in enumerate(bank_groups(a.model()))}
    kept = 0
    for n, names in enumerate(bank_groups(deep.model())):
        if tuple(names) in old:
            kept += 1
            assert torch.equal(deep.tensors[f"banks.{n}"], a.tensors[f"banks.{old[tuple(names)]}"])
            assert all(torch.equal(deep.tensors[f"{p}.alpha"], a.tensors[f"{p}.alpha"])
                       for p in names)
    assert kept >= len(old) - 4  # at most one bank a stage now also serves a new layer


@pytest.mark.parametrize("name,size,options", [
    ("torchvision:resnet18", 32, {}), ("timm:vit_tiny_patch16_224", 32, {"img_size": 32})])
def test_a_twin_deepens_by_mixture_from_its_stage_templates(tmp_path, name, size, options):
    """deepen's default for a twin: each new layer mixes templates its stage learned, with
    coefficients orthogonal to the stage's layers sharing its bank at their mean norm,
    except the layers that end a residual branch (zero coefficients: the function kept)."""
    from mgrow.growth import deepen
    from mgrow.mixing import mixed_layers
    arch = ArchSpec(name=name, num_classes=10, input_size=size, options=options)
    a, _ = _members(tmp_path, arch)
    man, tensors, notes = deepen(a, 1, "all", seed=3)
    assert man.lineage.options["init"] == "mixture"
    deep = load(save(tmp_path / "deep.safetensors", man, tensors))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(deep.model().eval()(x), a.model().eval()(x))
    old, new = mixed_layers(a.model()), mixed_layers(deep.model())
    banks = [deep.tensors[f"banks.{n}"] for n in range(len(deep.model().banks))]
    learned = [a.tensors[f"banks.{n}"] for n in range(len(a.model().banks))]
    zeroed = [n.split(": zeroed ") for n in notes if ": zeroed " in n]
    ends = {f"{p}.{e}" for p, es in zeroed for e in es.split(", ")}
    mixed = 0
    for k, layer in new.items():
        if k in old:
            continue
        alpha = deep.tensors[f"{k}.alpha"]
        if k in ends:
            assert not alpha.any(), k
            continue
        bank = banks[layer.bank_index]  # templates the stage learned, carried
        assert any(torch.equal(bank[:, :t.shape[1]], t[:, :bank.shape[1]]) for t in learned), k
        peers = [p for p, v in new.items() if v.bank_index == layer.bank_index and p in old]
        for p in peers:
            ref = deep.tensors[f"{p}.alpha"][..., :alpha.shape[-1]]
            assert (alpha * ref).sum(-1).abs().max() <= 1e-5, (k, p)
        assert alpha.norm(dim=-1).min() > 0.1
        mixed += 1
    assert mixed >= 2


def test_export_names_the_builders_own_wider_network(tmp_path):
    """A grown builder's network that the builder makes under a wider width option is
    named by export, and its state_dict loads strictly into that network with the same
    logits; one no width option makes (resnet18 x2) is not named."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    for name, net in (("mobilenet_v2", torchvision.models.mobilenet_v2(num_classes=10)),
                      ("resnet18", torchvision.models.resnet18(num_classes=10))):
        torch.save(net.state_dict(), tmp_path / f"{name}.pth")
        small, grown = tmp_path / f"{name}.safetensors", tmp_path / f"{name}x2.safetensors"
        assert run_main("convert", tmp_path / f"{name}.pth", "--arch", f"torchvision:{name}",
                        "--input-size", 32, "--plain", "-o", small).returncode == 0
        assert run_main("fuse", small, "--method", "net2net", "--noise", 0,
                        "-o", grown).returncode == 0
        out = tmp_path / f"{name}-plain.safetensors"
        r = run_main("export", grown, "-o", out)
        assert r.returncode == 0, r.stderr
        if name == "resnet18":
            assert "loads strictly" not in r.stdout
            continue
        assert "get_model('mobilenet_v2', num_classes=10, width_mult=2.0)" in r.stdout
        wide = torchvision.models.get_model("mobilenet_v2", num_classes=10,
                                            width_mult=2.0).eval()
        wide.load_state_dict(load_file(out), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert _relative(wide(x), net.eval()(x)) <= 1e-5


def test_a_timm_twin_learns_real_cifar10(tiny_cifar, tmp_path):
    """A second builder's network (timm's ResNet-10-T, template-mixed by default) on real
    CIFAR-10 images: the training loss falls over two epochs."""
    import re
    out = tmp_path / "r10.safetensors"
    r = run_main("train", "--arch", "timm:resnet10t", "--data", f"npz:{tiny_cifar}",
                 "--epochs", 2, "--lr", 0.05, "--batch-size", 50, "-o", out)
    assert r.returncode == 0, r.stderr
    assert load(out).manifest.mixing is not None
    losses = [float(v) for v in re.findall(r"epoch \d/2\s+loss ([\d.]+)", r.stdout + r.stderr)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.05, r.stdout + r.stderr


def test_a_fresh_wide_builders_net_is_the_builders_own_where_one_exists():
    """Built wide from scratch (Large), a builder's network takes the builder's own
    initialisation where a width option makes its tensors (mobilenet_v2 x2: width_mult
    2.0), exactly as the builder seeded alike; otherwise (resnet18 x2) every layer's own."""
    arch = ArchSpec(name="torchvision:mobilenet_v2", width=2, num_classes=10, input_size=32)
    net = build(arch, seed=5)
    torch.manual_seed(5)
    want = torchvision.models.mobilenet_v2(num_classes=10, width_mult=2.0)
    for key, value in want.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    wide = build(ArchSpec(name="torchvision:resnet18", width=2, input_size=32), seed=5)
    assert build(ArchSpec(name="torchvision:resnet18", width=2, input_size=32), meta=True
                 ).state_dict().keys() == wide.state_dict().keys()


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 64), ("vgg11_bn", 32)])
def test_the_hand_written_families_are_torchvisions_networks(name, size):
    """mgrow's plain resnet18, resnet50 and vgg11_bn have torchvision's keys and compute
    its logits exactly from the same tensors; template-mixed, a ResNet's banks pair other
    layers than its twin's (the family by its own rule, the twin consecutive layers in
    module order). (Template-mixed vgg11_bn is exactly its twin, keys and logits: checked
    by hand, as its 130M-weight classifier takes 6 GB here.)"""
    arch = ArchSpec(name=name, num_classes=10, input_size=size)
    family = build(arch, None, seed=0).eval()
    tv = torchvision.models.get_model(name, num_classes=10).eval()
    tv.load_state_dict(family.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(family(x), tv(x))
    if name == "vgg11_bn":
        return
    mixed = build(arch, MixingSpec(), seed=0).eval()
    twin_ = build(arch.model_copy(update={"name": f"torchvision:{name}"}), MixingSpec(),
                  seed=0).eval()
    same = {k: tuple(v.shape) for k, v in mixed.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in twin_.state_dict().items()}
    assert not same
