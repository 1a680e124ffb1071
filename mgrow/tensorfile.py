"""The safetensors format, read: the header (bounded, checked) and the tensor entries
(dtype, shape and offsets checked as safetensors checks them, tiling the data region), the
tensors read in place as views into the file's one buffer.

Owns `header`, `spans`, `load_tensors`, `DTYPES`. Imports mgrow.errors and mgrow.limits.
"""

from __future__ import annotations

import math
import struct

import torch

from .errors import MgrowError
from .limits import MAX_HEADER_BYTES, load_json


def header(data: bytes, where: object, size: int | None = None) -> dict:
    """Return the JSON header of a safetensors file, or raise MgrowError; `data` is the
    whole file, or (given the file's `size`) its start, header included."""
    size = len(data) if size is None else size
    if size < 8:
        raise MgrowError(f"{where}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > size - 8:
        raise MgrowError(f"{where}: not a safetensors file, or truncated (header of {n} "
                         f"bytes, file of {size})")
    if n > MAX_HEADER_BYTES:
        raise MgrowError(f"{where}: not a safetensors file (header of {n:,} bytes exceeds "
                         f"the limit of {MAX_HEADER_BYTES:,})")
    head = load_json(data[8:8 + n], where, "safetensors header", MAX_HEADER_BYTES,
                     "not a safetensors file (header is not JSON)")
    if not isinstance(head, dict):
        raise MgrowError(f"{where}: not a safetensors file (header is not a JSON object)")
    return head


# safetensors' element types as torch holds them (little-endian, as the format stores them)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
          "BOOL": torch.bool, "C64": torch.complex64,
          **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {})}


def load_tensors(data: bytearray, where: object,
                 head: dict | None = None) -> dict[str, torch.Tensor]:
    """Return the tensors of a safetensors file's bytes as views into `data` (no copy: the
    file's size in memory once, not twice), or raise MgrowError.

    Every entry is checked as safetensors checks it: a known dtype, a shape of sizes >= 0,
    offsets whose span is the shape's bytes, and spans that tile the data region exactly
    (no gap, no overlap, nothing after). An entry whose bytes are not aligned to its
    element size (no writer of ours makes one) is copied out.
    """
    if not isinstance(data, bytearray):
        data = bytearray(data)
    head = header(data, where) if head is None else head  # (`head`: data's, parsed)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    entries = spans(head, start, len(data), where)
    base = torch.frombuffer(data, dtype=torch.uint8, count=1).data_ptr() if entries and \
        entries[-1][1] else 0
    tensors = {}
    for lo, hi, k, dtype, shape in entries:
        if hi == lo:
            tensors[k] = torch.empty(shape, dtype=dtype)
        elif (base + start + lo) % dtype.itemsize:  # unaligned: copied out
            tensors[k] = torch.frombuffer(data[start + lo:start + hi], dtype=dtype).view(shape)
        else:
            tensors[k] = torch.frombuffer(data, dtype=dtype, count=(hi - lo) // dtype.itemsize,
                                          offset=start + lo).view(shape)
    return tensors


def spans(head: dict, start: int, size: int, where: object) -> list[tuple]:
    """Return a safetensors header's entries as (lo, hi, name, dtype, shape), by offset, or
    raise MgrowError unless they tile the data region (bytes `start` to `size` of the file)
    exactly (see load_tensors)."""
    def bad(why: str) -> MgrowError:
        return MgrowError(f"{where}: corrupt or truncated safetensors file ({why})")

    spans = []
    for k, v in head.items():
        if k == "__metadata__":
            continue
        shape, offsets = (v.get("shape"), v.get("data_offsets")) if isinstance(v, dict) \
            else (None, None)
        if not (isinstance(shape, list) and all(_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(_count(d) for d in offsets)):
            raise bad(f"entry {k!r} has no valid shape and data_offsets")
        if (dtype := DTYPES.get(v.get("dtype"))) is None:
            raise MgrowError(f"{where}: tensor {k} has dtype {v.get('dtype')!r}, which mgrow "
                             f"does not read (it reads {', '.join(DTYPES)})")
        lo, hi = offsets
        if hi - lo != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {k} spans {hi - lo} bytes, not its shape's "
                      f"{math.prod(shape) * dtype.itemsize}")
        spans.append((lo, hi, k, dtype, shape))
    spans.sort(key=lambda e: e[:2])
    end = 0
    for lo, hi, k, *_ in spans:
        if lo != end:
            raise bad(f"tensor {k} starts at byte {lo} of the data, not {end}")
        end = hi
    if start + end != size:
        raise bad(f"the tensors hold {end} bytes, the data region {size - start}")
    return spans


def _count(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0
