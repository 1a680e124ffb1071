"""Builders' networks through the commands: convert exactly, grow, save, rebuild, export.

Real torchvision (and timm) builders, real checkpoints written by torch.save, real bundles
on disk, the CLI's own entry point; one short training run on real CIFAR-10.
"""

from __future__ import annotations

import re

import torch
import torchvision

from conftest import run_main
from mgrow.bundle import load


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _logits(path, x):
    with torch.no_grad():
        return load(path).model().eval()(x)


def test_convert_grow_export_keep_the_logits(tmp_path):
    """A DDP-prefixed torchvision checkpoint converts exactly (plain: template-mixed
    conversion is tests/test_twins.py's); net2net (noise 0) and zero
    growth keep its logits through the bundle written and rebuilt from its manifest alone;
    the .pt2 program computes the same logits without mgrow's classes."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "net.pth")
    small = tmp_path / "small.safetensors"
    r = run_main("convert", tmp_path / "net.pth", "--arch", "torchvision:mobilenet_v3_small",
                 "--input-size", 64, "--plain", "-o", small)
    assert r.returncode == 0, r.stderr
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = net(x)
    assert _relative(_logits(small, x), want) <= 1e-6
    manifest = load(small).manifest
    assert (manifest.arch.num_classes, manifest.mixing) == (7, None)  # read from the head
    for method in ("net2net", "zero"):
        out = tmp_path / f"{method}.safetensors"
        r = run_main("fuse", small, "--method", method, "--noise", 0, "-o", out)
        assert r.returncode == 0, r.stderr
        grown = load(out)
        assert grown.manifest.arch.width == 2 and grown.manifest.growth.method == method
        assert _relative(_logits(out, x), want) <= 1e-5
        params = sum(t.numel() for k, t in grown.tensors.items() if "running" not in k)
        assert params > 3 * sum(p.numel() for p in net.parameters())
    r = run_main("export", tmp_path / "zero.safetensors", "-o", tmp_path / "zero.pt2")
    assert r.returncode == 0, r.stderr
    program = torch.export.load(tmp_path / "zero.pt2").module()
    one = x[:1]
    assert torch.allclose(program(one), _logits(tmp_path / "zero.safetensors", one),
                          rtol=1e-5, atol=1e-5)


def test_noise_and_factor_keep_the_function(tmp_path):
    """net2net's noise perturbs how copies share their weight, never what they compute;
    growth by 3 keeps the logits too."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "r.pt")
    a = tmp_path / "a.safetensors"
    assert run_main("convert", tmp_path / "r.pt", "--arch", "torchvision:resnet18",
                    "--input-size", 32, "-o", a).returncode == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    b, c = tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert run_main("fuse", a, "--method", "net2net", "--noise", 0.1, "-o", b).returncode == 0
    assert run_main("fuse", a, "--method", "net2net", "--factor", 3, "--noise", 0,
                    "-o", c).returncode == 0  # (growing again: tests/test_widen.py)
    assert load(c).manifest.arch.width == 3
    assert _relative(_logits(b, x), want) <= 1e-5
    assert _relative(_logits(c, x), want) <= 1e-5
    w = load(b).tensors["layer1.0.conv2.weight"]  # copies of one input share its weight
    assert not torch.allclose(w[:, 0::2], w[:, 1::2])  # unevenly, with noise
    r = run_main("fuse", a, "--method", "random", "-o", tmp_path / "r.safetensors")
    assert r.returncode == 0
    assert _relative(_logits(tmp_path / "r.safetensors", x), want) > 1e-2


def test_refusals_are_one_line(tmp_path):
    """Unknown builders, methods a builder's net does not take yet, and networks whose
    wiring the observation cannot follow are refused in one line, nothing written."""
    r = run_main("train", "--arch", "torchvision:resnet9000", "--data", "digits",
                 "-o", tmp_path / "x.safetensors")
    assert r.returncode != 0 and "unknown torchvision classifier 'resnet9000'" in r.stderr
    assert "Traceback" not in r.stderr
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=10).state_dict(),
               tmp_path / "s.pt")
    s = tmp_path / "s.safetensors"
    assert run_main("convert", tmp_path / "s.pt", "--arch", "torchvision:shufflenet_v2_x0_5",
                    "--input-size", 64, "-o", s).returncode == 0
    r = run_main("fuse", s, "--method", "gradmax", "-o", tmp_path / "m.safetensors")
    assert r.returncode != 0 and "does not grow torchvision:shufflenet_v2_x0_5 yet" in r.stderr
    for method in ("net2net", "mixture"):  # its channel shuffle: refused by the observation
        r = run_main("fuse", s, "--method", method, "-o", tmp_path / "g.safetensors")
        assert r.returncode != 0 and "stage" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "g.safetensors").exists()


