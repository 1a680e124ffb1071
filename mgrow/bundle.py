"""Bundles: one safetensors file per model, its manifest JSON in the header's metadata.

Reading validates everything (file, header, manifest, tensors against the architecture) and
raises MgrowError with a one-line reason; writing goes through mgrow.files (atomic, under the
output's writer lock), so an interrupted or failed write never leaves a partial file.

Owns `Bundle`, `load`, `read_manifest`, `is_bundle`, `save`, `writer`, `save_model`,
`export_plain` and the tensor checks. Imports mgrow.errors, limits, manifest, files,
tensorfile (the format read), and (to rebuild a model) arch and mixing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from pydantic import ValidationError
from torch import nn

from .errors import MgrowError
from .files import check_writable, read_buffer, read_chunks, write_atomic, writer_lock
from .limits import MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, check_memory, load_json
from .manifest import READABLE_VERSIONS, Manifest, Parent
from .tensorfile import header, load_tensors, spans

META_KEY = "mgrow"


@dataclass
class Bundle:
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    path: Path
    sha256: str

    def parent(self) -> Parent:
        """Return this bundle as a lineage parent."""
        return Parent(sha256=self.sha256, path=str(self.path))

    def model(self, share: bool = False) -> nn.Module:
        """Return the network this bundle describes, with its tensors loaded (`share`: the
        bundle's own tensors, not copies: no second copy in memory, for a caller that only
        reads the network)."""
        from .arch import empty
        shapes = skeleton(self.manifest, self.path)
        check_tensors(shapes, self.tensors, self.path)
        model = empty(self.manifest.arch, self.manifest.mixing, shapes)
        model.load_state_dict(self.tensors, strict=True, assign=share)
        return model


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: object) -> None:
    """Raise MgrowError unless `tensors` has exactly the model's keys and shapes."""
    check_shapes(model, {k: tuple(v.shape) for k, v in tensors.items()}, where)


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: object) -> None:
    """Raise MgrowError unless `shapes` (name -> shape) are exactly the model's."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{k} is {shapes[k]} not {want[k]}" for k in want
             if k in shapes and shapes[k] != want[k]]
    problems = ([f"missing {_few(missing)}"] if missing else []) + \
        ([f"unexpected {_few(extra)}"] if extra else []) + wrong[:3]
    if problems:
        raise MgrowError(f"{where}: tensors disagree with the declared architecture: "
                         + "; ".join(problems))


# Floating-point types whose every value float32 holds exactly: converted on load.
WIDENING = {torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
            torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: the one integer tensor


def integer_buffers(model: nn.Module) -> frozenset[str]:
    """Return the state_dict keys of `model`'s integer buffers (Swin's relative position
    index, say): tensors `conform` then keeps as integers."""
    return frozenset(k for k, v in model.state_dict().items()
                     if not v.is_floating_point() and v.dtype != torch.bool
                     and k.rpartition(".")[2] != COUNTER)


def conform(tensors: dict[str, torch.Tensor], where: object,
            integers: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Return the tensors as mgrow computes with them (float32, counters int64), or raise
    MgrowError naming the first tensor that does not convert exactly.

    Accepted: float32; float16, bfloat16 and float8 (every value exact in float32);
    float64 whose values are all exact in float32; integer BatchNorm counters; integer
    tensors at the keys `integers` names (buffers the network declares integer: int64).
    Refused:
    sparse, meta (no data), quantised, complex, boolean and integer weights, inexact
    float64, and storage shared between entries (tied weights). Then every value must be
    finite.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        index = k in integers and v.layout == torch.strided and v.device.type != "meta" \
            and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
        if k in integers and not index:
            raise MgrowError(f"{where}: tensor {k} is {str(v.dtype).removeprefix('torch.')}; "
                             "the network's buffer there holds integers")
        out[k] = v.to(torch.int64) if index else _conform_one(k, v, where)
    _check_unshared(tensors, where)
    check_finite(out, where)
    return out


def _conform_one(k: str, v: torch.Tensor, where: object) -> torch.Tensor:
    """Return one tensor converted to what mgrow computes with, or raise MgrowError."""
    bad = (f"a sparse tensor ({str(v.layout).removeprefix('torch.')})"
           if v.layout != torch.strided else
           "a meta tensor (no data)" if v.device.type == "meta" else
           f"quantised ({str(v.dtype).removeprefix('torch.')})" if v.is_quantized else
           f"complex ({str(v.dtype).removeprefix('torch.')})" if v.is_complex() else None)
    if bad is None and k.rpartition(".")[2] == COUNTER:
        if v.dtype != torch.bool and not v.is_floating_point() and v.numel() == 1:
            return v.to(torch.int64)
        bad = f"{str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}, not one integer"
    elif bad is None and not v.is_floating_point():
        bad = f"{str(v.dtype).removeprefix('torch.')}, not floating-point"
    if bad is not None:
        raise MgrowError(f"{where}: tensor {k} is {bad}; mgrow reads float32 weights (and "
                         "float16, bfloat16, float8 or exact float64, converted)")
    if v.dtype == torch.float32:
        return v
    if v.dtype in WIDENING:
        return v.float()
    if v.dtype != torch.float64:
        raise MgrowError(f"{where}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, "
                         "which float32 cannot hold exactly")
    f = v.float()
    if not bool(((f.double() == v) | v.isnan()).all()):
        raise MgrowError(f"{where}: tensor {k} is float64 with values float32 cannot hold "
                         "exactly; convert the checkpoint to float32 first if the rounding "
                         "is acceptable")
    return f


def _check_unshared(tensors: dict[str, torch.Tensor], where: object) -> None:
    """Raise MgrowError if two entries' data overlap in memory (tied or aliased tensors)."""
    spans = []
    for k, v in tensors.items():
        if v.numel() == 0:
            continue
        reach = sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1
        base = v.untyped_storage().data_ptr()
        lo = v.data_ptr()
        spans.append((base, lo, lo + reach * v.element_size(), k))
    spans.sort()
    for (b1, _, end1, k1), (b2, lo2, _, k2) in zip(spans, spans[1:]):
        if b1 == b2 and lo2 < end1:
            raise MgrowError(f"{where}: tensors {k1} and {k2} share storage (tied weights); "
                             "mgrow needs every entry to hold its own data")


