"""examples/replicate.py at a tiny scale: every row is produced with a consistent ledger."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from conftest import ROOT


def _replicate():
    spec = importlib.util.spec_from_file_location("replicate", ROOT / "examples/replicate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_row_with_consistent_ledger(tiny_cifar, tmp_path, capsys):
    from mgrow.bundle import load
    from mgrow.files import sha256_file
    rep = _replicate()
    out = tmp_path / "rep"
    rep.main(["--scale", "tiny", "--rows", "all", "--out", str(out), "--quiet",
              "--data", f"npz:{tiny_cifar}"])
    result = json.loads((out / "results.json").read_text())
    runs = {r["row"]: r for r in result["runs"]}
    expected = rep.MAIN + rep.ABLATIONS + tuple(f"mg-lr-{x:g}" for x in rep.LRS) + tuple(
        f"mg-point-{x:g}" for x in rep.POINTS) + rep.LEVERS
    assert set(runs) == set(expected)
    scale = rep.SCALES["tiny"]
    step = scale["batch"] / scale["subset"] / scale["epochs"]  # one large-net step, normalised
    assert not result["meta"]["data"].partition(":")[2].startswith("/")  # project-relative
    plain_start = ("mg-converted", "mg-converted-sibling", "random-plain", "net2net-plain")
    runner = rep.Runner(out / "seed0", rep.SCALES["tiny"], 0, f"npz:{tiny_cifar}", True, "t")
    for name, r in runs.items():
        assert 0 <= r["top1"] <= 1 and r["ledger"], name
        assert r["commit"] and r["commit"] in (result["meta"]["commit"],
                                               result["meta"]["commit"] + "-dirty")
        if r["top1_at_growth"] is not None:  # growth rows: the same budget, from the ledger
            # (every growth phase charged: the finetune's epochs round to the nearest step)
            assert abs(r["flops_norm"] - scale["budget"]) <= step / 2 + 1e-9, \
                (name, r["flops_norm"])
            # exactly: the finetune trains the steps the budget leaves after every other
            # growth phase (sibling, growth step, BN recalibration), to the nearest step
            growth = [p for p in r["ledger"] if p["stage"] == "growth"]
            ft, ref = growth[-1], sum(p["train_flops"] for p in growth) / r["flops_norm"]
            per_step = ft["train_flops"] / ft["images"] * scale["batch"]
            left = scale["budget"] * ref - sum(p["train_flops"] for p in growth[:-1])
            assert ft["images"] == scale["batch"] * round(left / per_step), name
            start = "small-plain" if name in plain_start else "small-templates-4" if \
                name == "mg-templates-4" else "small"
            assert r["start_sha256"] == rep.weights_sha(out / f"seed0/{start}.safetensors")
            grown = load(runner.grown(name))
            assert r["grown_sha256"] == rep.weights_sha(grown.path), name
            assert grown.manifest.lineage.parents[0].sha256 == sha256_file(
                out / ("seed0/small-converted.safetensors" if name.startswith("mg-converted")
                       else f"seed0/{start}.safetensors")), name  # grown from that very start
            stages = [p["stage"] for p in r["ledger"]]
            assert stages[0] == "base" and stages[-1] == "growth"
            # one post-growth rule for every growth row: BN recalibrated, then finetuned
            ops = [p["operation"] for p in r["ledger"] if p["stage"] == "growth"]
            assert ops[-2:] == ["bn-recalibrate", "finetune"], (name, ops)
    assert runs["large"]["flops_norm"] == pytest.approx(1.0, abs=step)
    assert runs["large-match"]["flops_norm"] == pytest.approx(scale["budget"], abs=step)
    assert runs["small-match"]["flops_norm"] == pytest.approx(scale["budget"], abs=step)
    assert runs["small"]["flops_norm"] < 0.5  # the half-width net costs about a quarter
    for name in ("gradmax", "firefly"):  # their growth step is charged like any phase
        fused = [p for p in runs[name]["ledger"] if p["operation"] == "fuse"]
        assert len(fused) == 1 and fused[0]["stage"] == "growth" and fused[0]["train_flops"] > 0
        assert name in fused[0]["arch"]
    sibling = [p for p in runs["mg"]["ledger"] if p["operation"] == "train-sibling"]
    assert len(sibling) == 1 and sibling[0]["stage"] == "growth"
    # the lever "more templates": its own small net and sibling, 4 templates a layer
    assert load(out / "seed0/mg-templates-4.safetensors").manifest.mixing.templates == 4
    assert runs["mg-templates-4"]["ledger"][0]["arch"] == "wrn-16-1 x0.5 mixed"
    # the lever "warm-up after growth": `mg`'s very grown net, finetuned without a warm-up,
    # and each finetune's lineage records the warm-up it ran with
    assert runs["mg-warmup-0"]["grown_sha256"] == runs["mg"]["grown_sha256"]
    warmups = {name: load(out / f"seed0/{name}.safetensors").manifest.lineage.options[
        "warmup_epochs"] for name in ("mg", "mg-warmup-0")}
    assert warmups == {"mg": 1.0, "mg-warmup-0": 0.0}
    assert not [p for p in runs["mg-nofusion"]["ledger"] if p["operation"] == "train-sibling"]
    # the converted checkpoint's own training is its base; growing it costs the budget
    base = [p for p in runs["mg-converted"]["ledger"] if p["stage"] == "base"]
    assert base == [p for p in runs["small-plain"]["ledger"]]
    # mg-converted-sibling fuses the converted net with `mg`'s sibling: train-sibling on the
    # converted bundle trains bit for bit the same net (same architecture, mixing, data, seed)
    from mgrow.phases import train_sibling
    cfg = runner.cfg(scale["point"] * scale["epochs"]).model_copy(update={"seed": 1000})
    own = train_sibling(out / "seed0/small-converted.safetensors", runner.source, cfg,
                        tmp_path / "own-sibling.safetensors", progress="quiet")
    shared = load(out / "seed0/sibling-0.8.safetensors").tensors
    assert all(torch.equal(v, shared[k]) for k, v in load(own.path).tensors.items())
    assert [p["operation"] for p in runs["mg-converted-sibling"]["ledger"]
            if p["stage"] == "growth"][0] == "train-sibling"
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    assert "- random: " in table and "- large: " in table  # mg against each, per seed
    # a later session on a fresh machine (bundles gone, results.json committed) keeps the
    # recorded rows, retrains none of them, and loses none of those it does not revisit
    for f in (out / "seed0").iterdir():
        f.unlink()
    rep.main(["--scale", "tiny", "--rows", "small,mg,net2net-lr-0.05", "--out", str(out),
              "--quiet", "--data", f"npz:{tiny_cifar}"])
    again = json.loads((out / "results.json").read_text())["runs"]
    assert again[:-1] == result["runs"] and not (out / "seed0/mg.safetensors").exists()
    # a growth row + -lr-X: the same growth, finetuned at peak lr X under the same budget
    tuned = again[-1]
    assert tuned["row"] == "net2net-lr-0.05" and tuned["top1_at_growth"] is not None
    # small retrained with the same seed is bit for bit the one the recorded rows grew from,
    # and net2net regrown from it is the very net the recorded net2net row finetuned
    assert tuned["start_sha256"] == runs["net2net"]["start_sha256"]
    assert tuned["grown_sha256"] == runs["net2net"]["grown_sha256"]
    assert tuned["top1_at_growth"] == runs["net2net"]["top1_at_growth"]
    lineage = load(out / "seed0/net2net-lr-0.05.safetensors").manifest.lineage
    assert (lineage.operation, lineage.options["lr"]) == ("finetune", 0.05)
    assert scale["rule"]["lr"] != 0.05
    assert abs(tuned["flops_norm"] - scale["budget"]) <= step + 1e-9
    with pytest.raises(SystemExit, match="holds scale 'tiny'"):
        rep.main(["--scale", "cpu", "--out", str(out), "--report-only"])
    rep.main(["--scale", "tiny", "--estimate", "--data", f"npz:{tiny_cifar}"])
    hours = capsys.readouterr().out
    assert all(re.search(rf"^{name} +\d+\.\d min$", hours, re.M) for name in rep.MAIN)
    rep.SCALES["tiny"]["epochs"] = 2  # the scale redefined: its old rows are not reused
    try:
        with pytest.raises(SystemExit, match="other settings .epochs 1, now 2"):
            rep.main(["--scale", "tiny", "--out", str(out), "--report-only"])
    finally:
        rep.SCALES["tiny"]["epochs"] = 1


def test_row_names_are_checked_before_anything_trains(tmp_path):
    rep = _replicate()
    assert rep.parse_row("large") == ("large", None)
    assert rep.parse_row("mg-init-zero") == ("mg-init-zero", None)
    assert rep.parse_row("net2net-lr-0.02") == ("net2net", 0.02)
    assert rep.parse_row("mg-point-0.5-lr-1e-4") == ("mg-point-0.5", 1e-4)
    assert rep.parse_row("mg-templates-4") == ("mg-templates-4", None)
    assert rep.parse_row("mg-warmup-0.5") == ("mg-warmup-0.5", None)
    for bad in ("mgg", "large-lr-0.1", "mg-lr-x", "mg-lr--1", "mg-init-bogus", "mg-point-2",
                "mg-templates-0", "mg-templates-x", "mg-warmup-x", "mg-warmup--1"):
        with pytest.raises(SystemExit, match=re.escape(f"unknown row {bad!r}")):
            rep.parse_row(bad)
    with pytest.raises(SystemExit, match="unknown row 'mgg'"):
        rep.main(["--scale", "tiny", "--rows", "small,mgg", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_verdict_pairs_runs_by_seed():
    """results.md's test: mg minus each row per seed, ahead by more than 2 sd of that?"""
    rep = _replicate()
    table = [(0, "mg", .80), (0, "random", .79), (0, "net2net", .79), (0, "large", .83),
             (1, "mg", .81), (1, "random", .795), (1, "net2net", .798),
             (2, "mg", .80), (2, "random", .805), (2, "net2net", .792), (3, "random", .70),
             (0, "gradmax", .79), (1, "gradmax", .79)]
    runs = [{"seed": s, "row": r, "top1": v} for s, r, v in table]
    text = rep.verdict(runs)
    assert "- random: +0.67 +- 1.04 over 3 seeds: no" in text  # 1.0, 1.5, -0.5
    assert "- net2net: +1.00 +- 0.20 over 3 seeds: yes" in text  # 1.0, 1.2, 0.8
    assert "- large: -3.00 (1 seed: no spread yet)" in text
    assert "- gradmax: +1.50 +- 0.71 over 2 seeds: too few seeds to call" in text
    assert "firefly" not in text and "warning" not in text
    for r, sha in zip(runs[:3], ("aa", "aa", "bb")):  # seed 0's rows from two small nets
        r["start_sha256"] = sha
    assert "- warning: seed 0's growth rows grew from 2 different small nets (aa, bb)" in \
        rep.verdict(runs)
    # growth of the converted plain checkpoint against the baselines grown from it
    plain = [{"seed": s, "row": r, "top1": v, "start_sha256": "cc"} for s, r, v in
             [(0, "mg-converted", .79), (0, "random-plain", .78), (0, "net2net-plain", .80),
              (1, "mg-converted", .80), (1, "random-plain", .785), (1, "net2net-plain", .80)]]
    text = rep.verdict(runs + plain, "mg-converted", rep.VERDICTS["mg-converted"])
    assert "- random-plain: +1.25 +- 0.35 over 2 seeds: too few seeds to call" in text
    assert "- net2net-plain: -0.50 +- 0.71 over 2 seeds" in text
    assert "random:" not in text and "warning" not in text  # seed 0's small nets: not its
    assert rep.verdict(runs, "mg-converted", rep.VERDICTS["mg-converted"]) == ""  # no pairs


