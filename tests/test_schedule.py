"""The paper's ImageNet learning-rate steps (`TrainConfig(schedule="step")`)."""

from __future__ import annotations

import pytest
import torch

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.data import load_data
from mgrow.engine import TrainConfig, lr_at, train
from mgrow.manifest import ArchSpec, MixingSpec


def test_step_schedule_drops_at_epochs_30_60_80_of_90():
    per_epoch = 10
    lr = [lr_at(s, 90 * per_epoch, 0, 0.1, "step") for s in range(90 * per_epoch)]
    assert lr[0] == lr[299] == 0.1
    assert lr[300] == pytest.approx(0.01) and lr[599] == pytest.approx(0.01)
    assert lr[600] == pytest.approx(0.001) and lr[799] == pytest.approx(0.001)
    assert lr[800] == pytest.approx(1e-4) and lr[-1] == pytest.approx(1e-4)
    assert lr_at(4, 900, 10, 0.1, "step") == pytest.approx(0.05)  # warm-up as for cosine
    assert lr_at(450, 900, 0, 0.1) == pytest.approx(0.05)  # cosine is still the default


def test_engine_follows_the_step_schedule():
    records = []
    cfg = TrainConfig(epochs=2, batch_size=128, warmup_epochs=0, schedule="step")
    model = build(ArchSpec(name="wrn-10-1", in_channels=1, input_size=8), MixingSpec())
    train(model, load_data("digits"), cfg, progress=records.append)  # 11 steps an epoch
    # the lr of each epoch's last step: step 10 is past 22/3, step 21 past 22 * 8/9
    assert [r["lr"] for r in records] == pytest.approx([0.01, 1e-4])
    assert records[1]["train_loss"] < records[0]["train_loss"]


def test_resume_under_another_schedule_is_refused(tmp_path):
    """The schedule is part of the run a checkpoint continues, like the lr and the epochs."""
    cfg = TrainConfig(epochs=1, batch_size=128, warmup_epochs=0, eval_every_epoch=False)
    spec, data, ckpt = ArchSpec(name="wrn-10-1", in_channels=1, input_size=8), \
        load_data("digits"), tmp_path / "run.ckpt"
    straight = build(spec, MixingSpec())
    train(straight, data, cfg, checkpoint=ckpt, progress="quiet")
    assert ckpt.exists()  # written at the end of the epoch
    again = cfg.model_copy(update={"schedule": "step"})
    with pytest.raises(MgrowError, match=r"differs .*schedule step \(checkpoint: cosine\)"):
        train(build(spec, MixingSpec()), data, again, checkpoint=ckpt, resume=True,
              progress="quiet")
    model = build(spec, MixingSpec())  # under its own schedule it resumes, at the end
    assert train(model, data, cfg, checkpoint=ckpt, resume=True, progress="quiet").steps == 11
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in model.state_dict().items())


def test_cli_trains_under_the_step_schedule(tmp_path):
    """`--schedule step` reaches the engine (each epoch's last lr) and the lineage."""
    import json

    from mgrow.bundle import load

    from conftest import run_main
    out = tmp_path / "s.safetensors"
    cli = run_main("train", "--arch", "wrn-10-1", "--data", "digits", "--epochs", "2",
                   "--warmup", "0", "--schedule", "step", "--device", "cpu", "-o", out, "--json")
    assert cli.returncode == 0, cli.stderr
    lrs = [json.loads(line)["lr"] for line in out.with_name(out.name + ".metrics.jsonl")
           .read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 1e-4])  # cosine would end epoch 1 near 0.05
    assert load(out).manifest.lineage.options["schedule"] == "step"
    bad = run_main("train", "--arch", "wrn-10-1", "--schedule", "linear", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "--schedule" in bad.stderr
