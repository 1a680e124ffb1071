"""BN statistics at growth: the data-free correction of `fuse --bn-correct` and
`finetune --bn-recalibrate N`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgrow.bundle import Bundle, load
from mgrow.arch import build
from mgrow.data import batches, load_data
from mgrow.engine import TrainConfig
from mgrow.growth import fuse
from mgrow.manifest import ArchSpec
from mgrow.growth import norms
from mgrow.growth.norms import norm_layers, proxy_moments, recalibrate
from mgrow.data import DataSource
from mgrow.phases import finetune

from conftest import make_bundle

ARCH = ArchSpec(name="wrn-16-2", width=0.25, norm="block")
STATS = (".running_mean", ".running_var")


def _calibrated(path: Path, seed: int, x: torch.Tensor) -> Bundle:
    """A fresh member whose BN statistics are those of real images `x` (as after training)."""
    b = make_bundle(path, ARCH, seed=seed)
    model = b.model()
    for layer in norm_layers(model).values():
        layer.reset_running_stats()
        layer.momentum = None
    with torch.no_grad():
        model.train()(x)
    return Bundle(b.manifest, {k: v.detach().clone() for k, v in model.state_dict().items()},
                  b.path, b.sha256)


@pytest.fixture(scope="module")
def members(tmp_path_factory, cifar_batch):
    d = tmp_path_factory.mktemp("bn")
    return [_calibrated(d / f"{s}.safetensors", s, cifar_batch) for s in (1, 2)]


def _model(grown) -> torch.nn.Module:
    return Bundle(grown.manifest, grown.tensors, Path("grown"), "").model().eval()


GROWTHS = [dict(init="orthogonal"), dict(init="random"), dict(init="copy"),
           dict(init="zero"), dict(method="random"), dict(method="net2net"),
           dict(init="orthogonal", members=1)]


@pytest.mark.parametrize("how", GROWTHS, ids=lambda h: "-".join(map(str, h.values())))
def test_correction_changes_only_running_statistics(members, how, monkeypatch):
    monkeypatch.setattr(norms, "PROXY_STEPS", 3)  # what is changed, not how well: see below
    how = dict(how)
    ms = members[:how.pop("members", 2 if how.get("method") != "net2net" else 1)]
    raw, cor = fuse(ms, **how), fuse(ms, bn_correct=True, **how)
    assert raw.tensors.keys() == cor.tensors.keys()
    changed = {k for k in raw.tensors if not torch.equal(raw.tensors[k], cor.tensors[k])}
    assert all(k.endswith(STATS) for k in changed), changed  # no tile, no BN affine
    assert cor.manifest.growth.bn_correct and not raw.manifest.growth.bn_correct
    if how.get("init") == "zero":  # new tiles add nothing: nothing to correct
        for k in raw.tensors:
            assert torch.allclose(raw.tensors[k], cor.tensors[k], rtol=1e-5, atol=1e-7), k
    else:
        assert changed


def test_corrected_layers_standardise_the_proxy_like_the_members(members):
    """On the proxy it was fitted on, every corrected BN maps its input to the same
    standardised moments as the member's BN: the predicted input variance matches the
    statistics, channel by channel, in every layer (upstream corrections included)."""
    raw = fuse(members).tensors
    grown = _model(fuse(members))
    models = [m.model().eval() for m in members]
    x = norms.proxy_inputs((64, 3, 32, 32), torch.Generator().manual_seed(7))
    norms.fit_norms(grown, models, x)
    seen = proxy_moments(grown, x)
    refs = [proxy_moments(m, x) for m in models]
    for name, layer in norm_layers(grown).items():
        mean, var = seen[name]
        c = refs[0][name][0].numel()
        for j in range(layer.num_features // c):
            sl = slice(j * c, (j + 1) * c)
            member = norm_layers(models[j % 2])[name]
            m_c, v_c = refs[j % 2][name]
            rv, rm = layer.running_var[sl].double(), layer.running_mean[sl].double()
            mrv, mrm = member.running_var.double(), member.running_mean.double()
            assert torch.allclose(var[sl] / rv, v_c / mrv, rtol=1e-4), name
            assert torch.allclose((mean[sl] - rm) / rv.sqrt(), (m_c - mrm) / mrv.sqrt(),
                                  rtol=1e-4, atol=1e-4), name
        carried = raw[f"{name}.running_var"]  # the stem's (blocks.0.bn1's input) is all carried
        assert name == "blocks.0.bn1" or not torch.allclose(layer.running_var, carried), name


def _log_misfit(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Return the mean |log(actual input variance / running variance)| over BN channels."""
    seen = proxy_moments(model, x)
    errs = [(seen[n][1] / layer.running_var.double()).log().abs()
            for n, layer in norm_layers(model).items()]
    return float(torch.cat(errs).mean())


def test_correction_fits_real_images(members, cifar_batch):
    """On real CIFAR-10 images (the members' statistics come from them; no image reaches the
    correction) the corrected statistics describe the grown net's BN inputs far better than
    the carried ones, and the distilled proxy far better than white noise."""
    grown = fuse(members)
    shape = (3, 32, 32)
    misfit = {}
    for what, steps in (("raw", None), ("white", 0), ("distilled", norms.PROXY_STEPS)):
        model = _model(grown)
        if steps is not None:
            gen = torch.Generator().manual_seed(0)
            norms.correct_norms(model, [m.model() for m in members], shape, gen, steps)
        misfit[what] = _log_misfit(model, cifar_batch)
    assert misfit["distilled"] < 0.15 * misfit["raw"], misfit
    assert misfit["distilled"] < 0.5 * misfit["white"], misfit


def test_recalibration_changes_only_bn_buffers_to_the_batch_statistics(members):
    data = load_data("digits")
    model = build(ArchSpec(name="wrn-10-1", in_channels=1, input_size=8, norm="block"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = recalibrate(model, data, 1, 64, seed=3)
    assert seen == 64
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((*STATS, ".num_batches_tracked")) for k in changed)
    x, _ = next(batches(data, True, 64, 0, 3))
    with torch.no_grad():
        u = model.conv1(x)  # the first BN's input: the stem's output
    bn = model.blocks[0].bn1
    assert torch.allclose(bn.running_mean, u.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, u.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert bn.momentum == 0.1  # restored


def test_finetune_recalibrates_first_and_charges_the_ledger(digits_200, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=50, device="cpu", eval_every_epoch=False)
    out = tmp_path / "ft.safetensors"
    finetune(digits_200, DataSource(), cfg, out, bn_recalibrate=3, progress="quiet")
    rows = load(out).manifest.phases
    assert [r.operation for r in rows] == ["train", "bn-recalibrate", "finetune"]
    assert rows[1].images == 150 and rows[1].train_flops == rows[1].forward_flops * 150