def check_finite(tensors: dict[str, torch.Tensor], where: object) -> None:
    """Raise MgrowError if a floating-point tensor holds NaN or infinite values."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise MgrowError(f"{where}: tensor {k} holds NaN or infinite values (a corrupt file "
                             "or a diverged run)")


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def parse_manifest(text: str, where: object) -> Manifest:
    """Return the validated manifest, or raise MgrowError naming the first problem."""
    raw = load_json(text, where, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(raw, dict):
        raise MgrowError(f"{where}: invalid manifest: not a JSON object")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise MgrowError(f"{where}: manifest format version {version!r}; this mgrow reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade mgrow or "
                         "re-export the bundle)")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "manifest"
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's
        raise MgrowError(f"{where}: invalid manifest: {loc}: {msg}") from None


def load(path: str | os.PathLike) -> Bundle:
    """Return the bundle at `path`, fully validated (manifest and tensors).

    The header is read and checked first: a manifest that does not parse, or tensors
    whose declared shapes are not the architecture's, are refused before the tensor data
    (which may be huge) is read.
    """
    head = _read_header(path)
    skeleton_ = skeleton(_manifest(head, path), path)
    check_shapes(skeleton_, {k: tuple(v.get("shape", ())) for k, v in head.items()
                             if k != "__metadata__" and isinstance(v, dict)}, path)
    size = _check_extent(path, head)
    check_memory(size, f"reading {path}")
    data = read_buffer(path)
    head = header(data, path)  # the bytes read, not the header checked above
    manifest = _manifest(head, path)
    tensors = conform(load_tensors(data, path, head), path, integer_buffers(skeleton_))
    bundle = Bundle(manifest, tensors, Path(path), hashlib.sha256(data).hexdigest())
    check_tensors(skeleton_, tensors, path)
    return bundle


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Return the manifest of the bundle at `path`, reading only its header (and checking
    that its tensor entries tile the file: a truncated bundle is refused)."""
    head = _read_header(path)
    manifest = _manifest(head, path)
    _check_extent(path, head)
    return manifest


def _check_extent(path: str | os.PathLike, head: dict) -> int:
    """Return the file's size, or raise MgrowError unless the header's tensor entries tile
    the file exactly: a file with bytes after them (or short of them) is refused before
    its data is read."""
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        size = os.fstat(f.fileno()).st_size
    spans(head, start, size, path)
    return size


def is_bundle(path: str | os.PathLike) -> bool:
    """Return whether the file at `path` is a safetensors file with an mgrow manifest (of
    any version), reading only its header; False for anything else (a .pth, say)."""
    try:
        meta = _read_header(path).get("__metadata__")
    except MgrowError:
        return False
    return isinstance(meta, dict) and META_KEY in meta


def _read_header(path: str | os.PathLike) -> dict:
    """Return the JSON header of the safetensors file at `path`, reading only the header."""
    chunks = read_chunks(path, 8)  # one-line errors: missing, a folder, unreadable
    start = next(chunks, b"")
    chunks.close()
    size = os.stat(path).st_size
    n = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
    if 0 < n <= min(size - 8, MAX_HEADER_BYTES):  # else header() says what is wrong
        with open(path, "rb") as f:
            f.seek(8)
            start += f.read(n)
    return header(start, path, size)


def _manifest(head: dict, path: str | os.PathLike) -> Manifest:
    """Return the manifest in a safetensors header, validated, or raise MgrowError."""
    meta = head.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise MgrowError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    if META_KEY not in meta:
        raise MgrowError(f"{path}: a safetensors file without an mgrow manifest (a plain "
                         f"checkpoint? use `mgrow convert` first)")
    if not isinstance(meta[META_KEY], str):
        raise MgrowError(f"{path}: invalid manifest: not a JSON text in the header")
    return parse_manifest(meta[META_KEY], path)


