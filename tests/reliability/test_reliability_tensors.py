"""Tensor dtypes and layouts, in bundles and in the plain checkpoints `convert` reads.

mgrow computes in float32. It accepts what converts to float32 exactly (float16, bfloat16,
float8, and float64 whose every value float32 holds) and refuses the rest in one line
naming the tensor: sparse, meta, quantised, complex, boolean or integer weights, inexact
float64, and entries that share storage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from rel_support import (assert_refused, digits_arch, mgrow, watch, with_tensors,
                         write_bundle)

GOOD = "good.safetensors"
BANK = "banks.1"  # an inner bank of the digits wrn-10-1: (1, 4, 16, 16, 3, 3)


def _tensors(edit):
    """A maker writing the valid bundle's tensors, `edit`ed, with its manifest."""
    def make(good: Path, dst: Path) -> None:
        from mgrow.bundle import META_KEY, load
        b = load(good)
        tensors = dict(b.tensors)
        edit(tensors)
        with_tensors(tensors, dst, {META_KEY: b.manifest.to_json()})
    return make


def _as(key: str, dtype: torch.dtype):
    def edit(t):
        t[key] = t[key].to(dtype)
    return edit


def _inexact(t):
    t[BANK] = t[BANK].double() + 1e-12  # float32 rounds every value


# name -> (edit of the valid tensors, what the one line must match)
BAD_BUNDLE_TENSORS = {
    "bool-bank": (_as(BANK, torch.bool), f"tensor {BANK} is bool, not floating-point"),
    "int32-bank": (_as(BANK, torch.int32), f"tensor {BANK} is int32, not floating-point"),
    "uint8-bias": (_as("fc.bias", torch.uint8), "tensor fc.bias is uint8"),
    "complex-bank": (_as(BANK, torch.complex64), f"tensor {BANK} is complex"),
    "float64-inexact": (_inexact, f"tensor {BANK} is float64 with values float32 cannot "
                                  "hold exactly"),
    "float-counter": (_as("bn.num_batches_tracked", torch.float32),
                      "tensor bn.num_batches_tracked is float32 .*not one integer"),
    "float64-overflow": (lambda t: t.update({BANK: t[BANK].double() * 1e300}),
                         f"tensor {BANK} is float64 with values"),
}

# name -> dtype of BANK that is accepted (every value exact in float32)
EXACT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
         "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tensors")
    good = write_bundle(folder / GOOD)
    for name, (edit, _) in BAD_BUNDLE_TENSORS.items():
        _tensors(edit)(good, folder / f"{name}.safetensors")
    for name, dtype in EXACT.items():
        _tensors(_as(BANK, dtype))(good, folder / f"exact-{name}.safetensors")
    return folder


@pytest.mark.parametrize("command", ["eval", "fuse"])
@pytest.mark.parametrize("name", BAD_BUNDLE_TENSORS)
def test_bad_bundle_tensor_is_refused(inputs, tmp_path, name, command):
    args = [command, inputs / f"{name}.safetensors"] + (
        ["-o", "out.safetensors"] if command == "fuse" else [])
    before = watch(inputs, tmp_path)
    assert_refused(mgrow(*args, cwd=tmp_path), before, BAD_BUNDLE_TENSORS[name][1])


@pytest.mark.parametrize("name", EXACT)
def test_exact_dtypes_are_widened_on_load(inputs, tmp_path, name):
    """The bundle loads as float32 holding exactly the stored values, and evaluates."""
    from mgrow.bundle import load
    import safetensors.torch
    path = inputs / f"exact-{name}.safetensors"
    stored = safetensors.torch.load(path.read_bytes())[BANK]
    loaded = load(path).tensors[BANK]
    assert stored.dtype == EXACT[name] and loaded.dtype == torch.float32
    assert torch.equal(loaded.double(), stored.double())
    if EXACT[name] != torch.float64:  # the narrower types did round: a real conversion
        assert not torch.equal(loaded, load(inputs / GOOD).tensors[BANK])
    run = mgrow("eval", path, "--json", cwd=tmp_path)
    assert run.rc == 0, run.err


