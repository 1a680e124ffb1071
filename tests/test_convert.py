"""`convert` is exact for every architecture, and refuses what it cannot map."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torchvision

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.bundle import load
from mgrow.convert import convert_state, read_checkpoint
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.mixing import mixed_layers

from conftest import randomize_norms, run_main

ARCHS = [
    ArchSpec(name="wrn-16-2"),
    ArchSpec(name="wrn-16-2", norm="block", width=0.5),
    ArchSpec(name="resnet18", width=0.5),
    ArchSpec(name="resnet34", width=0.25),
    ArchSpec(name="resnet50", width=0.25),
    ArchSpec(name="vgg11_bn", width=0.25),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _mixed_logits(state, arch, x, mixing=MixingSpec()):
    model = build(arch, mixing, meta=True)  # takes the converted tensors themselves (no copy)
    model.load_state_dict(convert_state(state, arch, mixing), strict=True, assign=True)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a.name}-{a.norm}-x{a.width}")
def test_convert_is_exact(arch, cifar_batch):
    plain = randomize_norms(build(arch, seed=3), 3).eval()
    with torch.no_grad():
        ref = plain(cifar_batch)
    assert _rel(ref, _mixed_logits(plain.state_dict(), arch, cifar_batch)) <= 1e-5


@pytest.mark.parametrize("name,factory", [("resnet18", torchvision.models.resnet18),
                                          ("vgg11_bn", torchvision.models.vgg11_bn)])
def test_convert_torchvision_checkpoints(name, factory, cifar_batch):
    torch.manual_seed(0)
    tv = randomize_norms(factory(num_classes=10), 0).eval()
    with torch.no_grad():
        ref = tv(cifar_batch)
    arch = ArchSpec(name=name, num_classes=10)
    assert _rel(ref, _mixed_logits(tv.state_dict(), arch, cifar_batch)) <= 1e-5


def test_checkpoint_without_bn_counters_converts(tmp_path, cifar_batch):
    """A checkpoint saved before PyTorch 0.4.1 has no num_batches_tracked: torch's BN loader
    fills in zeros (torchvision loads it), and convert does the same, exactly."""
    tv = randomize_norms(torchvision.models.resnet18(num_classes=10), 1).eval()
    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(tv.state_dict())
    torch.save(old, tmp_path / "old.pth")
    torchvision.models.resnet18(num_classes=10).load_state_dict(
        torch.load(tmp_path / "old.pth"), strict=True)  # torch's own rule
    with torch.no_grad():
        ref = tv(cifar_batch)
    for extra in ((), ("--plain",)):
        out = tmp_path / f"old{len(extra)}.safetensors"
        r = run_main("convert", tmp_path / "old.pth", "--arch", "resnet18", "-o", out, *extra)
        assert r.returncode == 0, r.stderr
        bundle = load(out)
        counters = [v for k, v in bundle.tensors.items() if k.endswith("num_batches_tracked")]
        assert len(counters) == 20 and all(int(v) == 0 for v in counters)
        with torch.no_grad():
            assert _rel(ref, bundle.model().eval()(cifar_batch)) <= 1e-5


@pytest.mark.parametrize("templates,sharing", [(2, "pairs"), (3, "pairs"), (1, "none")])
def test_convert_other_layouts_exact(templates, sharing, cifar_batch):
    arch = ArchSpec(name="wrn-16-2", width=0.5)
    plain = randomize_norms(build(arch, seed=4), 4).eval()
    with torch.no_grad():
        ref = plain(cifar_batch)
    mixing = MixingSpec(templates=templates, sharing=sharing)
    assert _rel(ref, _mixed_logits(plain.state_dict(), arch, cifar_batch, mixing)) <= 1e-5


def test_coefficients_orthonormal_and_templates_mix_every_layer():
    arch = ArchSpec(name="wrn-16-2", width=0.5)
    state = build(arch, seed=5).state_dict()
    mixed = build(arch, MixingSpec())
    mixed.load_state_dict(convert_state(state, arch, MixingSpec()))
    pair = [layer for layer in mixed_layers(mixed).values()
            if layer.role == "inner" and layer.bank.shape[1] == 4]
    a, b = (p.alpha.detach().flatten().double() for p in pair[:2])
    assert pair[0].bank is pair[1].bank
    assert abs(float(a @ b)) < 1e-6 and abs(float(a.norm()) - 1) < 1e-6
    # every template holds part of both weights: none is a pure random tensor
    w0 = state[[n for n, m in mixed_layers(mixed).items() if m is pair[0]][0] + ".weight"]
    for template in pair[0].bank[0]:
        assert abs(float(torch.nn.functional.cosine_similarity(
            template.detach().flatten(), w0.flatten(), dim=0))) > 1e-3


def test_cli_convert_formats(tmp_path, cifar_batch):
    arch = ArchSpec(name="wrn-16-2", width=0.5)
    plain = randomize_norms(build(arch, seed=6), 6).eval()
    sd = plain.state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "a.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "b.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                tmp_path / "c.safetensors")
    with torch.no_grad():
        ref = plain(cifar_batch)
    for src in ("a.pth", "b.pt", "c.safetensors"):
        r = run_main("convert", tmp_path / src, "--arch", "wrn-16-2", "--width", "0.5",
                     "-o", tmp_path / f"{src}.out.safetensors")
        assert r.returncode == 0, r.stderr
        bundle = load(tmp_path / f"{src}.out.safetensors")
        assert bundle.manifest.lineage.operation == "convert"
        with torch.no_grad():
            assert _rel(ref, bundle.model().eval()(cifar_batch)) <= 1e-5


def test_bad_checkpoints_one_line_errors(tmp_path):
    arch = ArchSpec(name="wrn-16-2", width=0.5)
    sd = build(arch).state_dict()
    extra = {**sd, "head.weight": torch.zeros(3)}
    missing = {k: v for k, v in sd.items() if k != "blocks.0.conv1.weight"}
    wrong = {**sd, "blocks.0.conv1.weight": torch.zeros(8, 8, 5, 5)}
    cases = {"extra.pt": (extra, "unexpected head.weight"),
             "missing.pt": (missing, "missing blocks.0.conv1.weight"),
             "wrong.pt": (wrong, "blocks.0.conv1.weight is (8, 8, 5, 5)")}
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(MgrowError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert_state(read_checkpoint(tmp_path / name), arch, MixingSpec())
    r = run_main("convert", tmp_path / "extra.pt", "--arch", "wrn-16-2", "--width", "0.5",
                 "-o", tmp_path / "out.safetensors")
    assert r.returncode != 0 and "unexpected head.weight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
    r = run_main("convert", tmp_path / "missing.pt", "--arch", "mobilenet", "-o",
                 tmp_path / "out.safetensors")
    assert r.returncode == 2 and "unknown architecture 'mobilenet'" in r.stderr
    r = run_main("convert", tmp_path / "extra.pt", "--arch", "wrn-16-2", "--width", "0.5",
                 "--num-classes", "100", "-o", tmp_path / "out.safetensors")
    assert r.returncode == 2 and "checkpoint has 10 classes but --num-classes is 100" in r.stderr


def test_pickle_that_executes_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    r = run_main("convert", tmp_path / "evil.pt", "--arch", "wrn-16-2", "-o",
                 tmp_path / "out.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "refused" in r.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("spare", ["permuted", "random"])
def test_spare_templates_hold_what_new_tiles_draw(spare):
    """One layer per bank, t = 2: the one direction orthogonal to the layer's coefficients
    (what an orthogonal init at growth draws) generates the spare tensor: with `permuted`
    the trained weight with shuffled channels (same entries), with `random` fresh entries at
    the weight's norm."""
    arch = ArchSpec(name="wrn-10-1")
    mixing = MixingSpec(sharing="none")
    state = randomize_norms(build(arch, seed=7), 7).state_dict()
    mixed = build(arch, mixing)
    mixed.load_state_dict(convert_state(state, arch, mixing, spare=spare))
    for name, layer in mixed_layers(mixed).items():
        if layer.role != "inner":
            continue
        a = layer.alpha.detach().flatten().double()  # (2,)
        c = torch.stack([-a[1], a[0]])  # the orthogonal direction
        made = torch.einsum("k,k...->...", c, layer.bank[0].detach().double())
        w = state[f"{name}.weight"].double()
        assert made.norm() == pytest.approx(float(w.norm()), rel=1e-5)
        same = torch.allclose(made.flatten().abs().sort().values,
                              w.flatten().abs().sort().values, atol=1e-6)
        assert same == (spare == "permuted"), name
        assert not torch.allclose(made.abs(), w.abs(), atol=1e-6)  # not the layer itself
    with pytest.raises(MgrowError, match="--spare"):
        convert_state(state, arch, mixing, spare="nosuch")
