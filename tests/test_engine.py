"""mgrow.engine: the training loop on real data, checkpoints, resume, interrupts, NaNs."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgrow import MgrowError
from mgrow.arch import build
from mgrow.data import load_data
from mgrow.engine import (Interrupted, TrainConfig, evaluate, lr_at, param_groups, train,
                          warmup_steps)
from mgrow.manifest import ArchSpec, MixingSpec

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared/data/cifar10"
DIGITS_ARCH = ArchSpec(name="wrn-10-1", in_channels=1, input_size=8)
# digits, batch 128: 11 steps per epoch; warm-up clipped to 10% of the run
CFG = TrainConfig(epochs=2, batch_size=128, lr=0.1, seed=3)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _mixed():
    return build(DIGITS_ARCH, MixingSpec(), seed=1)


def _load(path: Path) -> dict:
    return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """An uninterrupted 2-epoch run of a template-mixed wrn-10-1 on digits."""
    folder = tmp_path_factory.mktemp("reference")
    model, records = _mixed(), []
    result = train(model, digits, CFG, checkpoint=folder / "ck.pt", progress=records.append,
                   metrics_path=folder / "metrics.jsonl")
    return model, result, records, folder


def _assert_same_run(model, ck_path: Path, reference) -> None:
    ref_model, _, _, folder = reference
    got, want = model.state_dict(), ref_model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    a, b = _load(ck_path), _load(folder / "ck.pt")
    assert (a["step"], a["images"]) == (b["step"], b["images"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])


def test_reference_run_learns_and_records(digits, reference):
    model, result, records, folder = reference
    assert result.accuracy > 0.5  # ten classes: chance is 0.1
    assert (result.steps, result.images, result.device) == (22, 22 * 128, "cpu")
    assert records[1]["train_loss"] < records[0]["train_loss"] < math.log(10)
    lines = [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in lines] == [11, 22]
    assert lines[-1]["test_acc"] == result.accuracy
    acc, loss = evaluate(model, digits)
    assert (acc, loss) == pytest.approx((result.accuracy, result.loss))
    ck = _load(folder / "ck.pt")
    assert (ck["step"], ck["epoch"], ck["images"]) == (22, 2, 22 * 128)


def test_loss_falls_on_cifar_subset():
    if not (CIFAR / "test.npz").exists():
        pytest.skip(f"no CIFAR-10 copy at {CIFAR}")
    data = load_data(f"npz:{CIFAR}", subset=512)
    data = dataclasses.replace(data, test_x=data.test_x[::10], test_y=data.test_y[::10])
    model = build(ArchSpec(name="wrn-10-1"), MixingSpec())
    records = []
    result = train(model, data, TrainConfig(epochs=3, batch_size=64, lr=0.1, warmup_epochs=0),
                   progress=records.append)
    assert result.steps == 24
    assert records[0]["train_loss"] < 2.4 and records[-1]["train_loss"] < 2.15
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.15
    assert result.accuracy > 0.15  # 1,000 test images: chance is 0.10 +- 0.01


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_first_step_loss_is_cross_entropy_with_the_label_smoothing(digits, smoothing):
    """The training loss is cross-entropy with --label-smoothing: one step's recorded loss
    is F.cross_entropy of the untrained net on the first batch, smoothed as configured."""
    from mgrow.data import batches
    cfg = CFG.model_copy(update={"epochs": 1 / 11, "label_smoothing": smoothing,
                                 "eval_every_epoch": False})
    net, records = _mixed(), []
    x, y = next(iter(batches(digits, True, cfg.batch_size, 0, cfg.seed)))
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(_mixed().train()(x), y,
                                                       label_smoothing=smoothing))
        plain = float(torch.nn.functional.cross_entropy(_mixed().train()(x), y))
    result = train(net, digits, cfg, progress=records.append)
    assert result.steps == 1
    assert records[0]["train_loss"] == pytest.approx(want, rel=1e-5)
    if smoothing:
        assert abs(want - plain) > 1e-3  # the smoothing shows in the number checked


def test_param_groups_decay_banks_and_weights_only():
    mixed = build(DIGITS_ARCH, MixingSpec(freeze_edges=False))
    groups = {g["weight_decay"]: g for g in param_groups(mixed, 5e-4)}
    decay, plain = set(groups[5e-4]["param_names"]), set(groups[0.0]["param_names"])
    names = {n for n, p in mixed.named_parameters() if p.requires_grad}
    assert decay | plain == names and not decay & plain
    assert {n for n in names if n.startswith("banks.")} <= decay and decay
    assert {n for n in names if n.endswith(".alpha")} <= plain
    assert "fc.alpha" in plain and "conv1.alpha" in plain  # 3-D, yet no decay
    assert {n for n in names if ".bn" in n or n.startswith("bn.")} <= plain
    assert "fc.bias" in plain
    for g in groups.values():
        assert [id(p) for p in g["params"]] == [id(dict(mixed.named_parameters())[n])
                                                for n in g["param_names"]]
    plain_net = build(DIGITS_ARCH, None)
    groups = {g["weight_decay"]: set(g["param_names"]) for g in param_groups(plain_net, 0.1)}
    assert groups[0.1] == {n for n, p in plain_net.named_parameters() if p.ndim >= 2}
    assert "fc.weight" in groups[0.1] and "blocks.0.conv1.weight" in groups[0.1]


def test_lr_schedule():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.01)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.05)
    assert lr_at(99, 100, 10, 0.1) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    after = [lr_at(s, 100, 10, 0.1) for s in range(10, 100)]
    assert all(a > b > 0 for a, b in zip(after, after[1:]))
    assert lr_at(0, 5, 0, 1.0) == 1.0  # no warm-up: the peak first
    cfg = TrainConfig(epochs=2, warmup_epochs=1)
    assert warmup_steps(cfg, 10, 20) == 2  # clipped to 10% of the run
    assert warmup_steps(cfg, 10, 200) == 10
    assert warmup_steps(TrainConfig(epochs=1, warmup_epochs=0), 10, 10) == 0


def test_every_use_of_cuda_under_torchrun_is_the_local_gpu(monkeypatch):
    """resolve_device is the one rule (training, BN recalibration and the memory check all
    call it): under torchrun a bare cuda is cuda:LOCAL_RANK; alone, or cuda:N, as given.
    (No GPU here: torch.cuda.is_available is patched; torch.device needs no GPU.)"""
    from mgrow.engine import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("auto", "cuda"):
        assert resolve_device(name) == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_config_is_validated_and_frozen():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(epochs=1, batch_size=0)
    with pytest.raises(ValueError):
        CFG.lr = 1.0


def _hook_on_training_step(model, n: int, action):
    """Run `action(output)` at the n-th training forward (1-based); return its result."""
    calls = []

    def hook(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) == n:
                return action(output)
        return None

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_interrupt_then_resume_is_bit_for_bit(digits, reference, tmp_path, where):
    ck, model = tmp_path / "ck.pt", _mixed()
    if where == "mid-epoch":  # SIGINT during step 5: that step finishes, then it stops
        handle = _hook_on_training_step(model, 5, lambda out: signal.raise_signal(signal.SIGINT))
        progress, stopped = "quiet", "epoch 1, step 5 of 22"
    else:  # SIGINT while epoch 1 ends: it stops before step 12
        handle = None
        progress, stopped = (lambda r: r["step"] == 11 and signal.raise_signal(signal.SIGINT),
                             "epoch 1, step 11 of 22")
    before = signal.getsignal(signal.SIGINT)
    metrics = tmp_path / "metrics.jsonl"
    with pytest.raises(Interrupted, match="--resume") as e:
        train(model, digits, CFG, checkpoint=ck, progress=progress, metrics_path=metrics)
    assert f"stopped by SIGINT at {stopped}" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    if handle is not None:
        handle.remove()
    assert _load(ck)["step"] == int(stopped.split("step ")[1].split()[0])
    fresh = build(DIGITS_ARCH, MixingSpec(), seed=99)  # every tensor comes from the checkpoint
    torch.manual_seed(12345)  # and so does the RNG state
    result = train(fresh, digits, CFG, checkpoint=ck, resume=True, progress="quiet",
                   metrics_path=metrics)
    _assert_same_run(fresh, ck, reference)
    assert (result.steps, result.images) == (22, 22 * 128)
    assert result.accuracy == reference[1].accuracy
    # every epoch's train_loss is its mean over all its steps, those before the stop included
    got = [json.loads(line)["train_loss"] for line in metrics.read_text().splitlines()]
    want = [json.loads(line)["train_loss"]
            for line in (reference[3] / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(want, rel=1e-6, abs=0)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(digits, tmp_path):
    ck, model = tmp_path / "ck.pt", _mixed()
    snapshot = {}
    _hook_on_training_step(model, 13, lambda out: snapshot.update(bytes=ck.read_bytes()))
    _hook_on_training_step(model, 14, lambda out: out * float("nan"))
    with pytest.raises(MgrowError, match=r"not finite at epoch 2, step 14 of 22") as e:
        train(model, digits, CFG, checkpoint=ck, progress="quiet")
    assert "unchanged" in str(e.value)
    assert ck.read_bytes() == snapshot["bytes"]  # epoch 1's checkpoint, untouched
    assert _load(ck)["step"] == 11
    resumed = train(_mixed(), digits, CFG, checkpoint=ck, resume=True, progress="quiet")
    assert resumed.steps == 22 and math.isfinite(resumed.loss)


def test_resume_refuses_missing_or_foreign_checkpoints(digits, reference, tmp_path):
    with pytest.raises(MgrowError, match="no checkpoint to resume from"):
        train(_mixed(), digits, CFG, checkpoint=tmp_path / "none.pt", resume=True)
    with pytest.raises(MgrowError, match="needs a checkpoint"):
        train(_mixed(), digits, CFG, resume=True)
    ck = reference[3] / "ck.pt"
    with pytest.raises(MgrowError, match="disagree with the declared architecture"):
        train(build(DIGITS_ARCH, None), digits, CFG, checkpoint=ck, resume=True)
    with pytest.raises(MgrowError, match="batch size 128 .* this run has 64"):
        train(_mixed(), digits, CFG.model_copy(update={"batch_size": 64}), checkpoint=ck,
              resume=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MgrowError, match="not a readable training checkpoint"):
        train(_mixed(), digits, CFG, checkpoint=junk, resume=True)


def test_resume_of_a_finished_run_only_evaluates(digits, reference, tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes((reference[3] / "ck.pt").read_bytes())
    model = _mixed()
    result = train(model, digits, CFG, checkpoint=ck, resume=True, progress="quiet")
    assert (result.steps, result.accuracy) == (22, reference[1].accuracy)
    assert result.train_loss == reference[1].train_loss


def test_bad_sizes_and_modes(digits):
    with pytest.raises(MgrowError, match="exceeds the 1437 training images"):
        train(_mixed(), digits, TrainConfig(epochs=1, batch_size=2000))
    with pytest.raises(MgrowError, match="less than one step"):
        train(_mixed(), digits, TrainConfig(epochs=0.01, batch_size=128))
    with pytest.raises(MgrowError, match="progress mode"):
        train(_mixed(), digits, TrainConfig(epochs=0.1, batch_size=128), progress="loud")
    with pytest.raises(MgrowError, match="no CUDA device") if not torch.cuda.is_available() \
            else pytest.raises(MgrowError, match="unknown device"):
        train(_mixed(), digits, TrainConfig(epochs=0.1, device="cuda" if not
                                            torch.cuda.is_available() else "tpu"))


def test_fractional_epochs_json_progress_and_amp_note_on_cpu(digits, capsys):
    result = train(_mixed(), digits, TrainConfig(epochs=0.5, batch_size=128, amp=True,
                                                 eval_every_epoch=False), progress="json")
    assert result.steps == round(0.5 * 11) and result.images == result.steps * 128
    assert any("--amp" in n for n in result.notes) and 0 <= result.accuracy <= 1
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["step"] == 6 and json.loads(line)["test_acc"] == result.accuracy


def test_bar_progress_goes_to_stderr(digits, capsys):
    """Not a terminal (here: captured): one plain line per epoch on stderr, no bar."""
    train(_mixed(), digits, TrainConfig(epochs=0.2, batch_size=128), progress="bar")
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("epoch 0.1818/0.1818  loss ") and err.count("\n") == 1


BAR_CHILD = """
from mgrow.arch import build
from mgrow.data import load_data
from mgrow.engine import TrainConfig, train
from mgrow.manifest import ArchSpec, MixingSpec
model = build(ArchSpec(name="wrn-10-1", in_channels=1, input_size=8), MixingSpec())
train(model, load_data("digits"), TrainConfig(epochs=0.2, batch_size=128), progress="bar")
"""


def test_bar_progress_on_a_terminal():
    """stderr a terminal (a real pseudo-terminal): the live rich bar, steps counted."""
    import os
    import pty
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", BAR_CHILD], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:  # read while it runs, so the child never blocks on a full terminal
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child has exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert child.wait(timeout=120) == 0
    assert b"2/2" in seen and b"\x1b[" in seen and b"loss " in seen


CHILD = """
import sys
from pathlib import Path
from mgrow.arch import build
from mgrow.data import load_data
from mgrow.engine import Interrupted, TrainConfig, train
from mgrow.manifest import ArchSpec, MixingSpec

