"""Limits on what mgrow accepts: value ranges, JSON shape, memory and work, file-name length.

One place for every bound, so the command line (typer `min=`/`max=` and the cli's
`_number` callbacks), the manifest schema (pydantic `Field` constraints) and the library
agree, and a refusal is one line that names the option or field.

Memory: before a network is built, `mgrow.arch.build` builds it on the meta device
(shapes only, nothing allocated) and `footprint.estimate` counts its parameters, buffers and
generated weights and runs one meta forward pass to size the activations; `check_memory`
refuses what would not fit the memory available to this process (`available_memory`:
/proc/meminfo's MemAvailable, capped by a cgroup limit; on CUDA the device's free
memory) and says how much it would need. Every command that makes a network goes through
`build`; training and evaluation check again at their batch size (phases.check_fits).

Owns the bounds, JSON reading/writing under those bounds, name-length and memory checks.
Imports only mgrow.errors (torch only inside functions), so the manifest schema can use it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MgrowError

if TYPE_CHECKING:  # torch is imported where it is used: the manifest schema imports this
    import torch

# -- value ranges (inclusive) shared by the command line and the manifest schema ------------
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; numpy's SeedSequence any int >= 0
MAX_WIDTH = 1024.0  # channel multiplier
MAX_CLASSES = 100_000
MAX_CHANNELS = 1024  # input channels
MAX_INPUT_SIZE = 4096  # input side in pixels
MAX_TEMPLATES = 64  # templates per layer (and of the edge layers)
MAX_FACTOR = 64  # growth factor g (and members m <= g); growing again multiplies it
MAX_DEPTH = 1000  # WRN depth D: build work grows with the layer count
MAX_BATCH = 1 << 20
MAX_EPOCHS = 1e6
MAX_LR = 1e4
MAX_WEIGHT_DECAY = 1.0
MAX_IMAGES = 2**53  # images counted in a ledger row (exact in a JSON double)
MAX_FLOPS = 2**62  # forward FLOPs per image; train FLOPs = 3 x forward x images
MAX_SECONDS = 1e9  # wall time of a phase
MAX_NOISE = 1e3  # relative noise of fuse
MAX_REFERENCE_EPOCHS = 1e6
MAX_BUDGET = 1e6
MAX_WORKERS = 1024

# -- JSON read from files: refused before the parser's recursion or memory can blow up ------
MAX_JSON_DEPTH = 32  # a manifest is about 5 levels deep
MAX_MANIFEST_BYTES = 1 << 24  # 16 MiB of manifest text
MAX_HEADER_BYTES = 100_000_000  # safetensors' own header limit
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN, _CLOSE = list(b"[{"), list(b"]}")


def json_depth(text: str | bytes) -> int:
    """Return how deeply `text`'s arrays and objects nest (strings ignored); "[[1], {}]" is 2."""
    import numpy as np
    raw = text.encode(errors="replace") if isinstance(text, str) else text
    bare = np.frombuffer(_STRINGS.sub(b"", raw), dtype=np.uint8)
    steps = (np.isin(bare, _OPEN).astype(np.int64) - np.isin(bare, _CLOSE)).cumsum()
    return int(steps.max(initial=0))


def load_json(text: str | bytes, where: object, what: str, max_bytes: int,
              not_json: str = "{what} is not valid JSON ({why})") -> Any:
    """Return parsed JSON, or raise MgrowError if it is too large, too deep or not JSON
    (`not_json`: the message for text that does not parse)."""
    if len(text) > max_bytes:
        raise MgrowError(f"{where}: {what} of {len(text):,} bytes exceeds the limit of "
                         f"{max_bytes:,}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise MgrowError(f"{where}: {what} nests {depth} levels deep (at most "
                         f"{MAX_JSON_DEPTH})")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, RecursionError) as e:
        why = type(e).__name__
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        why = e.msg if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0]
    raise MgrowError(f"{where}: " + not_json.format(what=what, why=why))


