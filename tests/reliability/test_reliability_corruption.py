"""Corruption of a bundle's tensor data region (tests/test_bundle.py covers the header).

safetensors carries no checksum, so a changed data byte cannot be detected as such. What
mgrow guarantees instead: a damaged file either is refused in one line, or loads as a
structurally sound bundle (same names, shapes and dtypes, every value finite) that differs
from the original in exactly the one value holding the byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mgrow import MgrowError
from mgrow.bundle import load

from rel_support import write_bundle


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, bytes, dict, dict]:
    folder = tmp_path_factory.mktemp("original")
    path = write_bundle(folder / "m.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8:8 + n])
    head.pop("__metadata__")
    return path, data, head, load(path).tensors


def _holder(head: dict, rel: int) -> str:
    """Return the name of the tensor whose bytes include data-region offset `rel`."""
    for name, info in head.items():
        lo, hi = info["data_offsets"]
        if lo <= rel < hi:
            return name
    raise AssertionError(f"offset {rel} is in no tensor")


def _load_corrupted(path: Path, data: bytes, offset: int, value: int) -> object:
    corrupt = bytearray(data)
    corrupt[offset] = value
    target = path.with_name("corrupt.safetensors")
    target.write_bytes(bytes(corrupt))
    try:
        return load(target)
    except MgrowError as e:
        return e


@settings(max_examples=40, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_data_corruption_refused_or_confined(original, where, value):
    path, data, head, want = original
    start = 8 + struct.unpack("<Q", data[:8])[0]
    offset = start + int(where * (len(data) - start))
    got = _load_corrupted(path, data, offset, value)
    name = _holder(head, offset - start)
    if isinstance(got, MgrowError):  # the only thing a byte can break: a value's finiteness
        assert "\n" not in str(got)
        assert f"tensor {name} holds NaN or infinite values" in str(got)
        return
    assert got.tensors.keys() == want.keys()
    for k, v in want.items():
        w = got.tensors[k]
        assert (w.shape, w.dtype) == (v.shape, v.dtype), k
        assert torch.isfinite(w).all() if w.is_floating_point() else True, k
        differing = int((w != v).sum())
        assert differing == 0 if k != name else differing <= 1, (k, differing)
    got.model()  # builds and takes its tensors


def test_one_byte_can_make_a_weight_infinite(original):
    """A byte that sets a float32's exponent to all ones (inf or NaN) is refused: found in
    the first bank, the highest byte of a value whose next byte has its top bit set."""
    path, data, head, _ = original
    start = 8 + struct.unpack("<Q", data[:8])[0]
    lo, hi = head["banks.0"]["data_offsets"]
    at = next(start + i for i in range(lo, hi, 4) if data[start + i + 2] & 0x80)
    got = _load_corrupted(path, data, at + 3, 0x7F)
    assert isinstance(got, MgrowError) and "banks.0 holds NaN or infinite values" in str(got)
