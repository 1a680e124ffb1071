"""What is recorded is what happened (issue 25, classes 1 and 2): the size images are read
at is the size FLOPs are counted at, a recalibration records and charges what it did, the
reference a budget was set against is kept, errors name what the user gave, and sizes
that come from input are bounded before they are allocated."""

from __future__ import annotations

import os

import pytest
import torch

import mgrow
from mgrow.arch import build
from mgrow.bundle import load, save
from mgrow.data import DataSource
from mgrow.engine import TrainConfig
from mgrow.errors import MgrowError
from mgrow.flops import forward_flops, reference_flops
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.phases import finetune, fuse_files, train_new

from conftest import make_bundle, run_main

CFG = TrainConfig(epochs=1, batch_size=50, device="cpu", eval_every_epoch=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A wrn-10-1 x0.5 trained one epoch on 200 digits training images."""
    path = tmp_path_factory.mktemp("truth") / "small.safetensors"
    train_new("wrn-10-1", DataSource("digits", subset=200), CFG, path, progress="quiet",
              width=0.5)
    return path


@pytest.fixture(scope="module")
def wrn_checkpoint(tmp_path_factory):
    """A plain wrn-10-1 state_dict (3 channels, 10 classes) saved by torch.save."""
    path = tmp_path_factory.mktemp("ckpt") / "wrn.pt"
    torch.save(build(ArchSpec(name="wrn-10-1")).state_dict(), path)
    return path


def test_convert_reads_a_folder_at_the_size_it_counts(wrn_checkpoint, image_folder, tmp_path):
    """convert --data imagefolder: read the folder at the size the net is counted at (wrn's
    32 by default, or --input-size): the ledger can never count 32 px for 224 px images."""
    for size, args in ((32, ()), (48, ("--input-size", "48"))):
        out = tmp_path / f"c{size}.safetensors"
        r = run_main("convert", wrn_checkpoint, "--arch", "wrn-10-1", "--data",
                     f"imagefolder:{image_folder}", *args, "-o", out)
        assert r.returncode == 0, r.stderr
        man = load(out).manifest
        assert man.arch.input_size == man.data.input_size == size


def test_convert_refuses_a_size_fixed_data_cannot_have(tmp_path):
    ckpt, out = tmp_path / "gray.pt", tmp_path / "x.safetensors"
    torch.save(build(ArchSpec(name="wrn-10-1", in_channels=1)).state_dict(), ckpt)
    r = run_main("convert", ckpt, "--arch", "wrn-10-1", "--data", "digits", "--input-size",
                 "32", "-o", out)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.count("\n") == 1 and "--input-size 32 differs from the 8 x 8 images" in r.stderr


def test_gradmax_counts_and_records_the_data_it_read(tmp_path, image_folder):
    """A bundle that records no data grown by GradMax on a folder: the folder is read at the
    net's size, the growth row counts that size, and the lineage names data and subset."""
    arch = ArchSpec(name="wrn-10-1", width=0.5, input_size=32)
    a = make_bundle(tmp_path / "a.safetensors", arch, seed=1)
    assert a.manifest.data is None
    out = tmp_path / "g.safetensors"
    fuse_files(a.path, None, out, method="gradmax", batch_size=8, steps=1,
               source=DataSource(f"imagefolder:{image_folder}", subset=40))
    man = load(out).manifest
    row = man.phases[-1]
    assert man.data.input_size == man.arch.input_size == 32
    assert row.forward_flops == forward_flops(arch.widened(2)) and row.images == 8
    assert man.lineage.options["data"] == f"imagefolder:{image_folder}"
    assert man.lineage.options["train_size"] == 40 == man.data.train_size


def test_recalibration_records_what_it_did_and_is_charged(small, tmp_path):
    """--bn-recalibrate N beyond an epoch records the batches it used; a fraction is
    refused; on an ungrown net its cost counts in --budget as the docs say."""
    out = tmp_path / "r.safetensors"
    finetune(small, DataSource(), CFG, out, bn_recalibrate=1_000_000, progress="quiet")
    man = load(out).manifest
    assert man.lineage.options["bn_recalibrate"] == 4  # 200 images, batches of 50
    assert man.phases[-2].operation == "bn-recalibrate" and man.phases[-2].images == 200
    with pytest.raises(MgrowError, match="--bn-recalibrate takes a whole number"):
        finetune(small, DataSource(), CFG, tmp_path / "f.safetensors", bn_recalibrate=2.5)
    totals = {}
    for n in (0, 2):
        path = tmp_path / f"b{n}.safetensors"
        finetune(small, DataSource(), CFG, path, budget=2.0, reference_epochs=1,
                 bn_recalibrate=n, progress="quiet")
        rows = load(path).manifest.phases[1:]  # after the small net's own training
        totals[n] = sum(p.train_flops for p in rows)
    ref = reference_flops(load(small).manifest, 1)
    step = 3 * forward_flops(load(small).manifest.arch) * 50
    for n in (0, 2):
        assert abs(totals[n] - 2.0 * ref) <= step / 2 + 1, (n, totals, ref)


def test_the_reference_a_budget_was_set_against_is_kept(small, tmp_path):
    """finetune --budget X --reference-epochs E records E: info and flops report X, not a
    fraction of 200 epochs, unless told otherwise."""
    grown = tmp_path / "g.safetensors"
    fuse_files(small, None, grown)
    out = tmp_path / "f.safetensors"
    finetune(grown, DataSource(), CFG, out, budget=0.45, reference_epochs=4, progress="quiet")
    assert load(out).manifest.reference_epochs == 4
    for report in (mgrow.info(out)["ledger"], mgrow.count_flops(out)["ledger"]):
        assert report["reference_epochs"] == 4
        assert report["growth_norm"] == pytest.approx(0.45, abs=50 / 200 / 4)
    assert mgrow.info(out, reference_epochs=8)["ledger"]["growth_norm"] == pytest.approx(
        0.225, abs=50 / 200 / 8)
    r = run_main("flops", out, "--json")
    assert r.returncode == 0 and '"reference_epochs": 4' in r.stdout.replace(" 4.0", " 4")


def test_errors_name_what_the_user_gave(small, tmp_path):
    """A budget below one step names --budget (the user never gave --epochs); a manifest
    recording 0 training images names the manifest, not --subset."""
    grown = tmp_path / "g.safetensors"
    fuse_files(small, None, grown)
    r = run_main("finetune", grown, "--budget", "0.0001", "--reference-epochs", "1", "-o",
                 tmp_path / "f.safetensors")
    assert r.returncode == 2 and "--budget 0.0001X leaves" in r.stderr
    assert "--epochs" not in r.stderr
    b = load(small)
    zero = tmp_path / "zero.safetensors"
    save(zero, b.manifest.model_copy(update={"data": b.manifest.data.model_copy(
        update={"train_size": 0})}), b.tensors)
    r = run_main("finetune", zero, "--epochs", "1", "-o", tmp_path / "z.safetensors")
    assert r.returncode == 2 and "records a training set of 0 images" in r.stderr
    assert "--subset" not in r.stderr


def test_a_huge_bundle_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    """A bundle whose header declares tensors the architecture does not have is refused
    from the header alone: the tensor data is never read."""
    import mgrow.bundle
    arch = ArchSpec(name="wrn-10-1", width=0.25)
    b = make_bundle(tmp_path / "a.safetensors", arch, MixingSpec())
    bad = dict(b.tensors)
    bad["banks.0"] = torch.zeros(64, *b.tensors["banks.0"].shape[1:])  # declared too large
    from safetensors.torch import save_file
    save_file(bad, tmp_path / "huge.safetensors",
              metadata={mgrow.bundle.META_KEY: b.manifest.to_json()})
    reads = []
    real = mgrow.bundle.read_buffer
    monkeypatch.setattr(mgrow.bundle, "read_buffer", lambda p: reads.append(p) or real(p))
    with pytest.raises(MgrowError, match="banks.0 is \\(64,"):
        load(tmp_path / "huge.safetensors")
    assert reads == []
    assert load(b.path).manifest == b.manifest and len(reads) == 1
    # bytes after the tensors (a file grown to 12 GB with zeros was read whole, then
    # refused) or short of them: refused from the header and the file's size alone
    for name, size in (("long", b.path.stat().st_size + (1 << 30)),
                       ("short", b.path.stat().st_size - 1)):
        odd = tmp_path / f"{name}.safetensors"
        odd.write_bytes(b.path.read_bytes()[:size])
        os.truncate(odd, size)  # sparse: no gigabyte is written
        with pytest.raises(MgrowError, match="corrupt or truncated safetensors file .the "
                           "tensors hold"):
            load(odd)
    assert len(reads) == 1
    # a checkpoint that would not fit the memory left is refused before it is read
    monkeypatch.setenv("MGROW_MEMORY_LIMIT", "1M")
    big = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1 << 19)}, big)  # 2 MB
    r = run_main("convert", big, "--arch", "wrn-10-1", "-o", tmp_path / "c.safetensors")
    assert r.returncode == 2 and "needs about 2.1 MB of memory" in r.stderr, r.stderr


