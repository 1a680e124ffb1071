"""Bundles: one safetensors file per model, its manifest JSON in the header's metadata.

Reading validates everything (file, header, manifest, tensors against the architecture) and
raises MgrowError with a one-line reason; writing is atomic (temporary file in the target
folder, fsync, rename), so an interrupted or failed write never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn

from . import MgrowError
from .limits import (MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, SIDE_SUFFIX, TEMP_SUFFIX,
                     check_name_length, load_json)
from .manifest import FORMAT_VERSION, Manifest, Parent

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

    def model(self) -> nn.Module:
        """Return the network this bundle describes, with its tensors loaded."""
        model = skeleton(self.manifest, self.path)
        check_tensors(model, self.tensors, self.path)
        model = model.to_empty(device="cpu")
        model.load_state_dict(self.tensors, strict=True)
        return model


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: object) -> None:
    """Raise MgrowError unless `tensors` has exactly the model's keys and shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    wrong = [f"{k} is {tuple(tensors[k].shape)} not {want[k]}" for k in want
             if k in tensors and tuple(tensors[k].shape) != want[k]]
    problems = ([f"missing {_few(missing)}"] if missing else []) + \
        ([f"unexpected {_few(extra)}"] if extra else []) + wrong[:3]
    if problems:
        raise MgrowError(f"{where}: tensors disagree with the declared architecture: "
                         + "; ".join(problems))