def skeleton(manifest: Manifest, where: object) -> nn.Module:
    """Return the network `manifest` describes, on the meta device (no memory), or raise
    MgrowError naming `where` when its widths do not split into its tile grid."""
    from .arch import build
    try:
        return build(manifest.arch, manifest.mixing, meta=True)
    except ValueError as e:
        raise MgrowError(f"{where}: invalid manifest: {e}") from None


def to_bytes(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> bytes:
    """Return the bytes `save` writes (a bundle whose manifest `load` will accept)."""
    buf = io.BytesIO()
    writer(manifest, tensors)(buf)
    return buf.getvalue()


# safetensors' names of the dtypes a bundle may hold, in the order its own writer lays
# tensors out (widest first, then by name), so every tensor's data stays aligned
_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
           torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.uint8: "U8",
           torch.int8: "I8", torch.bool: "BOOL"}


def writer(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Callable[[BinaryIO], None]:
    """Return a function writing the bundle to a binary file, one tensor at a time: a
    safetensors file as safetensors' own writer lays it out (header padded to 8 bytes, data
    widest dtype first, then by name), without holding a second copy of the tensors (its
    writer builds the whole file in memory, twice over: 2x the output at the peak). The
    manifest is checked first, as model_copy(update=...) does not validate what it sets.
    One dtype per bundle: every floating tensor is stored as float32 (mgrow's compute
    dtype; a float64 one computed elsewhere is rounded), BatchNorm counters as int64 (see
    stored_dtype)."""
    text = manifest.to_json()
    parse_manifest(text, "the bundle to write")
    dtypes = {k: _dtype(k, v) for k, v in tensors.items()}
    order = sorted(tensors, key=lambda k: (list(_DTYPES).index(dtypes[k]), k))
    head: dict = {"__metadata__": {META_KEY: text}}
    offset = 0
    for k in order:
        size = tensors[k].numel() * dtypes[k].itemsize
        head[k] = {"dtype": _DTYPES[dtypes[k]], "shape": list(tensors[k].shape),
                   "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:  # one tensor converted at a time
            v = tensors[k].detach().to("cpu", dtypes[k]).contiguous()
            f.write(v.reshape(-1).view(torch.uint8).numpy().data)
    return write


def _dtype(key: str, v: torch.Tensor) -> torch.dtype:
    dtype = stored_dtype(key, v)
    if dtype not in _DTYPES:
        raise MgrowError(f"tensor {key}: a bundle cannot hold {str(dtype).removeprefix('torch.')}")
    return dtype


def stored_dtype(key: str, v: torch.Tensor) -> torch.dtype:
    """Return the dtype a bundle stores tensor `key` in: float32 for a floating tensor,
    int64 for a BatchNorm counter, else its own (which `load` then refuses, naming it)."""
    if v.is_floating_point():
        return torch.float32
    if key.rpartition(".")[2] == COUNTER and v.dtype != torch.bool:
        return torch.int64
    return v.dtype


def save(path: str | os.PathLike, manifest: Manifest, tensors: dict[str, torch.Tensor],
         force: bool = False) -> Path:
    """Write a bundle atomically and return its path."""
    return write_atomic(path, writer(manifest, tensors), force)


def save_model(path: str | os.PathLike, manifest: Manifest, model: nn.Module,
               force: bool = False) -> Path:
    """Write a model's state as a bundle atomically and return its path."""
    model = getattr(model, "module", model)  # unwrap DDP
    return save(path, manifest, model.state_dict(), force)


def export_program(path: str | os.PathLike, output: str | os.PathLike,
                   force: bool = False) -> Path:
    """Write a bundle's plain network as a `torch.export` program (`.pt2`): anyone loads it
    with `torch.export.load(output).module()`, without mgrow. Traced at batch 1 and the
    manifest's input size (both fixed in the program)."""
    import io

    from .arch import empty
    from .mixing import plain_state_dict
    check_writable(output, force, inputs=(path,))
    with writer_lock(output):
        bundle = load(path)
        arch = bundle.manifest.arch
        model = bundle.model()
        if bundle.manifest.mixing is not None:
            state = plain_state_dict(model)
            model = empty(arch)
            model.load_state_dict(state, strict=True)
        x = torch.zeros(1, arch.in_channels, arch.input_size, arch.input_size)
        try:
            program = torch.export.export(model.eval(), (x,))
        except Exception as e:  # torch.export's own errors are many and unrelated
            raise MgrowError(f"{path}: torch.export cannot trace this network: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return write_atomic(output, buf.getvalue(), force=force)


def export_plain(path: str | os.PathLike, output: str | os.PathLike, force: bool = False) -> Path:
    """Write a bundle's plain network (generated weights, no templates) as a plain bundle.

    The file is an ordinary safetensors state_dict (torchvision key names where the
    architecture has them) whose metadata also makes it a plain mgrow bundle.
    """
    from .mixing import plain_state_dict
    check_writable(output, force, inputs=(path,))
    with writer_lock(output):
        bundle = load(path)
        man = bundle.manifest
        tensors = plain_state_dict(bundle.model()) if man.mixing else bundle.tensors
        plain = man.derived("export", {}, (bundle.parent(),), mixing=None)
        return save(output, plain, tensors, force)
