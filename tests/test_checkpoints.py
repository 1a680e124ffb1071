"""Every client's checkpoint (issue 25, class 7): what training frameworks save around the
model converts exactly, and what cannot be loaded safely is refused naming why.

- A Lightning module holding a buffer beside the model (a class-weighted loss's
  `criterion.weight`): the keys under the wrapper prefix that hold the architecture are
  kept, the rest named in one note line.
- torchvision's reference training scripts: {'model', 'optimizer', 'lr_scheduler',
  'epoch', 'args'} with `args` an argparse.Namespace, loaded with weights_only=True.
- A pickle needing any other class is refused in one line naming that class.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch
import torchvision

from mgrow.bundle import load
from mgrow.convert import read_checkpoint

from conftest import randomize_norms, run_main


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(torchvision.models.resnet18(num_classes=10), seed).eval()


def _convert(src, out, *extra):
    return run_main("convert", src, "--arch", "resnet18", "-o", out, *extra)


def _assert_exact(out, tv, x) -> None:
    with torch.no_grad():
        want, got = tv(x), load(out).model().eval()(x)
    assert _rel(want, got) <= 1e-5


def _lightning(state: dict[str, torch.Tensor]) -> dict:
    """What Lightning saves for a module holding `self.model` and a weighted loss."""
    return {"state_dict": {**{f"model.{k}": v for k, v in state.items()},
                           "criterion.weight": torch.linspace(0.5, 1.5, 10)},
            "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.6.0"}


def test_lightning_buffer_beside_the_model_is_left_out_with_a_note(tmp_path, cifar_batch):
    tv = _resnet18(0)
    torch.save(_lightning(tv.state_dict()), tmp_path / "l.ckpt")
    for extra in ((), ("--plain",)):
        out = tmp_path / f"l{len(extra)}.safetensors"
        r = _convert(tmp_path / "l.ckpt", out, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines() == ["note: ignored 1 key outside the model: "
                                         "criterion.weight"]
        assert "criterion.weight" not in load(out).tensors
        _assert_exact(out, tv, cifar_batch)


def test_lightning_keys_that_do_not_match_name_what_was_left_out(tmp_path):
    """A key the model needs is never dropped: a checkpoint missing one is refused, in one
    line that names both the missing key and the keys outside the model."""
    state = _resnet18(1).state_dict()
    del state["fc.bias"]
    torch.save(_lightning(state), tmp_path / "l.ckpt")
    r = _convert(tmp_path / "l.ckpt", tmp_path / "o.safetensors")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "missing fc.bias" in r.stderr and "criterion.weight" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def _trained_with_reference_script(tv: torch.nn.Module, x: torch.Tensor) -> dict:
    """The checkpoint torchvision's references/classification/train.py saves, after one
    real SGD step (momentum buffers in the optimizer state) and one scheduler step."""
    opt = torch.optim.SGD(tv.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=85)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, main], milestones=[5])
    tv.train()
    torch.nn.functional.cross_entropy(tv(x), torch.arange(len(x)) % 10).backward()
    opt.step()
    sched.step()
    tv.eval()
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=90, batch_size=32,
                              lr_warmup_epochs=5, data_path="/data/cifar10", amp=False)
    return {"model": tv.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(), "epoch": 0, "args": args}


def test_torchvision_reference_script_checkpoint_converts_exactly(tmp_path, cifar_batch):
    tv = _resnet18(2)
    torch.save(_trained_with_reference_script(tv, cifar_batch), tmp_path / "checkpoint.pth")
    out = tmp_path / "r.safetensors"
    r = _convert(tmp_path / "checkpoint.pth", out)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    _assert_exact(out, tv, cifar_batch)
    read_checkpoint(tmp_path / "checkpoint.pth")  # in this process: nothing left allowed
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


HELPER = '''
class MyThing:
    """A training framework's object saved beside the weights."""

    def __init__(self):
        self.value = 42
'''


def test_checkpoint_needing_another_class_is_refused_naming_it(tmp_path, monkeypatch):
    (tmp_path / "mgrow_client_pkg.py").write_text(HELPER)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ beside it
    monkeypatch.syspath_prepend(str(tmp_path))
    thing = importlib.import_module("mgrow_client_pkg").MyThing()
    try:
        torch.save({"model": _resnet18(3).state_dict(), "extra": thing}, tmp_path / "c.pth")
    finally:
        sys.modules.pop("mgrow_client_pkg", None)
    out = tmp_path / "o.safetensors"
    r = run_main("convert", tmp_path / "c.pth", "--arch", "resnet18", "-o", out, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"mgrow: error: {tmp_path / 'c.pth'}: refused to load: it needs "
                               "class mgrow_client_pkg.MyThing, which is not a plain tensor "
                               "type;"), r.stderr
    assert "add_safe_globals" not in r.stderr and "weights_only=False" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "mgrow_client_pkg.py"]