def test_gradmax_checks_the_fit_train_checks(tmp_path):
    """GradMax on a net the data is too small for (VGG-11 on 8 px digits) is refused in one
    line before any work, as train refuses it, not 'failed unexpectedly'."""
    arch = ArchSpec(name="vgg11_bn", width=0.0625, in_channels=1, input_size=32)
    a = make_bundle(tmp_path / "v.safetensors", arch, seed=0)
    out = tmp_path / "g.safetensors"
    r = run_main("fuse", a.path, "--method", "gradmax", "--data", "digits", "-o", out)
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and "failed unexpectedly" not in r.stderr
    assert "cannot take 1 x 8 x 8 inputs" in r.stderr


def test_memory_mode_is_sized_before_decoding(image_folder, monkeypatch):
    """--data-mode memory holds every image decoded at once: at a large --input-size it is
    refused through the one memory check before anything is decoded."""
    import mgrow.data.folders
    decoded = []
    real = mgrow.data.folders.decode
    monkeypatch.setattr(mgrow.data.memory, "decode", lambda p: decoded.append(p) or real(p))
    monkeypatch.setenv("MGROW_MEMORY_LIMIT", "100000000")  # 100 MB
    from mgrow.data import load_data
    with pytest.raises(MgrowError, match="--data-mode memory: 160 images .* at 512 x 512 needs"):
        load_data(f"imagefolder:{image_folder}", mode="memory", input_size=512)
    assert decoded == []
    assert len(load_data(f"imagefolder:{image_folder}", mode="memory", input_size=16).train_y)


def test_gradmax_at_batch_one_is_refused_as_train_refuses_it(tmp_path, tiny_cifar):
    a = make_bundle(tmp_path / "r.safetensors", ArchSpec(name="resnet18", width=0.0625,
                                                         input_size=32), seed=0)
    with pytest.raises(MgrowError, match="a batch of 1 cannot be normalised by BatchNorm"):
        fuse_files(a.path, None, tmp_path / "g.safetensors", method="gradmax", batch_size=1,
                   steps=1, source=DataSource(f"npz:{tiny_cifar}"))
    assert not (tmp_path / "g.safetensors").exists()
