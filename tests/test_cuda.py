"""The engine on a CUDA device: bf16 autocast + channels_last, resume, no host sync per step.

Skipped without a GPU; `benchmarks/gpu_check.py` runs them (`pytest -m cuda`). They use
the built-in digits data (real images, always present) so they need no data on the GPU
machine.
"""

from __future__ import annotations

import signal
import warnings

import pytest
import torch

from mgrow.arch import build
from mgrow.data import batches, load_data
from mgrow.engine import SYNC_EVERY, Interrupted, TrainConfig, train
from mgrow.manifest import ArchSpec, MixingSpec
from mgrow.mixing import plain_state_dict

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ARCH = ArchSpec(name="wrn-10-1", in_channels=1, input_size=8)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_bf16_channels_last_training_and_mixed_equals_plain(digits):
    mixed = build(ARCH, MixingSpec(), seed=1)
    result = train(mixed, digits, TrainConfig(epochs=1, batch_size=128, seed=1, device="cuda",
                                              amp=True, channels_last=True), progress="quiet")
    assert (result.notes, result.device) == ((), torch.cuda.get_device_name())  # amp honoured
    assert result.steps == 11 and torch.isfinite(torch.tensor(result.train_loss))
    assert result.accuracy > 0.3  # ten classes: chance is 0.1
    plain = build(ARCH, None)
    plain.load_state_dict(plain_state_dict(mixed.cpu()))
    dev = torch.device("cuda")
    x, _ = next(batches(digits, False, 256, 0, 0))
    x = x.to(dev).contiguous(memory_format=torch.channels_last)  # (256, 1, 8, 8)
    logits = {}
    for name, net in (("mixed", mixed), ("plain", plain)):
        net = net.to(dev, memory_format=torch.channels_last).eval()
        with torch.no_grad():
            with torch.autocast("cuda", torch.bfloat16):
                logits[name] = net(x).float()
            logits[name + "32"] = net(x).float()
    scale = logits["plain32"].abs().max()
    assert torch.isfinite(logits["mixed"]).all()
    # same generated weights, same bf16 convs: equal up to kernel choice
    assert (logits["mixed"] - logits["plain"]).abs().max() <= 1e-2 * scale
    assert (logits["mixed32"] - logits["plain32"]).abs().max() <= 1e-3 * scale  # TF32 at most
    assert (logits["mixed"] - logits["mixed32"]).abs().max() <= 5e-2 * scale  # bf16 vs fp32


def _float64(model: torch.nn.Module) -> torch.nn.Module:
    """float64 keeps round-off from being amplified over the run (see tests/test_ddp.py)."""
    model.double()
    model.register_forward_pre_hook(lambda m, args: tuple(a.double() for a in args))
    return model


def test_interrupt_and_resume_on_cuda(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=128, seed=3, device="cuda",  # 22 steps
                      channels_last=False)  # float64 convs: the plain layout
    whole = _float64(build(ARCH, MixingSpec(), seed=3))
    train(whole, digits, cfg, progress="quiet")
    model, calls = _float64(build(ARCH, MixingSpec(), seed=3)), []

    def hook(module, args, output):
        calls.append(module.training)
        if sum(calls) == 5:
            signal.raise_signal(signal.SIGINT)

    handle = model.register_forward_hook(hook)
    with pytest.raises(Interrupted, match="stopped by SIGINT at epoch 1, step 5 of 22"):
        train(model, digits, cfg, checkpoint=tmp_path / "ck", progress="quiet")
    handle.remove()
    torch.cuda.manual_seed(3)  # what the run seeded; no op of this net draws from it
    seeded = torch.cuda.get_rng_state()
    saved = torch.load(tmp_path / "ck", weights_only=True)
    assert torch.equal(saved["cuda_rng"], seeded)  # the GPU's RNG (dropout masks) is saved
    torch.cuda.manual_seed(12345)  # ... and restored on resume
    resumed = _float64(build(ARCH, MixingSpec(), seed=99))
    result = train(resumed, digits, cfg, checkpoint=tmp_path / "ck", resume=True,
                   progress="quiet")
    assert torch.equal(torch.cuda.get_rng_state(), seeded)
    assert (result.steps, result.images) == (22, 22 * 128)
    want, got = whole.state_dict(), resumed.state_dict()
    for name, p in whole.named_parameters():
        if p.requires_grad:  # cuDNN may sum in another order: round-off, not bit-equality
            assert float((got[name] - want[name]).norm() / want[name].norm()) < 1e-9, name


def _syncs(digits, steps: int) -> int:
    """Return how many synchronizing CUDA calls a training run of `steps` steps makes."""
    per_epoch = len(digits.train_y) // 16
    cfg = TrainConfig(epochs=steps / per_epoch, batch_size=16, device="cuda", amp=True,
                      eval_every_epoch=False)
    model = build(ARCH, MixingSpec(), seed=0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(model, digits, cfg, progress="quiet")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result.steps == steps
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_sync_per_training_step(digits):
    """Runs of 10 and 40 steps (both below SYNC_EVERY, so one sync point each, plus the final
    evaluation) make the same number of synchronizing calls: none happens per step."""
    assert 40 < SYNC_EVERY
    _syncs(digits, 2)  # lazy initialisation
    short, long = _syncs(digits, 10), _syncs(digits, 40)
    print(f"synchronizing CUDA calls: {short} in a 10-step run, {long} in a 40-step run")
    assert long - short < 10  # one sync a step would add 30
