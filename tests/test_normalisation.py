"""A bundle's recorded normalisation and training-set size are what every later command uses."""

from __future__ import annotations

import json

import pytest
import torch

from mgrow.bundle import load
from mgrow.engine import TrainConfig
from mgrow.flops import ledger, reference_flops
from mgrow.phases import fuse_files
from mgrow.data import DataSource
from mgrow.phases import evaluate_bundle, finetune, train_sibling

from conftest import run_main

# digits_200 (conftest) was trained with this configuration
CFG = TrainConfig(epochs=1, batch_size=50, device="cpu", eval_every_epoch=False)


def test_eval_with_and_without_data_agree(digits_200):
    """--data names the same set but not the subset: the recorded mean/std still apply."""
    recorded = load(digits_200).manifest.data
    full = DataSource("digits").load()
    assert full.spec.mean != recorded.mean  # the whole split's statistics differ ...
    own = evaluate_bundle(digits_200, DataSource())
    given = evaluate_bundle(digits_200, DataSource("digits"))
    assert given["loss"] == own["loss"] and given["top1"] == own["top1"]  # ... yet no effect
    cli = run_main("eval", digits_200, "--data", "digits", "--json", "--device", "cpu")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["loss"] == pytest.approx(own["loss"], rel=1e-6)


def test_finetune_on_other_size_keeps_the_recorded_data(digits_200, tmp_path):
    """Finetuning on all 1,437 images keeps the recorded 200 (the ledger's reference) and
    normalisation; the lineage says what was used, the phase row what it cost."""
    before = load(digits_200).manifest
    out = tmp_path / "ft.safetensors"
    finetune(digits_200, DataSource("digits"), CFG, out, progress="quiet")
    man = load(out).manifest
    assert man.data == before.data
    assert man.lineage.options["train_size"] == 1437
    assert man.phases[-1].images == 1437 // 50 * 50
    assert ledger(man, 10)["reference_flops"] == ledger(before, 10)["reference_flops"]


def test_finetune_normalises_with_the_recorded_statistics(digits_200, tmp_path):
    """finetune feeds the network images normalised by the bundle's recorded mean/std, not
    by statistics of the data it is given: the same data given by name or taken from the
    record trains the same weights, and a bundle recording twice the std trains others."""
    from mgrow.bundle import save
    small = load(digits_200)
    data = small.manifest.data
    doubled = tmp_path / "std2.safetensors"
    save(doubled, small.manifest.model_copy(update={"data": data.model_copy(
        update={"std": tuple(2 * s for s in data.std)})}), small.tensors)
    runs = {"named": (digits_200, DataSource("digits", subset=200)),
            "recorded": (digits_200, DataSource()),
            "doubled": (doubled, DataSource("digits", subset=200))}
    weights = {}
    for name, (bundle, source) in runs.items():
        finetune(bundle, source, CFG, tmp_path / f"{name}.safetensors", progress="quiet")
        weights[name] = load(tmp_path / f"{name}.safetensors").tensors
    assert all(torch.equal(v, weights["recorded"][k]) for k, v in weights["named"].items())
    assert not all(torch.equal(v, weights["doubled"][k]) for k, v in weights["named"].items())


def test_budget_counts_the_images_actually_used(digits_200, tmp_path):
    """A grown net finetuned to a budget on a larger set than recorded stops at the budget."""
    sib = tmp_path / "sib.safetensors"
    train_sibling(digits_200, DataSource(), CFG.model_copy(update={"seed": 1}), sib,
                  progress="quiet")
    grown = tmp_path / "grown.safetensors"
    fuse_files(digits_200, sib, grown)
    out = tmp_path / "ft.safetensors"
    finetune(grown, DataSource("digits"), CFG, out, budget=0.3, reference_epochs=10,
             progress="quiet")
    spent = sum(p.train_flops for p in load(out).manifest.phases if p.stage == "growth")
    ref = reference_flops(load(grown).manifest, 10)  # 10 epochs of the recorded 200 images
    step = 50 / 200 / 10  # one step of 50 images, normalised
    assert spent / ref == pytest.approx(0.3, abs=step)


@pytest.mark.parametrize("batch", [30, 120])
def test_budget_counts_whole_batches_only(digits_200, tmp_path, batch):
    """An epoch trains only whole batches (200 images at batch 120: one step, 120 images):
    the budget is met within half a step however much of the last batch is dropped."""
    grown = tmp_path / "grown.safetensors"
    fuse_files(digits_200, None, grown)
    out = tmp_path / "ft.safetensors"
    cfg = CFG.model_copy(update={"batch_size": batch})
    finetune(grown, DataSource(), cfg, out, budget=1.0, reference_epochs=3, progress="quiet")
    spent = sum(p.train_flops for p in load(out).manifest.phases if p.stage == "growth")
    ref = reference_flops(load(grown).manifest, 3)  # 3 epochs of the recorded 200 images
    assert spent / ref == pytest.approx(1.0, abs=batch / 200 / 3 / 2 + 1e-9)


