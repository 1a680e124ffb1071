"""`flops` agrees with fvcore on the plain network; `export` computes the same function."""

from __future__ import annotations

import json

import safetensors.torch
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis

from mgrow.arch import build
from mgrow.bundle import load, save
from mgrow.flops import epochs_for_budget, forward_flops, ledger, param_counts
from mgrow.manifest import ArchSpec, DatasetSpec, Lineage, Manifest, MixingSpec, Phase

from conftest import make_bundle, run_main


def _fvcore(model, size=32):
    fca = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, size, size))
    return fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


def test_cli_flops_json_matches_fvcore(tmp_path):
    arch = ArchSpec(name="resnet18", width=0.5)
    make_bundle(tmp_path / "m.safetensors", arch)
    r = run_main("flops", tmp_path / "m.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["forward_flops"] == _fvcore(build(arch))
    assert sum(row["flops"] for row in rep["layers"]) == rep["forward_flops"]
    r64 = json.loads(run_main("flops", tmp_path / "m.safetensors", "--json", "--input-size",
                              "64").stdout)
    assert r64["forward_flops"] == _fvcore(build(arch), 64)
    table = run_main("flops", tmp_path / "m.safetensors")
    assert "one multiply-add = one flop" in " ".join(table.stdout.split())


def test_param_counts_by_kind():
    arch = ArchSpec(name="wrn-16-2", width=0.5)
    model = build(arch, MixingSpec())
    counts = param_counts(model.state_dict(), arch, MixingSpec())
    plain = sum(p.numel() for p in build(arch).parameters())
    assert counts["plain_equivalent"] == plain
    # pairs x 4 templates, singletons x 2, stem and classifier x 1: about twice the plain
    conv = sum(p.numel() for n, p in build(arch).named_parameters()
               if n.endswith("weight") and p.dim() == 4 and n != "conv1.weight")
    edges = 8 * 3 * 9 + 64 * 10  # stem (8 channels at width 0.5) and classifier, t = 1
    assert counts["templates"] == 2 * conv + edges
    assert counts["total"] == sum(t.numel() for k, t in model.state_dict().items()
                                  if "running" not in k and "num_batches" not in k)


def _manifest(phases, train_size=1000):
    data = DatasetSpec(spec="digits", num_classes=10, channels=3, input_size=32,
                       mean=(0.5,) * 3, std=(0.2,) * 3, train_size=train_size)
    return Manifest(arch=ArchSpec(name="wrn-16-1"), mixing=MixingSpec(), data=data,
                    lineage=Lineage(operation="train"), phases=tuple(phases))


def test_ledger_and_budget_arithmetic():
    f = forward_flops(ArchSpec(name="wrn-16-1"))
    ref = 3 * f * 1000 * 200
    phase = lambda stage, frac: Phase(operation="x", arch="a", stage=stage, images=0,
                                      forward_flops=f, train_flops=int(frac * ref), wall_s=0,
                                      device="cpu")
    man = _manifest([phase("base", 0.25), phase("growth", 0.1), phase("growth", 0.05)])
    led = ledger(man)
    assert led["reference_flops"] == ref
    assert abs(led["base_norm"] - 0.25) < 1e-9 and abs(led["growth_norm"] - 0.15) < 1e-9
    assert abs(epochs_for_budget(man, 0.45) - 0.30 * 200) < 1e-6
    # the sibling spent 0.15 of a 200-epoch run = 0.30 of a 100-epoch one
    assert abs(epochs_for_budget(man, 0.45, reference_epochs=100) - (0.45 - 0.30) * 100) < 1e-6
    import pytest
    from mgrow import MgrowError
    with pytest.raises(MgrowError, match="already spent"):
        epochs_for_budget(man, 0.1)


def test_export_matches_and_loads_into_torchvision(tmp_path, cifar_batch):
    arch = ArchSpec(name="resnet18")
    b = make_bundle(tmp_path / "m.safetensors", arch)
    r = run_main("export", tmp_path / "m.safetensors", "-o", tmp_path / "plain.safetensors")
    assert r.returncode == 0, r.stderr
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"), strict=True)
    with torch.no_grad():
        ref = b.model().eval()(cifar_batch)
        out = tv.eval()(cifar_batch)
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-5
    exported = load(tmp_path / "plain.safetensors")
    assert exported.manifest.mixing is None
    assert not any(k.startswith("banks.") for k in exported.tensors)


def test_a_grown_net_exports_into_torchvision(tmp_path, cifar_batch):
    """What a user ships after growing: two resnet18 x0.5 fused, exported, loaded strictly
    into torchvision's resnet18, computing the grown net's logits."""
    from mgrow.growth import fuse
    half = ArchSpec(name="resnet18", width=0.5)
    members = [make_bundle(tmp_path / f"{n}.safetensors", half, seed=s)
               for n, s in (("a", 1), ("b", 2))]
    grown = fuse(members)
    save(tmp_path / "g.safetensors", grown.manifest, grown.tensors)
    r = run_main("export", tmp_path / "g.safetensors", "-o", tmp_path / "plain.safetensors")
    assert r.returncode == 0, r.stderr
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"), strict=True)
    with torch.no_grad():
        ref = load(tmp_path / "g.safetensors").model().eval()(cifar_batch)
        out = tv.eval()(cifar_batch)
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-5


def test_help_lists_every_subcommand():
    r = run_main("--help")
    for cmd in ("convert", "flops", "export", "fuse", "train", "train-sibling", "finetune",
                "eval"):
        assert f" {cmd} " in r.stdout, cmd
    for cmd in ("convert", "fuse", "flops", "export"):
        sub = run_main(cmd, "--help")
        assert sub.returncode == 0 and "--help" in sub.stdout
        assert "--output" in sub.stdout or cmd == "flops"


def test_cli_choices_match_the_library():
    from typing import get_args

    from mgrow.cli import options as cli
    from mgrow.growth import INITS, NAMES
    from mgrow.manifest import ArchSpec, Growth, MixingSpec

    def literal(model, field):
        return list(get_args(model.model_fields[field].annotation))

    assert [e.value for e in cli.Init] == list(INITS)
    assert [e.value for e in cli.Method] == list(NAMES) == literal(Growth, "method")
    assert [e.value for e in cli.Tiling] == literal(MixingSpec, "tiling")
    assert [e.value for e in cli.Sharing] == literal(MixingSpec, "sharing")
    assert [e.value for e in cli.Norm] == list(get_args(ArchSpec.model_fields["norm"].annotation))
    from mgrow.convert import SPARES
    assert [e.value for e in cli.Spare] == list(SPARES)
    from mgrow.engine import TrainConfig
    assert [e.value for e in cli.Schedules] == list(
        get_args(TrainConfig.model_fields["schedule"].annotation))


def test_usage_errors_are_one_line():
    for args, message in ((("fuse", "a", "--factor", "x", "-o", "y"), "--factor"),
                          (("nosuch",), "No such command"),
                          (("flops",), "Missing argument")):
        r = run_main(*args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert run_main("--version").stdout.startswith("mgrow ")