def dump_json(obj: Any, indent: int | None = None) -> str:
    """Return `obj` as strict JSON: a number that is not finite (a diverged loss, the CKA of
    a layer whose output does not vary) is null, not the NaN that JSON parsers refuse."""
    def strict(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


# -- file names ------------------------------------------------------------------------------
TEMP_SUFFIX = len("." + ".12345678.tmp")  # a temporary file: .NAME.XXXXXXXX.tmp
SIDE_SUFFIX = len(".metrics.jsonl") + TEMP_SUFFIX  # the longest name made from an output's


def name_max(folder: Path) -> int:
    """Return the longest file name (bytes) the file system of `folder` allows."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_name_length(path: Path, reserve: int = SIDE_SUFFIX) -> None:
    """Raise MgrowError unless `path`'s name leaves `reserve` bytes below the file system's
    limit, for the files named after it (temporary, checkpoint, metrics, lock)."""
    folder = path.parent if str(path.parent) else Path(".")
    size, limit = len(os.fsencode(path.name)), name_max(folder)
    if size + reserve > limit:
        raise MgrowError(f"{path.name[:40]}...: output name of {size} bytes is too long "
                         f"(at most {limit - reserve}: mgrow writes side files named "
                         f"after it, and names are limited to {limit} bytes)")


# -- memory and work -------------------------------------------------------------------------

def human(n: float) -> str:
    """Return a byte count for people: '512 B', '3.2 MB', '1.5 TB'."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def memory_cap() -> int | None:
    """Return the bytes $MGROW_MEMORY_LIMIT allows (a number with an optional k, M, G or T
    suffix, powers of 1000), None when unset; raise MgrowError when it does not parse."""
    text = os.environ.get("MGROW_MEMORY_LIMIT", "").strip()
    if not text:
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*([kMGT]?)B?", text)
    if m is None:
        raise MgrowError(f"MGROW_MEMORY_LIMIT={text[:40]!r}: expected bytes such as 4G or "
                         "512M")
    return int(float(m.group(1)) * 1000 ** " kMGT".index(m.group(2) or " "))


def cgroup_room(root: Path = Path("/sys/fs/cgroup"),
                membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Return the bytes this process's memory cgroups still allow: the tightest limit -
    usage of cgroup v2's `memory.max` and v1's `memory.limit_in_bytes` over the group
    /proc/self/cgroup names and its ancestors (a limit set on a parent binds too); None when
    no limit is set or none can be read. A container sees its own group at the root."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    groups = []  # "0::/path" (v2), "N:memory:/path" or "N:cpu,memory:/path" (v1)
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            groups.append((root, "memory.max", "memory.current", path))
        elif "memory" in controllers.split(","):
            groups.append((root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                           path))
    rooms = []
    for base, limit_name, usage_name, path in groups:
        group = Path("/", path)
        for folder in (group, *group.parents):
            try:
                limit = (base / folder.relative_to("/") / limit_name).read_text().strip()
                usage = int((base / folder.relative_to("/") / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 1 << 60:  # v1 writes "no limit" as ~2^63
                rooms.append(max(int(limit) - usage, 0))
    return min(rooms) if rooms else None


def available_memory() -> int:
    """Return the bytes this process may still allocate: MemAvailable, within its cgroups'
    limits (cgroup_room) and $MGROW_MEMORY_LIMIT (memory_cap)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            avail = 1 << 62
    room = cgroup_room()
    if room is not None:
        avail = min(avail, room)
    cap = memory_cap()
    return max(avail if cap is None else min(avail, cap), 0)


def check_memory(need: int, what: str, device: torch.device | None = None) -> None:
    """Raise MgrowError if `need` bytes do not fit the memory left (host, or a CUDA device)."""
    if device is not None and device.type == "cuda":
        import torch
        # free on the device, plus what this process's caching allocator holds unused
        have = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        where = f"{device} has"
    else:
        have = available_memory()
        where = "this machine has" if memory_cap() != have else "MGROW_MEMORY_LIMIT allows"
    if need > have:
        raise MgrowError(f"{what} needs about {human(need)} of memory; {where} "
                         f"{human(have)} available")
