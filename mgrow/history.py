"""A bundle's lineage walked on disk: each parent found by its recorded sha256 (at its
recorded path, or beside the child), hashed once and its manifest read (the header only: a
parent's tensors are never loaded), its own lineage followed in turn (what `mgrow info`
shows).

Owns `walk`. Imports mgrow.bundle, errors, files and manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .bundle import is_bundle, read_manifest
from .errors import MgrowError
from .files import is_file, sha256_file
from .manifest import Lineage


def walk(lineage: Lineage, folder: Path) -> dict:
    """Return `lineage` as a dict whose parents carry their own lineage where found (see
    mgrow.api.info)."""
    return _Walk().lineage(lineage, folder, depth=0)


MAX_DEPTH = 32  # lineage levels followed on disk


class _Walk:
    """One `info` call's walk down a lineage: each file hashed and each (file, sha256)'s
    manifest read once, however often parents name it; a parent that cannot be read is
    marked, not fatal."""

    def __init__(self) -> None:
        self.hashes: dict[str, str | MgrowError] = {}  # real path -> sha256 or why not
        self.seen: dict[tuple[str, str], dict] = {}  # (real path, sha256) -> first entry

    def lineage(self, lin: Lineage, folder: Path, depth: int) -> dict:
        """Return a lineage as a dict whose parents carry their own lineage when found."""
        return {"operation": lin.operation, "options": lin.options,
                "parents": [self.parent(p.path, p.sha256, folder, depth) for p in lin.parents],
                "history": [{k: v for k, v in h.items() if k != "history"}
                            for h in lin.history]}

    def sha256(self, p: Path) -> str | MgrowError:
        """Return the file's sha256, or the error reading it gave (each file read once)."""
        if (key := os.path.realpath(p)) not in self.hashes:
            try:
                self.hashes[key] = sha256_file(p)
            except MgrowError as e:
                self.hashes[key] = e
        return self.hashes[key]

    def parent(self, recorded: str, sha256: str, folder: Path, depth: int) -> dict:
        """Return a parent: its recorded path and hash, where it was found and its lineage."""
        entry: dict[str, Any] = {"path": recorded, "sha256": sha256}
        found = [p for p in (Path(recorded), folder / Path(recorded).name) if is_file(p)]
        match, failed = None, None
        for p in found:  # hashed in turn: the first that matches is the parent
            if (h := self.sha256(p)) == sha256:
                match = p
                break
            failed = failed or (h if isinstance(h, MgrowError) else None)
        if match is None and failed is not None:
            return entry | {"status": "unreadable", "reason": _line(failed)}
        if match is None:
            return entry | {"status": "changed" if found else "missing"}
        entry |= {"status": "found", "found_at": str(match)}
        key = (os.path.realpath(match), sha256)
        if key in self.seen:  # shown in full above: a reference, not a second walk
            first = self.seen[key]
            return entry | {k: first[k] for k in ("status", "reason", "description")
                            if k in first} | {"seen_above": True}
        if depth + 1 >= MAX_DEPTH:
            return entry
        self.seen[key] = entry
        try:  # the manifest alone: these bytes are the recorded parent's (its sha256), whose
            manifest = read_manifest(match)  # tensors were checked when the child was made
        except (MgrowError, OSError) as e:  # another version, or not a bundle
            if is_bundle(match):
                entry.update(status="unreadable", reason=_line(e))
            else:  # the very file recorded (its sha256 matched): the checkpoint `convert` read
                entry["description"] = "a source checkpoint, not an mgrow bundle"
            return entry
        entry["description"] = manifest.describe()
        entry["lineage"] = self.lineage(manifest.lineage, match.parent, depth + 1)
        return entry


def _line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__  # a message on one line
