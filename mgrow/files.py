"""Files on disk: reads that fail in one line, atomic writes, and the writer lock.

Writing is atomic (temporary file in the target folder, fsync, rename), so an interrupted
or failed write never leaves a partial file; an output is written under its writer lock
(flock on `.<name>.lock` beside it), so two processes never write one path at once.

Owns `read_bytes`, `read_buffer`, `read_chunks`, `is_file`, `sha256_file`,
`check_writable`, `writer_lock`, `write_atomic`. Imports mgrow.errors and mgrow.limits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import MgrowError
from .limits import SIDE_SUFFIX, TEMP_SUFFIX, check_memory, check_name_length


def read_bytes(path: str | os.PathLike) -> bytes:
    """Return a file's bytes, or raise MgrowError naming why it cannot be read (or, before
    reading, that it would not fit the memory left)."""
    check_memory(_file(path).stat().st_size, f"reading {path}")
    return b"".join(read_chunks(path, -1))


def read_buffer(path: str | os.PathLike) -> bytearray:
    """Return a file's bytes in one writable buffer, read in place (the file's size in memory,
    once: tensors can view it without a copy), or raise MgrowError naming why it cannot be
    read."""
    p = _file(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_memory(size, f"reading {p}")
            buf = bytearray(size)
            if f.readinto(buf) != len(buf) or f.read(1):
                raise MgrowError(f"{p}: changed size while being read")
    except OSError as e:
        raise MgrowError(f"{p}: cannot read ({e.strerror})") from None
    return buf


def _file(path: str | os.PathLike) -> Path:
    """Return `path` if it names a file that exists, else raise MgrowError saying what not."""
    p = Path(path)
    if not p.exists():
        raise MgrowError(f"{p}: no such file")
    if p.is_dir():
        raise MgrowError(f"{p}: is a directory, not a file")
    if not p.is_file():  # read whole, a FIFO would block forever and /dev/zero never end
        raise MgrowError(f"{p}: not a regular file (a FIFO, socket or device)")
    return p


def is_file(p: Path) -> bool:
    """Return whether `p` is a regular file; a name this system cannot look up (too long,
    say) is as missing as one that is not there."""
    try:
        return p.is_file()
    except OSError:
        return False


def read_chunks(path: str | os.PathLike, size: int = 1 << 20) -> Iterator[bytes]:
    """Yield a file's bytes `size` at a time (-1: all at once), or raise MgrowError naming
    why it cannot be read."""
    p = _file(path)
    try:
        with open(p, "rb") as f:
            while chunk := f.read(size):
                yield chunk
                if size < 0:
                    return
    except OSError as e:
        raise MgrowError(f"{p}: cannot read ({e.strerror})") from None


def check_writable(path: str | os.PathLike, force: bool, reserve: int = SIDE_SUFFIX, *,
                   inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Return `path` if a new file may be written there, else raise MgrowError.

    `reserve`: bytes its name must leave below NAME_MAX for the files named after it (an
    output: checkpoint, metrics and their temporary files; a side file: its temporary).
    `inputs`: the files the command reads; the output may be none of them, by any name
    (a symlink, a hard link), --force or not: the input would be gone."""
    p = Path(path)
    if p.is_dir():
        raise MgrowError(f"{p}: is a directory")
    if p.exists() and not p.is_file():  # a device or FIFO: the rename would replace it
        raise MgrowError(f"{p}: not a regular file")
    for i in inputs:
        if i is not None and p.exists() and is_file(Path(i)) and os.path.samefile(p, i):
            raise MgrowError(f"{p}: is this command's input {i} too; write the output "
                             "elsewhere")
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


WRITTEN: list[Path] = []  # the files this process has written whole (what an interruption
# that comes after them leaves: the command line names them)


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


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None],
                 force: bool = False) -> Path:
    """Write `data` to `path` via a temporary file and a rename; never leaves a partial file.
    `data`: the bytes, or a function writing them to the open file (a large output is then
    never held whole).

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
                if callable(data):
                    data(f)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, p)
            WRITTEN.append(p)
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