def test_summary_shows_spread_only_over_seeds():
    """results.md's table: mean +- sd over seeds; one seed has no spread to show."""
    rep = _replicate()
    runs = [{"seed": s, "row": "mg", "top1": v, "top1_at_growth": None, "start_top1": None,
             "flops_norm": .45} for s, v in ((0, .80), (1, .82))]
    runs.append({"seed": 0, "row": "random", "top1": .79, "top1_at_growth": .5,
                 "start_top1": .78, "flops_norm": .45})
    lines = rep.summarise(runs, "tiny", rep.SCALES["tiny"]).splitlines()
    assert lines[2] == "| mg | 81.00 +- 1.41 |  |  | 0.450X | 2 |"
    assert lines[3] == "| random | 79.00 | 50.00 | 1.00 | 0.450X | 1 |"


def test_imagenet_recipe_end_to_end_on_a_photo_folder(image_folder, tmp_path):
    """`--scale imagenet-tiny`: the ImageNet recipe's code path (resnet50 at half width ->
    resnet50, streamed image folder, the paper's ImageNet rows) on real photographs."""
    from mgrow.data.transforms import IMAGENET_MEAN
    rep = _replicate()
    out = tmp_path / "imagenet"
    rep.main(["--scale", "imagenet-tiny", "--out", str(out), "--quiet",
              "--data", f"imagefolder:{image_folder}"])
    runs = {r["row"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert tuple(runs) == rep.IMAGENET_ROWS == ("small", "large", "large-match", "random",
                                                "net2net", "mg")
    scale = rep.SCALES["imagenet-tiny"]
    per_epoch = 120 // scale["batch"]
    step = 1 / per_epoch / scale["epochs"]  # one large-net step, normalised
    for name in ("random", "net2net", "mg"):
        assert abs(runs[name]["flops_norm"] - scale["budget"]) <= step + 1e-9, name
    assert runs["large-match"]["flops_norm"] == pytest.approx(scale["budget"], abs=step)
    sibling = [p for p in runs["mg"]["ledger"] if p["operation"] == "train-sibling"]
    assert sibling[0]["images"] == round(scale["point"] * scale["epochs"] * per_epoch) * \
        scale["batch"]  # the growth point: 0.8 of a full run
    from mgrow.bundle import load
    for name, width in (("small", 0.125), ("large", 0.25), ("mg", 0.25)):
        man = load(out / "seed0" / f"{name}.safetensors").manifest
        assert (man.arch.name, man.arch.width) == ("resnet50", width)
        assert man.data.spec == f"imagefolder:{image_folder}"
        assert (man.data.input_size, man.data.mean) == (32, IMAGENET_MEAN)


def test_rows_another_run_records_meanwhile_are_kept(tiny_cifar, tmp_path, monkeypatch):
    """Two runs into one --out (one paused while the other trains): each writes its rows
    into what the file holds at the time, so neither loses the other's."""
    rep = _replicate()
    out = tmp_path / "rep"
    real = rep.Runner.row

    def row(self, name):
        if name == "small-plain":  # meanwhile, another run records seed 5's large
            held = json.loads((out / "results.json").read_text())
            held["runs"].append(dict(held["runs"][0], row="large", seed=5))
            (out / "results.json").write_text(json.dumps(held))
        return real(self, name)
    monkeypatch.setattr(rep.Runner, "row", row)
    rep.main(["--scale", "tiny", "--rows", "small,small-plain", "--out", str(out), "--quiet",
              "--data", f"npz:{tiny_cifar}"])
    runs = {(r["seed"], r["row"]) for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs == {(0, "small"), (0, "small-plain"), (5, "large")}


def test_a_builders_network_replicates(tiny_cifar, tmp_path):
    """The builder scale's code path (issue 22, item 8): timm's ResNet-10-T, template-mixed,
    grown by MixtureGrowth with a sibling and by net2net, each within the growth budget,
    from the very small net the row records."""
    from mgrow.bundle import load
    rep = _replicate()
    out = tmp_path / "rep"
    rep.main(["--scale", "builder-tiny", "--rows", "small,mg,net2net", "--out", str(out),
              "--quiet", "--data", f"npz:{tiny_cifar}"])
    runs = {r["row"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"small", "mg", "net2net"}
    scale = rep.SCALES["builder-tiny"]
    step = scale["batch"] / scale["subset"] / scale["epochs"]
    small = load(out / "seed0/small.safetensors")
    assert small.manifest.arch.width == 1 and small.manifest.mixing is not None
    for name in ("mg", "net2net"):
        r = runs[name]
        assert abs(r["flops_norm"] - scale["budget"]) <= step / 2 + 1e-9, (name, r)
        assert r["start_sha256"] == rep.weights_sha(small.path)
        grown = load(out / f"seed0/{name}.grown.safetensors")
        assert grown.manifest.arch.width == 2 and grown.manifest.arch.name == "timm:resnet10t"
        assert (grown.manifest.mixing is not None) == (name == "mg")
