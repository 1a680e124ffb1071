"""The Python API (README's example, run as written), `mgrow info` and `mgrow cka`.

README's example trains a half-width wrn-10-1 on the real built-in digits, its sibling,
fuses them and finetunes the grown net to a budget (about 10 s on one core); the tests of
`info` and `cka` read the bundles it leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mgrow
from mgrow.data import batches
from mgrow.similarity import cka_models, grams, images, linear_cka
from conftest import ROOT, run_main


def readme_example() -> str:
    """Return the code of the first python block under README's `## Python API`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, dict]:
    """Run README's example in a fresh folder; return the folder and its variables."""
    folder = tmp_path_factory.mktemp("example")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        scope: dict = {}
        exec(compile(readme_example(), "README.md", "exec"), scope)
    finally:
        mp.undo()
    return folder, scope


def test_readme_example_runs_the_pipeline(example):
    """The example's objects are what it says: trained bundles on disk, a grown net twice
    as wide that computes the same function as its bundle, and a ledger at the budget."""
    folder, v = example
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "final.safetensors", "small-grown.safetensors", "small-sibling.safetensors",
        "small.safetensors"]
    assert v["small"].result.accuracy > 0.5 and v["final"].result.accuracy > 0.5  # chance 0.1
    bundle = mgrow.load(folder / "final.safetensors")
    assert bundle.manifest.arch.width == 2 * mgrow.load(folder / "small.safetensors"
                                                        ).manifest.arch.width
    assert abs(v["report"]["ledger"]["growth_norm"] - 0.45) < 0.02
    # build_model gives the network whose accuracy the CLI reports
    data = mgrow.DataSource("digits").load()
    x, y = next(iter(batches(data, False, 360, 0, 0)))
    with torch.no_grad():
        acc = (v["net"](x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(mgrow.evaluate(folder / "final.safetensors")["top1"], abs=1e-12)
    assert v["lineage"]["operation"] == "finetune"
    assert set(v["sim"].matched()) == set(v["sim"].layers_a)  # same layer names, 2x wider


def test_api_is_what_the_cli_calls(example):
    """`import mgrow` is light (no torch until an API name is used) and the CLI's
    eval/flops print the API's numbers."""
    folder, _ = example
    probe = subprocess.run([sys.executable, "-c", "import sys, mgrow; print('torch' in "
                            "sys.modules); mgrow.load; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == ["False", "True"]
    res = run_main("eval", "final.safetensors", "--json", cwd=folder)
    assert json.loads(res.stdout)["top1"] == mgrow.evaluate(folder / "final.safetensors")["top1"]
    res = run_main("flops", "final.safetensors", "--json", cwd=folder)
    assert json.loads(res.stdout)["params"] == mgrow.count_flops(
        folder / "final.safetensors")["params"]


# -- info -------------------------------------------------------------------------------------

def test_api_refuses_what_it_would_silently_ignore(example, tmp_path):
    """A knob beside a config (it was ignored), a sibling seeded as its small net (its twin:
    the same templates and data order) and a non-finite knob are one-line errors."""
    folder, _ = example
    small = folder / "small.safetensors"
    cfg = mgrow.TrainConfig(epochs=1)
    with pytest.raises(TypeError, match=r"not both: \['seed'\]"):
        mgrow.train_sibling(small, tmp_path / "s.safetensors", config=cfg, seed=5)
    with pytest.raises(TypeError, match=r"not both: \['epochs'\]"):
        mgrow.train("wrn-10-1", tmp_path / "t.safetensors", config=cfg, epochs=2)
    own = mgrow.load(small).manifest.lineage.options["seed"]
    for call in (lambda: mgrow.train_sibling(small, tmp_path / "s.safetensors", epochs=1,
                                             seed=own),
                 lambda: mgrow.train_sibling(small, tmp_path / "s.safetensors",
                                             config=cfg.model_copy(update={"seed": own}))):
        with pytest.raises(mgrow.MgrowError, match=f"seed {own} is the small net's own"):
            call()
    r = run_main("train-sibling", small, "--epochs", "1", "--seed", own, "-o",
                 tmp_path / "s.safetensors")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "small net's own" in r.stderr
    assert not (tmp_path / "s.safetensors").exists()
    with pytest.raises(mgrow.MgrowError, match="epochs: Input should be a finite number"):
        mgrow.train("wrn-10-1", tmp_path / "t.safetensors", epochs=float("inf"))
    with pytest.raises(mgrow.MgrowError, match="bogus: Extra inputs are not permitted"):
        mgrow.train("wrn-10-1", tmp_path / "t.safetensors", epochs=1, bogus=3)


def test_info_fields(example):
    """Manifest, lineage down to the first net, ledger and parameter counts of the final
    bundle, as JSON from the real CLI."""
    folder, _ = example
    res = run_main("info", "final.safetensors", "--json", "--reference-epochs", "4", cwd=folder)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    bundle = mgrow.load(folder / "final.safetensors")
    assert info["sha256"] == bundle.sha256
    assert info["arch"]["name"] == "wrn-10-1" and info["arch"]["width"] == 1.0
    assert info["mixing"]["factor"] == 2 and info["mixing"]["members"] == 2
    assert info["data"]["spec"] == "digits" and info["growth"]["init"] == "orthogonal"
    lin = info["lineage"]
    assert (lin["operation"], lin["options"]["budget"]) == ("finetune", 0.45)
    [grown] = lin["parents"]
    assert grown["status"] == "found" and grown["path"] == "small-grown.safetensors"
    fuse = grown["lineage"]
    assert fuse["operation"] == "fuse" and fuse["options"]["init"] == "orthogonal"
    small, sibling = fuse["parents"]
    assert small["lineage"]["operation"] == "train"
    assert small["lineage"]["options"]["epochs"] == 4
    assert sibling["lineage"]["operation"] == "train-sibling"
    assert sibling["lineage"]["options"]["seed"] == 1  # SMALL's seed + 1
    assert sibling["lineage"]["parents"][0]["sha256"] == small["sha256"]
    assert [h["operation"] for h in lin["history"]] == ["train", "fuse"]
    # the ledger: the small net (base), the sibling and the finetune (growth)
    rows = info["ledger"]["rows"]
    assert [(r["operation"], r["stage"]) for r in rows] == [
        ("train", "base"), ("train-sibling", "growth"), ("finetune", "growth")]
    assert info["ledger"]["growth_norm"] == pytest.approx(0.45, abs=0.02)
    # parameters: every stored tensor except BN running statistics is a parameter
    stored = sum(t.numel() for k, t in bundle.tensors.items()
                 if not re.search(r"running_|num_batches", k))
    assert info["params"]["total"] == stored
    assert info["params"]["templates"] == bundle.tensors["banks.0"].numel() + sum(
        t.numel() for k, t in bundle.tensors.items() if k.startswith("banks.") and k != "banks.0")


def test_info_names_missing_and_changed_parents(example, tmp_path):
    """A parent moved away is `missing`; one rewritten since is `changed`; the text view
    says so and exits 0."""
    folder, _ = example
    for name in ("final.safetensors", "small-grown.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    res = run_main("info", "final.safetensors", "--json", cwd=tmp_path)
    grown = json.loads(res.stdout)["lineage"]["parents"][0]
    assert [p["status"] for p in grown["lineage"]["parents"]] == ["missing", "missing"]
    (tmp_path / "small-grown.safetensors").write_bytes(b"something else")
    res = run_main("info", "final.safetensors", cwd=tmp_path)
    assert res.returncode == 0 and "changed since (sha256 differs)" in res.stdout
    assert "templates" in res.stdout and "training-FLOPs ledger" in res.stdout


# -- cka --------------------------------------------------------------------------------------

def test_cka_of_a_bundle_with_itself_is_one_on_the_diagonal(example):
    folder, _ = example
    res = run_main("cka", "small.safetensors", "small.safetensors", "--json", cwd=folder)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["images"] == 360  # the whole digits test split (< 512)
    m = np.array(out["matrix"])
    assert m.shape == (len(out["layers_a"]),) * 2 == (10, 10)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    off = m[~np.eye(len(m), dtype=bool)]
    assert (off < 1 - 1e-3).all() and (off > 0).all()  # other layers differ


def test_cka_json_is_strict_where_a_layer_does_not_vary(example, tmp_path):
    """A layer whose output is the same for every image has no CKA: `--json` prints null
    there (json.dumps would print NaN, which strict JSON parsers refuse)."""
    from mgrow.bundle import save
    folder, _ = example
    small = mgrow.load(folder / "small.safetensors")
    head = next(k.removesuffix(".bias") for k in small.tensors if k.endswith(".bias")
                and small.tensors[k].numel() == 10)  # the classifier: 10 classes
    flat = {k: torch.zeros_like(v) if k.startswith(head + ".") else v
            for k, v in small.tensors.items()}  # constant logits
    save(tmp_path / "flat.safetensors", small.manifest, flat)
    res = run_main("cka", folder / "small.safetensors", tmp_path / "flat.safetensors",
                   "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    col = out["layers_b"].index(head)
    assert all(row[col] is None for row in out["matrix"])
    assert out["matched"][head] is None
    assert all(v is not None for k, v in out["matched"].items() if k != head)


def test_cka_feeds_each_bundle_its_own_normalisation(example, tmp_path):
    """B recording another std sees the images normalised by it (it was fed A's): small
    against itself re-recorded with twice the std is small on x against small on x / 2."""
    from mgrow.bundle import save
    folder, _ = example
    small = mgrow.load(folder / "small.safetensors")
    man = small.manifest
    data = man.data.model_copy(update={"std": tuple(2 * s for s in man.data.std)})
    save(tmp_path / "b.safetensors", man.model_copy(update={"data": data}), small.tensors)
    got = mgrow.cka(folder / "small.safetensors", tmp_path / "b.safetensors")
    x = images(mgrow.DataSource("digits").load(man.data), 360)
    net = small.model()
    np.testing.assert_allclose(got.matrix, cka_models(net, net, x, x / 2).matrix, atol=1e-9)
    assert min(got.matrix[i][i] for i in range(len(got.matrix))) < 1 - 1e-3  # not x for both


def _features(bundle: Path, layer: str, n: int = 300) -> torch.Tensor:
    """Return one layer's output (n, ...) of a bundle on the first n digits test images."""
    model = mgrow.build_model(bundle).eval()
    got = {}
    dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, y: got.__setitem__("y", y))
    with torch.no_grad():
        model(images(mgrow.DataSource("digits").load(), n))
    return got["y"]


def test_cka_invariances_on_real_features(example):
    """Invariant to an orthogonal transform and an isotropic scaling of either side, not
    to a generic invertible transform."""
    folder, _ = example
    x = _features(folder / "small.safetensors", "blocks.1.conv2").flatten(1).double()
    y = _features(folder / "final.safetensors", "blocks.1.conv2").flatten(1).double()
    base = linear_cka(x, y)
    assert 0.05 < base < 0.999
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64,
                                       generator=gen))
    assert linear_cka(x @ q * 3.7, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    a = torch.randn(x.shape[1], x.shape[1], dtype=torch.float64, generator=gen)
    assert abs(linear_cka(x @ a, y) - base) > 1e-3
    assert linear_cka(x @ q * 3.7, x) == pytest.approx(1.0, abs=1e-10)


def test_cka_matches_numpy_across_widths(example):
    """Every entry of the small-vs-grown matrix (layers of different widths) equals the
    feature-space formula ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) computed in numpy."""
    folder, _ = example
    data = mgrow.DataSource("digits").load()
    x = images(data, 200)
    a = mgrow.build_model(folder / "small.safetensors")
    b = mgrow.build_model(folder / "final.safetensors")
    res = cka_models(a, b, x)
    feats = {}
    for tag, model in (("a", a), ("b", b)):
        for name, m in model.named_modules():
            if name in res.layers_a:
                m.register_forward_hook(lambda m, i, y, k=(tag, name): feats.__setitem__(
                    k, y.flatten(1).double().numpy()))
        with torch.no_grad():
            model(x)
    for i, la in enumerate(res.layers_a):
        for j, lb in enumerate(res.layers_b):
            fx, fy = feats["a", la], feats["b", lb]
            fx, fy = fx - fx.mean(0), fy - fy.mean(0)
            want = (np.linalg.norm(fy.T @ fx) ** 2
                    / (np.linalg.norm(fx.T @ fx) * np.linalg.norm(fy.T @ fy)))
            assert res.matrix[i][j] == pytest.approx(want, rel=1e-9), (la, lb)
    assert feats["a", "blocks.1.conv2"].shape[1] * 2 == feats["b", "blocks.1.conv2"].shape[1]
    assert set(grams(a, x)) == set(res.layers_a)


def test_cka_png_and_refusals(example, tmp_path):
    """--png writes a PNG heat map (never over an existing file without --force); a bundle
    for other data is refused in one line."""
    pytest.importorskip("matplotlib")
    folder, _ = example
    png = tmp_path / "cka.png"
    res = run_main("cka", folder / "small.safetensors", folder / "final.safetensors",
                   "--images", "64", "--png", png)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "blocks.0.conv1" in res.stdout and "mean over 10 same-name layers" in res.stdout
    before = png.read_bytes()
    res = run_main("cka", folder / "small.safetensors", folder / "small.safetensors",
                   "--png", png)
    assert res.returncode != 0 and "exists" in res.stderr and png.read_bytes() == before
    res = run_main("cka", folder / "small.safetensors", folder / "small.safetensors",
                   "--images", "1000")
    assert res.returncode != 0
    assert res.stderr.strip() == ("mgrow: error: --images 1000 exceeds the 360 test images "
                                  "of digits")


def test_quickstart_compares_at_one_budget(tiny_cifar, tmp_path):
    """README's main job, on a tiny real CIFAR-10 folder: every phase runs, the four nets
    are shown side by side, and the growth rows spend the 0.45X budget (from the ledger)."""
    env = {**os.environ, "MGROW_CIFAR10": str(tiny_cifar), "MGROW_QUICKSTART_SUBSET": "300",
           "MGROW_QUICKSTART_EPOCHS": "4",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "qs"
    r = subprocess.run(["bash", str(ROOT / "examples/quickstart.sh"), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "built-in digits" not in r.stdout  # it took the CIFAR-10 path
    shown = dict(re.findall(r"^(small net|grown, right|grown \+ finetune|Large Match).*?"
                            r"top-1 (\d+\.\d+)%", r.stdout, re.M))
    assert set(shown) == {"small net", "grown, right", "grown + finetune", "Large Match"}
    finetuned = re.search(r"final\.safetensors: top-1 (\d+\.\d+)%", r.stdout).group(1)
    assert shown["grown + finetune"] == finetuned  # eval agrees with the run's own figure
    step = 64 / 300 / 4  # one wide-net step, as a share of the 1.00X reference
    growth = float(re.search(r"growth: (\d+\.\d+)X", r.stdout).group(1))
    assert abs(growth - 0.45) <= step, growth
    phases = mgrow.load(out / "final.safetensors").manifest.phases
    assert [p.operation for p in phases] == ["train", "train-sibling", "finetune"]
    assert mgrow.load(out / "large-match.safetensors").manifest.arch.width == 1