def test_recorded_data_is_read_once_at_the_recorded_size(image_folder, monkeypatch):
    """The data a bundle recorded, loaded without --data: a streamed folder is listed (and
    its headers checked) once, cut to the recorded training size as --subset would cut it;
    a recorded size beyond what the folder holds here keeps the whole split."""
    import mgrow.data.stream as stream
    listed = []
    real = stream.list_folder
    monkeypatch.setattr(stream, "list_folder", lambda root: listed.append(root) or real(root))
    spec = f"imagefolder:{image_folder}"
    whole = DataSource(spec, input_size=32).load()
    cut = DataSource(spec, input_size=32, subset=50).load()
    for size, expected in ((50, cut), (len(whole.train_y), whole), (10**6, whole)):
        listed.clear()
        data = DataSource().load(whole.spec.model_copy(update={"train_size": size}))
        assert len(listed) == 1, size
        assert (data.train.files == expected.train.files).all(), size
        assert data.spec.input_size == 32
    recorded = DataSource("digits", subset=200).load().spec  # in memory: the same cut
    data = DataSource().load(recorded)
    assert len(data.train_y) == 200 and data.spec.mean == recorded.mean
    assert data.train_y.tolist() == DataSource("digits", subset=200).load().train_y.tolist()
    more = DataSource().load(recorded.model_copy(update={"train_size": 10**6}))
    assert len(more.train_y) == 1437  # all the digits there are
    # asked for, not recorded, more than there are is refused, in memory and streamed
    from mgrow import MgrowError
    with pytest.raises(MgrowError, match="--subset 2000 exceeds the 1437 training images"):
        DataSource("digits", subset=2000).load()
    with pytest.raises(MgrowError, match="--subset 500 exceeds the 120 training images"):
        DataSource(spec, subset=500).load()


def test_convert_records_the_checkpoints_own_normalisation(tmp_path):
    """convert --mean/--std: a foreign checkpoint trained with other constants evaluates
    with those (not with the statistics measured on --data); bad values are one-line errors
    that write nothing."""
    import torch.nn.functional as F

    from mgrow.arch import build
    from mgrow.data import load_data
    from mgrow.manifest import ArchSpec
    arch = ArchSpec(name="wrn-10-1", in_channels=1, input_size=8)
    plain = build(arch, seed=3).eval()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    convert = ("convert", tmp_path / "plain.pt", "--arch", "wrn-10-1", "--data", "digits")
    r = run_main(*convert, "--mean", "0.5", "--std", "0.25", "-o", tmp_path / "own.safetensors")
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "own.safetensors").manifest.data.mean == (0.5,)
    assert load(tmp_path / "own.safetensors").manifest.data.std == (0.25,)
    test = load_data("digits")
    with torch.no_grad():
        ref = F.cross_entropy(plain((test.test_x.float() / 255 - 0.5) / 0.25), test.test_y)
    own = evaluate_bundle(tmp_path / "own.safetensors", DataSource(), device="cpu")
    assert own["loss"] == pytest.approx(float(ref), rel=1e-4)
    r = run_main(*convert, "-o", tmp_path / "measured.safetensors")
    assert r.returncode == 0, r.stderr
    measured = evaluate_bundle(tmp_path / "measured.safetensors", DataSource(), device="cpu")
    assert abs(measured["loss"] - own["loss"]) > 1e-3  # the constants matter
    for bad, message in ((("--mean", "0.5"), "go together"),
                         (("--mean", "0.5,0.5", "--std", "0.2"), "one value per channel"),
                         (("--mean", "0.5", "--std", "0"), "std[0]: Input should be greater"),
                         (("--mean", "1.5", "--std", "0.2"), "mean[0]: Input should be less"),
                         (("--mean", "x", "--std", "0.2"), "comma-separated numbers"),
                         (("--mean", "nan", "--std", "0.2"), "finite numbers")):
        r = run_main(*convert, *bad, "-o", tmp_path / "bad.safetensors")
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad.safetensors").exists()
    r = run_main(*convert[:4], "--mean", "0.5", "--std", "0.2", "-o", tmp_path / "bad.safetensors")
    assert r.returncode != 0 and "name that data set with --data" in r.stderr, r.stderr
