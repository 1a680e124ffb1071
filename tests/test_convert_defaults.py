"""`convert` reads what the checkpoint answers (issue 12): classes and input channels from
the classifier and stem, input size by family, wrapper prefixes stripped, torchvision
families mgrow does not build named in the refusal."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision

from mgrow.bundle import load
from mgrow.convert import strip_wrappers, torchvision_family

from conftest import run_main


def _fvcore(model: torch.nn.Module, size: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
        fca = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total())


def test_torchvision_resnet18_converts_and_counts_without_flags(tmp_path, cifar_batch):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()  # ImageNet shape: 1000 classes
    # as Lightning saves a torch.compile'd model: every key under "model._orig_mod."
    torch.save({"state_dict": {f"model._orig_mod.{k}": v for k, v in tv.state_dict().items()},
                "epoch": 89}, tmp_path / "r18.ckpt")
    out = tmp_path / "r18.safetensors"
    r = run_main("convert", tmp_path / "r18.ckpt", "--arch", "resnet18", "-o", out)
    assert r.returncode == 0, r.stderr
    arch = load(out).manifest.arch
    assert (arch.num_classes, arch.in_channels, arch.input_size) == (1000, 3, 224)
    r = run_main("flops", out, "--json")
    assert r.returncode == 0, r.stderr
    flops = json.loads(r.stdout)["forward_flops"]
    assert flops == _fvcore(tv, 224)  # fvcore on torchvision's own model
    assert round(flops / 1e9, 2) == 1.82  # the figure everyone quotes for ResNet-18
    x = torch.nn.functional.interpolate(cifar_batch[:4], size=64, mode="bilinear")
    with torch.no_grad():
        want, got = tv(x), load(out).model().eval()(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_wrn_defaults_to_32_pixels(tmp_path):
    from mgrow.arch import build
    from mgrow.manifest import ArchSpec
    state = build(ArchSpec(name="wrn-10-1", num_classes=7, in_channels=1)).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "w.pt")
    r = run_main("convert", tmp_path / "w.pt", "--arch", "wrn-10-1", "-o", tmp_path / "w.st")
    assert r.returncode == 0, r.stderr
    arch = load(tmp_path / "w.st").manifest.arch
    assert (arch.num_classes, arch.in_channels, arch.input_size) == (7, 1, 32)


def test_strip_wrappers_nested_and_only_when_every_key_has_one():
    t = torch.zeros(1)
    assert strip_wrappers({"module._orig_mod.fc.weight": t, "module._orig_mod.fc.bias": t}) \
        == {"fc.weight": t, "fc.bias": t}
    mixed = {"model.fc.weight": t, "head.weight": t}  # not every key: nothing to strip
    assert strip_wrappers(mixed) == mixed


def _meta_state(factory) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: nothing allocated
        return factory().state_dict()


@pytest.mark.parametrize("factory,name", [
    (torchvision.models.resnet18, "resnet18"),
    (torchvision.models.resnet50, "resnet50"),
    (torchvision.models.resnet101, "resnet101"),
    (torchvision.models.wide_resnet50_2, "wide_resnet50_2"),
    (torchvision.models.wide_resnet101_2, "wide_resnet101_2"),
    (torchvision.models.resnext50_32x4d, "resnext50_32x4d"),
    (torchvision.models.vgg11_bn, "vgg11_bn"),
    (torchvision.models.vgg16, "vgg16"),
    (torchvision.models.densenet121, "densenet"),
    (torchvision.models.mobilenet_v2, "mobilenet_v2"),
    (torchvision.models.vit_b_16, "vit"),
    (torchvision.models.convnext_tiny, "convnext"),
])
def test_torchvision_families_are_recognised(factory, name):
    assert torchvision_family(_meta_state(factory)) == name


def test_refusals_name_the_family(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), tmp_path / "sq.pth")
    r = run_main("convert", tmp_path / "sq.pth", "--arch", "resnet50", "-o", tmp_path / "o.st")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "looks like torchvision's squeezenet, which mgrow does not build" in r.stderr
    assert "pass --arch torchvision:NAME" in r.stderr  # a family, not a builder name
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "r.pth")
    r = run_main("convert", tmp_path / "r.pth", "--arch", "resnet34", "-o", tmp_path / "o.st")
    assert r.returncode == 2 and "looks like torchvision's resnet18, not resnet34: pass " \
        "--arch resnet18" in r.stderr
    assert not (tmp_path / "o.st").exists()
