"""Bundles: byte-identical round trips and a one-line error for every bad file."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st

from mgrow import MgrowError
from mgrow.bundle import META_KEY, load, save, to_bytes
from mgrow.manifest import FORMAT_VERSION, ArchSpec, Lineage, Manifest, MixingSpec, Parent, Phase

from conftest import make_bundle

ARCH = ArchSpec(name="wrn-10-1")


@pytest.fixture()
def bundle_file(tmp_path):
    make_bundle(tmp_path / "m.safetensors", ARCH)
    return tmp_path / "m.safetensors"


def test_round_trip_bytes(bundle_file, tmp_path):
    first = bundle_file.read_bytes()
    b = load(bundle_file)
    save(tmp_path / "again.safetensors", b.manifest, b.tensors)
    assert (tmp_path / "again.safetensors").read_bytes() == first
    assert load(tmp_path / "again.safetensors").manifest == b.manifest


def test_refuses_to_overwrite(bundle_file):
    b = load(bundle_file)
    before = bundle_file.read_bytes()
    with pytest.raises(MgrowError, match="already exists"):
        save(bundle_file, b.manifest, b.tensors)
    assert bundle_file.read_bytes() == before
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in b.tensors.items()}
    save(bundle_file, b.manifest, changed, force=True)  # --force overwrites
    assert all(torch.equal(v, changed[k]) for k, v in load(bundle_file).tensors.items())


def _with_manifest(bundle_file, path, edit):
    b = load(bundle_file)
    raw = json.loads(b.manifest.to_json())
    edit(raw)
    tensors = {k: v.contiguous() for k, v in b.tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata={META_KEY: json.dumps(raw)})
    return path


def _bad_files(bundle_file, d):
    data = bundle_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cases = {
        d / "missing.safetensors": "no such file",
        d: "is a directory",
    }
    (d / "empty.safetensors").write_bytes(b"")
    cases[d / "empty.safetensors"] = "not a safetensors file"
    (d / "random.safetensors").write_bytes(bytes(range(256)) * 64)
    cases[d / "random.safetensors"] = "not a safetensors file"
    for cut in (4, 8 + n // 2, 8 + n + 10, len(data) - 1):
        (d / f"cut{cut}.safetensors").write_bytes(data[:cut])
        cases[d / f"cut{cut}.safetensors"] = "(not a safetensors|truncated|corrupt)"
    safetensors.torch.save_file({"w": torch.zeros(2)}, d / "foreign.safetensors")
    cases[d / "foreign.safetensors"] = "without an mgrow manifest"
    future = FORMAT_VERSION + 1  # a manifest from a later mgrow
    cases[_with_manifest(bundle_file, d / "future.safetensors",
                         lambda m: m.update(format_version=future))] = f"format version {future}"
    cases[_with_manifest(bundle_file, d / "nofield.safetensors",
                         lambda m: m.pop("lineage"))] = "invalid manifest: lineage"
    cases[_with_manifest(bundle_file, d / "type.safetensors",
                         lambda m: m["arch"].update(num_classes="ten"))] = \
        "invalid manifest: arch.num_classes"
    cases[_with_manifest(bundle_file, d / "arch.safetensors",
                         lambda m: m["arch"].update(name="wrn-16-1"))] = "disagree"
    cases[_with_manifest(bundle_file, d / "classes.safetensors",
                         lambda m: m["arch"].update(num_classes=100))] = "fc.bias is"
    cases[_with_manifest(bundle_file, d / "unknown.safetensors",
                         lambda m: m["arch"].update(name="mobilenet"))] = \
        "unknown architecture 'mobilenet'"
    cases[_with_manifest(bundle_file, d / "grid.safetensors",  # 3 channels in a 2x2 grid
                         lambda m: (m["arch"].update(width=0.1875),
                                    m["mixing"].update(factor=2)))] = \
        "grid.safetensors: invalid manifest: .*does not split"
    return cases


def test_every_bad_file_is_one_line_error(bundle_file, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path, message in _bad_files(bundle_file, bad).items():
        with pytest.raises(MgrowError, match=message) as info:
            load(path)
        assert "\n" not in str(info.value), path


@settings(max_examples=40, deadline=None)
@given(classes=st.integers(1, 1000), width=st.floats(0.1, 4), templates=st.integers(1, 8),
       sharing=st.sampled_from(["pairs", "none"]), images=st.integers(0, 10**9),
       acc=st.one_of(st.none(), st.floats(0, 1)), text=st.text(max_size=20))
def test_manifest_round_trip_property(classes, width, templates, sharing, images, acc, text):
    man = Manifest(
        arch=ArchSpec(name="wrn-16-1", width=width, num_classes=classes),
        mixing=MixingSpec(templates=templates, sharing=sharing),
        lineage=Lineage(operation="train", options={"note": text, "n": images},
                        parents=(Parent(sha256="0" * 64, path=text),)),
        phases=(Phase(operation="train", arch=text, stage="base", images=images,
                      forward_flops=images, train_flops=3 * images, wall_s=1.5, device="cpu",
                      accuracy=acc),))
    again = Manifest.model_validate_json(man.to_json())
    assert again == man and again.to_json() == man.to_json()
    assert to_bytes(again, {"x": torch.ones(2)}) == to_bytes(man, {"x": torch.ones(2)})


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(8, 400), value=st.integers(0, 255))
def test_header_corruption_detected_or_harmless(tmp_path_factory, offset, value):
    d = tmp_path_factory.mktemp("corrupt")
    original = make_bundle(d / "m.safetensors", ArchSpec(name="wrn-10-1", width=0.25))
    data = bytearray((d / "m.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    offset = 8 + offset % n
    data[offset] = value
    (d / "c.safetensors").write_bytes(bytes(data))
    try:
        b = load(d / "c.safetensors")
    except MgrowError as e:
        assert "\n" not in str(e)
        return
    # harmless: what loaded is a complete, consistent bundle holding the very same tensors
    # (safetensors carries no checksum: a changed manifest value that is still valid, say a
    # digit of a timing, loads as written; a tensor's dtype, shape or offsets cannot change)
    model = b.model()
    assert set(model.state_dict()) == set(original.tensors) == set(b.tensors)
    assert all(torch.equal(b.tensors[k], original.tensors[k]) for k in original.tensors)


def test_written_files_get_the_usual_mode(bundle_file):
    import os
    mask = os.umask(0)
    os.umask(mask)
    assert bundle_file.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_bundle_is_written_tensor_by_tensor_as_safetensors_lays_it_out(tmp_path):
    """save streams one tensor at a time (no second copy of the output in memory) and
    writes the same bytes as safetensors' own writer: float32 weights, int64 counters, an
    integer buffer, a float64 tensor rounded to float32, a bool; a dtype a bundle cannot
    hold is refused in one line before anything is written."""
    man = Manifest(arch=ArchSpec(name="wrn-10-1"), lineage=Lineage(operation="init"))
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 4, generator=g), "a.num_batches_tracked":
               torch.tensor(7), "idx": torch.arange(5, dtype=torch.int32), "w64":
               torch.randn(2, 2, generator=g, dtype=torch.float64), "mask": torch.ones(
               3, dtype=torch.bool), "t": torch.randn(4, 4, generator=g).t(), "e": torch.ones(0)}
    out = save(tmp_path / "s.safetensors", man, tensors)
    flat = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in tensors.items()}
    assert out.read_bytes() == safetensors.torch.save(flat, metadata={META_KEY: man.to_json()})
    back = safetensors.torch.load_file(out)
    assert all(torch.equal(back[k], flat[k]) for k in tensors)
    with pytest.raises(MgrowError, match="tensor z: a bundle cannot hold complex64"):
        save(tmp_path / "c.safetensors", man, {"z": torch.ones(2, dtype=torch.complex64)})
    assert not (tmp_path / "c.safetensors").exists()


def _raw_file(head: dict, data: bytes, pad: int = 0) -> bytearray:
    """A safetensors file from a header (tensor entries, no metadata) and a data region; the
    header padded with `pad` spaces (an odd `pad` leaves the data unaligned)."""
    text = json.dumps(head).encode() + b" " * pad
    return bytearray(struct.pack("<Q", len(text)) + text + data)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_tensors_are_read_in_place_as_safetensors_reads_them():
    """A file's tensors are views into the one buffer it was read into (the file's size in
    memory once, not twice), equal to safetensors' own reading for every dtype mgrow meets,
    aligned or not; a file whose entries do not tile its data region is refused in one
    line, as safetensors refuses it."""
    from mgrow.tensorfile import load_tensors
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(
               2, generator=g, dtype=torch.float64), "i64": torch.arange(3), "i32": torch.arange(
               5, dtype=torch.int32), "u8": torch.arange(3, dtype=torch.uint8), "b": torch.tensor(
               [True, False, True]), "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
               "c64": torch.randn(2, generator=g, dtype=torch.complex64), "s": torch.tensor(2.5),
               "e": torch.ones(0, 4)}
    data = bytearray(safetensors.torch.save(tensors))
    got = load_tensors(data, "f")
    want = safetensors.torch.load(bytes(data))
    assert got.keys() == want.keys() == tensors.keys()
    lo = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for k, v in got.items():
        assert (v.dtype, v.shape) == (want[k].dtype, want[k].shape), k
        assert torch.equal(_bits(v), _bits(want[k])), k  # bit for bit
        if v.numel():  # in place: inside the buffer, not a copy
            assert lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= lo + len(data), k
    # written by another writer with an odd header length: unaligned, copied out, equal
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8:8 + n])
    odd = _raw_file(head, bytes(data[8 + n:]), pad=1)
    assert all(torch.equal(_bits(v), _bits(want[k])) for k, v in load_tensors(odd, "o").items())
    # entries that do not tile the data region exactly
    body = bytes(data[8 + n:])
    first = min((k for k in head if k != "__metadata__"),
                key=lambda k: head[k]["data_offsets"])
    a, b = head[first]["data_offsets"]

    def edited(change) -> dict:
        h = json.loads(json.dumps(head))
        change(h)
        return h
    bad = {
        "trailing": (_raw_file(head, body + b"\0" * 8), "the tensors hold"),
        "gap": (_raw_file(edited(lambda h: h.pop(first)), body), f"starts at byte {b}"),
        "overlap": (_raw_file(edited(lambda h: h[first].update(data_offsets=[a, b + 4])),
                              body), "spans"),
        "negative": (_raw_file(edited(lambda h: h[first].update(shape=[-1])), body),
                     "no valid shape"),
        "dtype": (_raw_file(edited(lambda h: h[first].update(dtype="F4")), body),
                  "dtype 'F4', which mgrow does not read"),
        "cut": (_raw_file(head, body[:-1]), "the tensors hold"),
    }
    for name, (raw, message) in bad.items():
        with pytest.raises(MgrowError, match=message) as info:
            load_tensors(raw, name)
        assert "\n" not in str(info.value)
        with pytest.raises(Exception):  # safetensors refuses it too
            safetensors.torch.load(bytes(raw))