def test_timm_network_converts_and_grows(tmp_path):
    """A timm model (outside torchvision) from timm's own checkpoint layout."""
    import timm
    torch.manual_seed(2)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "t.pth.tar")
    a = tmp_path / "a.safetensors"
    r = run_main("convert", tmp_path / "t.pth.tar", "--arch", "timm:resnet10t",
                 "--input-size", 32, "-o", a)
    assert r.returncode == 0, r.stderr
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    assert _relative(_logits(a, x), want) <= 1e-6
    g = tmp_path / "g.safetensors"
    assert run_main("fuse", a, "--method", "net2net", "--noise", 0, "-o", g).returncode == 0
    assert _relative(_logits(g, x), want) <= 1e-5


def test_training_a_builders_net_lowers_the_loss(tiny_cifar, tmp_path):
    """The main job on a builder's network, on real CIFAR-10 images: train (template-mixed
    by default) with the loss falling, train a sibling, fuse the two by MixtureGrowth,
    finetune; the ledger counts the sibling as growth and the grown net's FLOPs."""
    a, s, g = (tmp_path / f"{n}.safetensors" for n in "asg")
    data = f"npz:{tiny_cifar}"
    r = run_main("train", "--arch", "torchvision:resnet18", "--data", data, "--epochs", 2,
                 "--lr", 0.02, "--batch-size", 50, "-o", a)
    assert r.returncode == 0, r.stderr
    assert load(a).manifest.mixing is not None
    phases = load(a).manifest.phases
    assert phases[0].images == 600 and phases[0].arch.startswith("torchvision:resnet18")
    losses = [float(v) for v in re.findall(r"epoch \d/2\s+loss ([\d.]+)", r.stdout + r.stderr)]
    assert len(losses) == 2 and losses[1] < losses[0], r.stdout + r.stderr
    r = run_main("train-sibling", a, "--epochs", 1, "--batch-size", 50, "-o", s)
    assert r.returncode == 0, r.stderr
    assert run_main("fuse", a, s, "-o", g).returncode == 0
    assert load(g).manifest.mixing.factor == 2 and load(g).manifest.growth.method == "mixture"
    r = run_main("finetune", g, "--epochs", 1, "--lr", 0.01, "--batch-size", 50,
                 "-o", tmp_path / "f.safetensors")
    assert r.returncode == 0, r.stderr
    ledger = load(tmp_path / "f.safetensors").manifest.phases
    assert [p.stage for p in ledger] == ["base", "growth", "growth"]
    assert ledger[2].forward_flops > 3 * ledger[0].forward_flops


def test_zero_growth_of_a_plain_family_net_and_a_fresh_wide_builders_net(tmp_path):
    """`--method zero` grows mgrow's own plain families along an observed plan, into the
    family's own wide layout (the bundle loads), keeping the logits; a template-mixed one
    grows as the plain network it computes. A builder's net built wide from scratch is
    initialised afresh (not copies of a narrow one) with the grown layout's shapes."""
    from conftest import make_bundle
    from mgrow.arch import build
    from mgrow.manifest import ArchSpec
    arch = ArchSpec(name="wrn-10-1")
    plain = make_bundle(tmp_path / "p.safetensors", arch, mixing=None, seed=3)
    out = tmp_path / "z.safetensors"
    r = run_main("fuse", plain.path, "--method", "zero", "-o", out)
    assert r.returncode == 0, r.stderr
    assert load(out).manifest.arch == arch.widened(2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = plain.model().eval()(x)
    assert _relative(_logits(out, x), want) <= 1e-5
    mixed = make_bundle(tmp_path / "m.safetensors", arch, seed=3)  # grows the plain net it
    r = run_main("fuse", mixed.path, "--method", "zero", "-o", tmp_path / "n.safetensors")
    assert r.returncode == 0, r.stderr  # computes
    assert load(tmp_path / "n.safetensors").manifest.mixing is None
    with torch.no_grad():
        assert _relative(_logits(tmp_path / "n.safetensors", x), mixed.model().eval()(x)) <= 1e-5
    wide = ArchSpec(name="torchvision:resnet18", width=2, input_size=32)
    fresh, shapes = build(wide, seed=0), build(wide, meta=True)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in shapes.state_dict().items()}
    w = fresh.layer1[0].conv1.weight
    assert w.shape == (128, 128, 3, 3) and not torch.equal(w[0::2], w[1::2])