def wait_at_epoch_1(record):  # let the parent signal us while epoch 1 ends
    if record["step"] == 22:
        print("ready", flush=True)
        sys.stdin.readline()

model = build(ArchSpec(name="wrn-10-1", in_channels=1, input_size=8), MixingSpec(), seed=1)
try:
    train(model, load_data("digits"), TrainConfig(**eval(sys.argv[2])),
          checkpoint=Path(sys.argv[1]), progress=wait_at_epoch_1)
except Interrupted as e:
    print(e)
    sys.exit(3)
"""


def test_sigint_in_a_subprocess_saves_and_resumes(digits, tmp_path):
    cfg = dict(epochs=3, batch_size=64, lr=0.05, seed=5)  # 22 steps per epoch
    ck = tmp_path / "ck.pt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ck), repr(cfg)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n", child.communicate(timeout=60)[1]
    child.send_signal(signal.SIGINT)  # pending before the child reads on
    out, err = child.communicate("go\n", timeout=120)
    assert child.returncode == 3, err
    assert "stopped by SIGINT at epoch 1, step 22 of 66" in out and "--resume" in out
    assert _load(ck)["step"] == 22
    resumed = build(DIGITS_ARCH, MixingSpec(), seed=1)
    result = train(resumed, digits, TrainConfig(**cfg), checkpoint=ck, resume=True,
                   progress="quiet")
    assert (result.steps, result.images) == (66, 66 * 64)
    whole = build(DIGITS_ARCH, MixingSpec(), seed=1)
    train(whole, digits, TrainConfig(**cfg), progress="quiet")
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