# -- plain checkpoints through `convert` ----------------------------------------------------

CONVERT = ("--arch", "wrn-10-1", "--in-channels", "1", "--input-size", "8", "-o",
           "out.safetensors")
W = "blocks.0.conv1.weight"  # (16, 16, 3, 3), same shape as blocks.0.conv2.weight


def _state() -> dict[str, torch.Tensor]:
    from mgrow.arch import build
    return build(digits_arch(), None, seed=0).state_dict()


def _pt(edit):
    def make(dst: Path) -> None:
        s = _state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse CSR, quantisation: beta/deprecated
            edit(s)
        torch.save(s, dst)
    return make


def _tied(s):
    s["blocks.0.conv2.weight"] = s[W]


def _overlapping(s):
    s["fc.bias"] = s["fc.weight"][0, :10]  # a view into another entry's data


def _quantised(s):
    s[W] = torch.quantize_per_tensor(s[W], 0.01, 0, torch.qint8)


# name -> (how to edit the state_dict, what the one line must match)
BAD_CHECKPOINT_TENSORS = {
    "sparse-coo": (lambda s: s.update({W: s[W].to_sparse()}), f"tensor {W} is a sparse "
                                                                r"tensor \(sparse_coo\)"),
    "sparse-csr": (lambda s: s.update({"fc.weight": s["fc.weight"].to_sparse_csr()}),
                   r"tensor fc.weight is a sparse tensor \(sparse_csr\)"),
    "meta": (lambda s: s.update({W: torch.empty(16, 16, 3, 3, device="meta")}),
             rf"tensor {W} is a meta tensor \(no data\)"),
    "complex": (lambda s: s.update({W: s[W].to(torch.complex64)}), f"tensor {W} is complex"),
    "quantised": (_quantised, rf"tensor {W} is quantised \(qint8\)"),
    "bool": (lambda s: s.update({W: s[W] > 0}), f"tensor {W} is bool"),
    "int64": (lambda s: s.update({W: s[W].long()}), f"tensor {W} is int64"),
    "float64-inexact": (lambda s: s.update({W: s[W].double() / 3}),
                        f"tensor {W} is float64 with values float32 cannot hold"),
    "tied-weights": (_tied, f"tensors ({W} and blocks.0.conv2.weight|blocks.0.conv2.weight "
                            f"and {W}) share storage"),
    "overlapping-view": (_overlapping, "fc.(bias|weight) and fc.(bias|weight) share storage"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tensor-checkpoints")
    for name, (edit, _) in BAD_CHECKPOINT_TENSORS.items():
        _pt(edit)(folder / f"{name}.pt")
    _pt(lambda s: s.update({W: s[W].half()}))(folder / "float16.pt")
    return folder


@pytest.mark.parametrize("name", BAD_CHECKPOINT_TENSORS)
def test_bad_checkpoint_tensor_is_refused(checkpoints, tmp_path, name):
    before = watch(checkpoints, tmp_path)
    run = mgrow("convert", checkpoints / f"{name}.pt", *CONVERT, cwd=tmp_path)
    assert_refused(run, before, BAD_CHECKPOINT_TENSORS[name][1])


def test_float16_checkpoint_converts_exactly(checkpoints, tmp_path):
    """A float16 weight is taken as the float32 of its values: the plain import holds them
    bit for bit."""
    from mgrow.bundle import load
    run = mgrow("convert", checkpoints / "float16.pt", *CONVERT[:-2], "--plain", "-o",
                "out.safetensors", cwd=tmp_path)
    assert run.rc == 0, run.err
    got = load(tmp_path / "out.safetensors").tensors[W]
    want = torch.load(checkpoints / "float16.pt", weights_only=True)[W]
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
