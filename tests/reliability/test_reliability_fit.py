"""Sizes and fits checked before anything is allocated or trained.

- Memory and work: a network is sized on the meta device before it is built (mgrow.limits)
  and refused, saying how much it would need, when it cannot fit this machine; depth and
  widening factor are bounded before the network is even sized.
- Architecture against data: inputs too small for the network's downsampling and batches
  BatchNorm cannot normalise are refused before the first step; a run whose final
  evaluation is not finite exits non-zero without writing its bundle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rel_support import (TRAIN, assert_one_line_error, assert_refused, digits_arch, mgrow,
                         watch, with_tensors, write_bundle)

MEMORY = (r"needs about [0-9.]+ [kMGTP]?B of memory; (this machine has|MGROW_MEMORY_LIMIT "
          r"allows) [0-9.]+ [kMGTP]?B available")
CAP = {"MGROW_MEMORY_LIMIT": "4G"}  # the same refusals on any machine of up to 4 GB and more
OUT = ("-o", "out.safetensors")
DIGITS = TRAIN[2:]  # the digits data options without --arch


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fit")
    write_bundle(folder / "good.safetensors")
    # the digits net declared for 2048 x 2048 inputs (valid, and its tensors are the same)
    write_bundle(folder / "big-input.safetensors", arch=digits_arch(input_size=2048))
    # a slim VGG for 32 x 32 grey images: five 2 x 2 poolings, so 8 x 8 digits are too small
    write_bundle(folder / "vgg32.safetensors", arch=digits_arch(name="vgg11_bn",
                                                                width=0.0625, input_size=32))
    from mgrow.arch import build
    torch.save(build(digits_arch(), None).state_dict(), folder / "plain.pt")
    return folder


# name -> (arguments (files relative to the inputs folder), what the one line must match)
TOO_BIG = {
    "width-1000": (("train", "--arch", "wrn-10-1", *DIGITS, "--width", "1000", *OUT),
                   "wrn-10-1 x1000 mixed " + MEMORY),
    "wide-k-times-width": (("train", "--arch", "wrn-16-64", *DIGITS, "--width", "16", *OUT),
                           "wrn-16-64 x16 mixed " + MEMORY),
    "depth-1006": (("train", "--arch", "wrn-1006-1", *DIGITS, *OUT),
                   "depth 1006 exceeds the 1000 layers mgrow builds"),
    "k-100000": (("train", "--arch", "wrn-16-100000", *DIGITS, *OUT),
                 r"widening factor K must lie in 1\.\.1024"),
    "convert-input-4096": (("convert", "plain.pt", "--arch", "wrn-16-8", "--input-size",
                            "4096", *OUT), "wrn-16-8 x1 (plain|mixed) " + MEMORY),
    "fuse-16-at-2048": (("fuse", "big-input.safetensors", "--factor", "16", *OUT),
                        "wrn-10-1 x16 mixed " + MEMORY),
}

MISFITS = {
    "vgg-on-8x8": (("train", "--arch", "vgg11_bn", *DIGITS, *OUT),
                   r"vgg11_bn x1 mixed: the network cannot take 1 x 8 x 8 inputs \(.*too "
                   "small"),
    "resnet18-batch-1": (("train", "--arch", "resnet18", *DIGITS[:-3], "--batch-size", "1",
                          *OUT), "resnet18 on digits: a batch of 1 cannot be normalised by "
                                 "BatchNorm"),
    "resnet50-batch-1": (("train", "--arch", "resnet50", "--width", "0.125", *DIGITS[:-3],
                          "--batch-size", "1", *OUT), "a batch of 1 cannot be normalised"),
    "finetune-vgg32-on-digits": (("finetune", "vgg32.safetensors", "--data", "digits",
                                  "--epochs", "1", *OUT),
                                 r"vgg11_bn on digits: the network cannot take 1 x 8 x 8 "),
    "sibling-vgg32-on-digits": (("train-sibling", "vgg32.safetensors", "--data", "digits",
                                 "--epochs", "1", *OUT), r"cannot take 1 x 8 x 8 inputs"),
    "eval-vgg32-on-digits": (("eval", "vgg32.safetensors", "--data", "digits"),
                             r"vgg11_bn on digits: the network cannot take 1 x 8 x 8 "),
}


@pytest.mark.parametrize("name", {**TOO_BIG, **MISFITS})
def test_refused_before_allocating_or_training(inputs, tmp_path, name):
    args, match = {**TOO_BIG, **MISFITS}[name]
    args = [inputs / a if (inputs / a).is_file() else a for a in args]
    before = watch(inputs, tmp_path)
    assert_refused(mgrow(*args, cwd=tmp_path, timeout=60, env=CAP), before, match)


@pytest.mark.parametrize("cap,match", [("1M", r"training wrn-10-1 x1 at batch 16 on 8 x 8 "
                                               r"inputs needs about .* MGROW_MEMORY_LIMIT "
                                               r"allows 1.0 MB available"),
                                       ("lots", "MGROW_MEMORY_LIMIT='lots': expected bytes")])
def test_memory_cap_of_the_environment(inputs, tmp_path, cap, match):
    """$MGROW_MEMORY_LIMIT caps what mgrow may use (a shared machine): a tiny cap refuses
    even the digits net, naming the cap; a cap that does not parse is refused."""
    before = watch(inputs, tmp_path)
    run = mgrow("train", "--arch", "wrn-10-1", *DIGITS, *OUT, cwd=tmp_path,
                env={"MGROW_MEMORY_LIMIT": cap})
    assert_refused(run, before, match)


def test_the_need_is_stated_in_proportion(inputs, tmp_path):
    """Twice the width asks for about four times the memory (parameters grow with the
    square of the width)."""
    needs = []
    for width in ("250", "500"):
        run = mgrow("train", "--arch", "wrn-16-8", *DIGITS, "--width", width, *OUT,
                    cwd=tmp_path)
        line = assert_one_line_error(run, MEMORY)
        value, unit = re.search(r"needs about ([0-9.]+) ([kMGTP]?B)", line).groups()
        needs.append(float(value) * 1000 ** "BkMGTP".index(unit[0] if len(unit) > 1 else "B"))
    assert 3.5 < needs[1] / needs[0] < 4.5


def test_estimate_matches_the_built_network():
    """The estimator's state bytes are those of the real network, and its activation count
    equals what a real forward pass produces."""
    from mgrow.arch import build
    from mgrow.footprint import estimate
    from mgrow.manifest import ArchSpec, MixingSpec
    arch, mixing = ArchSpec(name="wrn-16-1", num_classes=10), MixingSpec()
    real = build(arch, mixing)
    est = estimate(build(arch, mixing, meta=True), (4, 3, 32, 32))
    assert est.state == sum(t.numel() * t.element_size() for t in real.state_dict().values())
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel() * 4))
             for m in real.modules() if not list(m.children())]
    with torch.no_grad():
        real.eval()(torch.zeros(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert est.activations == sum(outputs)


@pytest.fixture(scope="module")
def broken_statistics(tmp_path_factory) -> Path:
    """A digits bundle whose last BatchNorm has negative running variances: training (batch
    statistics) runs finite, evaluation (running statistics) cannot."""
    from mgrow.bundle import META_KEY, load
    folder = tmp_path_factory.mktemp("nonfinite")
    b = load(write_bundle(folder / "good.safetensors"))
    tensors = dict(b.tensors)
    tensors["bn.running_var"] = torch.full_like(tensors["bn.running_var"], -1e6)
    return with_tensors(tensors, folder / "negvar.safetensors",
                        {META_KEY: b.manifest.to_json()})


def test_nonfinite_final_evaluation_exits_nonzero(broken_statistics, tmp_path):
    run = mgrow("finetune", broken_statistics, *DIGITS, "--epochs", "1", "--json", *OUT,
                cwd=tmp_path)
    assert_one_line_error(run, r"the final evaluation is not finite \(test loss nan\); "
                               r"out.safetensors was not written; the checkpoint "
                               r"out.safetensors.ckpt is kept")
    assert not (tmp_path / "out.safetensors").exists()
    # it did train: the steps ran with finite losses, only the evaluation failed
    record = json.loads(run.out.splitlines()[-1])
    assert record["step"] == 4 and record["train_loss"] > 0 and record["test_loss"] is None


def test_nonfinite_evaluation_of_a_bundle_exits_nonzero(broken_statistics, tmp_path):
    before = watch(broken_statistics.parent, tmp_path)
    assert_refused(mgrow("eval", broken_statistics, cwd=tmp_path), before,
                   r"negvar.safetensors: the evaluation is not finite")


def _cgroup_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("membership,files,room", [
    # cgroup v2: the tightest of the group and its ancestors binds; "max" is no limit
    ("0::/a/b\n", {"a/b/memory.max": "max", "a/b/memory.current": "100",
                   "a/memory.max": "1000", "a/memory.current": "300"}, 700),
    ("0::/a/b\n", {"a/b/memory.max": "500", "a/b/memory.current": "100",
                   "a/memory.max": "1000", "a/memory.current": "300"}, 400),
    # cgroup v1 (this project's CPU machine): memory.limit_in_bytes, ~2^63 when unlimited
    ("9:memory:/\n4:cpu,cpuacct:/\n", {"memory/memory.limit_in_bytes": "2000",
                                       "memory/memory.usage_in_bytes": "500"}, 1500),
    ("9:cpu,memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                          "memory/memory.usage_in_bytes": "500"}, None),
    # a container names its host path, but sees its own group at the root
    ("9:memory:/docker/x1\n", {"memory/memory.limit_in_bytes": "800",
                               "memory/memory.usage_in_bytes": "900"}, 0),
    ("", {"memory.max": "1000", "memory.current": "1"}, None),  # not a member: not read
])
def test_cgroup_room_v1_and_v2(tmp_path, membership, files, room):
    """The memory check's cgroup limit is read under cgroup v2 and v1 alike, from the
    process's own group up, so a container's limit is not mistaken for the host's RAM."""
    from mgrow.limits import cgroup_room
    _cgroup_files(tmp_path / "fs", files)
    (tmp_path / "cgroup").write_text(membership)
    assert cgroup_room(tmp_path / "fs", tmp_path / "cgroup") == room