# Floating-point types whose every value float32 holds exactly: converted on load.
WIDENING = {torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
            torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: the one integer tensor


def conform(tensors: dict[str, torch.Tensor], where: object) -> dict[str, torch.Tensor]:
    """Return the tensors as mgrow computes with them (float32, counters int64), or raise
    MgrowError naming the first tensor that does not convert exactly.

    Accepted: float32; float16, bfloat16 and float8 (every value exact in float32);
    float64 whose values are all exact in float32; integer BatchNorm counters. Refused:
    sparse, meta (no data), quantised, complex, boolean and integer weights, inexact
    float64, and storage shared between entries (tied weights). Then every value must be
    finite.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        out[k] = _conform_one(k, v, where)
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


def read_bytes(path: str | os.PathLike) -> bytes:
    """Return a file's bytes, or raise MgrowError naming why it cannot be read."""
    return b"".join(read_chunks(path, -1))


def read_chunks(path: str | os.PathLike, size: int = 1 << 20) -> Iterator[bytes]:
    """Yield a file's bytes `size` at a time (-1: all at once), or raise MgrowError naming
    why it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise MgrowError(f"{p}: no such file")
    if p.is_dir():
        raise MgrowError(f"{p}: is a directory, not a file")
    try:
        with open(p, "rb") as f:
            while chunk := f.read(size):
                yield chunk
                if size < 0:
                    return
    except OSError as e:
        raise MgrowError(f"{p}: cannot read ({e.strerror})") from None


def header(data: bytes, where: object) -> dict:
    """Return the JSON header of a safetensors file, or raise MgrowError."""
    if len(data) < 8:
        raise MgrowError(f"{where}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise MgrowError(f"{where}: not a safetensors file, or truncated (header of {n} "
                         f"bytes, file of {len(data)})")
    if n > MAX_HEADER_BYTES:
        raise MgrowError(f"{where}: not a safetensors file (header of {n:,} bytes exceeds "
                         f"the limit of {MAX_HEADER_BYTES:,})")
    head = load_json(data[8:8 + n], where, "safetensors header", MAX_HEADER_BYTES,
                     "not a safetensors file (header is not JSON)")
    if not isinstance(head, dict):
        raise MgrowError(f"{where}: not a safetensors file (header is not a JSON object)")
    return head


def load_tensors(data: bytes, where: object) -> dict[str, torch.Tensor]:
    """Return the tensors of safetensors bytes, or raise MgrowError."""
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error type for every malformation
        raise MgrowError(f"{where}: corrupt or truncated safetensors file "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def parse_manifest(text: str, where: object) -> Manifest:
    """Return the validated manifest, or raise MgrowError naming the first problem."""
    raw = load_json(text, where, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(raw, dict):
        raise MgrowError(f"{where}: invalid manifest: not a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise MgrowError(f"{where}: manifest format version {version!r}; this mgrow reads "
                         f"version {FORMAT_VERSION} (upgrade mgrow or re-export the bundle)")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "manifest"
        raise MgrowError(f"{where}: invalid manifest: {loc}: {err['msg']}") from None


def load(path: str | os.PathLike) -> Bundle:
    """Return the bundle at `path`, fully validated (manifest and tensors)."""
    data = read_bytes(path)
    meta = header(data, path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise MgrowError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    if META_KEY not in meta:
        raise MgrowError(f"{path}: a safetensors file without an mgrow manifest (a plain "
                         f"checkpoint? use `mgrow convert` first)")
    if not isinstance(meta[META_KEY], str):
        raise MgrowError(f"{path}: invalid manifest: not a JSON text in the header")
    manifest = parse_manifest(meta[META_KEY], path)
    tensors = conform(load_tensors(data, path), path)
    bundle = Bundle(manifest, tensors, Path(path), hashlib.sha256(data).hexdigest())
    check_tensors(skeleton(manifest, path), tensors, path)
    return bundle


def skeleton(manifest: Manifest, where: object) -> nn.Module:
    """Return the network `manifest` describes, on the meta device (no memory), or raise
    MgrowError naming `where` when its widths do not split into its tile grid."""
    from .arch import build
    try:
        return build(manifest.arch, manifest.mixing, meta=True)
    except ValueError as e:
        raise MgrowError(f"{where}: invalid manifest: {e}") from None


def to_bytes(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> bytes:
    """Return the safetensors bytes of a bundle whose manifest `load` will accept: checked
    again here, as model_copy(update=...) does not validate what it sets."""
    text = manifest.to_json()
    parse_manifest(text, "the bundle to write")
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(flat, metadata={META_KEY: text})


def save(path: str | os.PathLike, manifest: Manifest, tensors: dict[str, torch.Tensor],
         force: bool = False) -> Path:
    """Write a bundle atomically and return its path."""
    return write_atomic(path, to_bytes(manifest, tensors), force)


def save_model(path: str | os.PathLike, manifest: Manifest, model: nn.Module,
               force: bool = False) -> Path:
    """Write a model's state as a bundle atomically and return its path."""
    model = getattr(model, "module", model)  # unwrap DDP
    return save(path, manifest, model.state_dict(), force)


def check_writable(path: str | os.PathLike, force: bool, reserve: int = SIDE_SUFFIX) -> Path:
    """Return `path` if a new file may be written there, else raise MgrowError.

    `reserve`: bytes its name must leave below NAME_MAX for the files named after it (an
    output: checkpoint, metrics and their temporary files; a side file: its temporary)."""
    p = Path(path)
    if p.is_dir():
        raise MgrowError(f"{p}: is a directory")
    if p.exists() and not p.is_file():  # a device or FIFO: the rename would replace it
        raise MgrowError(f"{p}: not a regular file")
    if p.exists() and not force:
        raise MgrowError(f"{p}: already exists (pass --force to overwrite)")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise MgrowError(f"{folder}: no such folder for the output")
    check_name_length(p, reserve)
    check_unlocked(p)  # refuse a second writer before any work, not after it
    try:  # os.access is True for root even where no file can be made (/proc, /sys)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise MgrowError(f"{folder}: folder is not writable ({e.strerror or e})") from None
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HELD: dict[str, int] = {}  # lock files this process holds -> their descriptors


def lock_file(path: str | os.PathLike) -> Path:
    """Return the lock file of an output: `.<name>.lock` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive writer lock of `path` (flock on its lock file) while the block runs.

    Re-entrant within a process; another process holding it is refused at once with
    MgrowError. The lock file is removed on release, and a lock taken on a file that was
    removed meanwhile is taken again on the new one, so two writers never both hold it.
    """
    lock = lock_file(path)
    key = os.path.abspath(lock)
    if key in _HELD:
        yield
        return
    while True:
        try:  # never through a link: it would truncate whatever file the link names
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            why = "a symbolic link, not mgrow's lock" if e.errno == errno.ELOOP else e.strerror
            raise MgrowError(f"{lock}: cannot create the writer lock ({why})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device put in its place
            os.close(fd)
            raise MgrowError(f"{lock}: cannot create the writer lock (not a regular file)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = _busy(path, fd)
            os.close(fd)
            raise busy from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by its last holder after we opened it: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it (see the loop above)
        os.close(fd)


def _busy(path: str | os.PathLike, fd: int) -> MgrowError:
    """Return the error for an output whose lock (open as `fd`) another process holds."""
    holder = os.read(fd, 32).decode(errors="replace").strip()
    return MgrowError(f"{path}: another mgrow process{f' (pid {holder})' if holder else ''} "
                      "is writing it; wait for it to finish or choose another output")


def check_unlocked(path: str | os.PathLike) -> None:
    """Raise MgrowError if another process holds the writer lock of `path` (a probe: takes
    nothing and creates nothing)."""
    if holds_lock(path) or int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 writes
        return
    try:
        fd = os.open(lock_file(path), os.O_RDONLY)
    except OSError:  # no lock file: nobody is writing
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _busy(path, fd) from None
    finally:
        os.close(fd)  # also releases the probe's lock


def holds_lock(path: str | os.PathLike) -> bool:
    """Return whether this process holds the writer lock of `path`."""
    return os.path.abspath(lock_file(path)) in _HELD


def _remove_stale_temps(p: Path) -> None:
    """Remove the temporary files that killed writers of `p` left (see write_atomic).

    Called with `p`'s writer lock held: every live writer of `p` holds that lock while its
    temporary file exists, so the temporary files found now are all dead writers'."""
    if not holds_lock(p):
        return
    stale = re.compile(re.escape(f".{p.name}.") + r"[a-z0-9_]{8}" + re.escape(".tmp"))
    with contextlib.suppress(OSError):  # best effort: the write itself has succeeded
        for q in p.parent.iterdir():
            if stale.fullmatch(q.name):
                q.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write `data` to `path` via a temporary file and a rename; never leaves a partial file.

    A writer killed outright (SIGKILL, power loss) leaves its temporary file
    `.<name>.<8 random chars>.tmp` behind; the next successful write of the same path
    removes such leftovers. The write holds `path`'s writer lock (see writer_lock): a
    second process writing the same path at the same moment is refused.
    """
    p = check_writable(path, force, TEMP_SUFFIX)
    with writer_lock(p):
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, p)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise MgrowError(f"{p}: write failed ({e.strerror or e}); nothing was written"
                             ) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _remove_stale_temps(p)
    return p


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in chunks (a large parent is not held whole)."""
    h = hashlib.sha256()
    for chunk in read_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def export_plain(path: str | os.PathLike, output: str | os.PathLike, force: bool = False) -> Path:
    """Write a bundle's plain network (generated weights, no templates) as a plain bundle.

    The file is an ordinary safetensors state_dict (torchvision key names where the
    architecture has them) whose metadata also makes it a plain mgrow bundle.
    """
    from .mixing import plain_state_dict
    check_writable(output, force)
    with writer_lock(output):
        bundle = load(path)
        man = bundle.manifest
        tensors = plain_state_dict(bundle.model()) if man.mixing else bundle.tensors
        plain = man.derived("export", {}, (bundle.parent(),), mixing=None)
        return save(output, plain, tensors, force)