def test_builder_options_from_the_command_line(tmp_path, tiny_cifar):
    """--builder-option KEY=VALUE reaches the builder (a narrower MobileNetV3), is recorded,
    rebuilds the net from the bundle alone, and converts a checkpoint of that net exactly;
    a bad pair, an option the builder refuses, or one for a family is one line, nothing
    written."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.5).eval()
    torch.save(net.state_dict(), tmp_path / "narrow.pth")
    out = tmp_path / "narrow.safetensors"
    r = run_main("convert", tmp_path / "narrow.pth", "--arch", "torchvision:mobilenet_v3_small",
                 "--builder-option", "width_mult=0.5", "--input-size", 32, "-o", out)
    assert r.returncode == 0, r.stderr
    b = load(out)
    assert b.manifest.arch.options == {"width_mult": 0.5}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _relative(b.model().eval()(x), net(x)) <= 1e-6
    trained = tmp_path / "t.safetensors"
    r = run_main("train", "--arch", "torchvision:mobilenet_v3_small", "--builder-option",
                 "width_mult=0.5", "--builder-option", "dropout=0.1", "--data",
                 f"npz:{tiny_cifar}", "--epochs", 1, "--batch-size", 100, "--plain",
                 "-o", trained)
    assert r.returncode == 0, r.stderr
    t = load(trained)
    assert t.manifest.arch.options == {"width_mult": 0.5, "dropout": 0.1}
    assert sum(v.numel() for v in t.tensors.values()) < sum(
        v.numel() for v in torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()
        .values()) / 2
    for arch, option, message in [
            ("torchvision:mobilenet_v3_small", "width_mult", "expected KEY=VALUE"),
            ("torchvision:resnet18", "bogus=1", "refused its options {'bogus': 1}"),
            # MobileNetV3's builder takes any keyword and reads only its own: a typo would
            # be recorded and do nothing
            ("torchvision:mobilenet_v3_small", "widht_mult=0.5", "takes no option 'widht_mult'"),
    ]:
        for command in ("train", "convert"):
            args = ("--data", f"npz:{tiny_cifar}") if command == "train" else \
                (tmp_path / "narrow.pth",)
            r = run_main(command, *args, "--arch", arch, "--builder-option", option,
                         "-o", tmp_path / "x.safetensors")
            assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, \
                (command, r.stderr)
    r = run_main("train", "--arch", "wrn-10-1", "--builder-option", "a=1", "--data",
                 f"npz:{tiny_cifar}", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "builder options are for torchvision:/timm:" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_buffers_a_state_dict_does_not_hold_are_the_builders_own(tmp_path):
    """timm's Swin keeps its relative position index and attention mask out of the
    state_dict (non-persistent buffers): a bundle rebuilds them by construction, where
    uninitialised storage (`to_empty`) made garbage indices and crashed or, for a float
    mask, computed silently wrong logits."""
    from mgrow.arch import build
    from mgrow.bundle import save_model
    from mgrow.manifest import ArchSpec, Lineage, Manifest
    arch = ArchSpec(name="timm:swin_tiny_patch4_window7_224", input_size=64,
                    options={"img_size": 64, "window_size": 4})
    net = build(arch, seed=0).eval()
    held = net.state_dict()
    assert any(name not in held for name, _ in net.named_buffers())
    path = save_model(tmp_path / "swin.safetensors", Manifest(
        arch=arch, lineage=Lineage(operation="init")), net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load(path).model().eval()(x), net(x))
    r = run_main("export", path, "-o", tmp_path / "swin.pt2")  # the program too
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert torch.allclose(torch.export.load(tmp_path / "swin.pt2").module()(x[:1]),
                              net(x[:1]), atol=1e-5)
