"""What a run shows and records each epoch: the progress bar or lines, and the metrics files.

After every epoch one JSON line goes to the metrics file, and the same records as CSV
beside it (`OUT.summary.csv`, one row per epoch, timm's convention). Both are created with
the first epoch's record: a fresh run removes a previous run's (so one that fails before
its first epoch ends leaves neither), a resumed one drops the lines of epochs after its
checkpoint, then appends.
Progress: "bar" (rich, on stderr; when stderr is not a terminal, one plain line per epoch
instead: epoch, loss, accuracy, lr, images/s, ETA), "json" (each epoch's metrics record as
a line on stdout), "quiet", or a callable given each epoch's record.

Owns `Reporter`, `write_metrics`, `remove_metrics`, `trim_metrics`, `summary_path`,
`epoch_line`. Imports mgrow.errors, mgrow.limits (JSON), mgrow.bundle (atomic writes) and
engine.config.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import MgrowError
from ..files import write_atomic
from ..limits import dump_json
from .config import Progress


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics lines of epochs after `step` (written before a crash, not in the
    checkpoint being resumed, and about to be recorded again)."""
    try:
        lines = Path(path).read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MgrowError(f"{path}: cannot read metrics ({e.strerror})") from None
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError, RecursionError):  # a torn or foreign line
            break
        keep.append(line)
    if not keep:  # no epoch before the checkpoint's: as a fresh run, no files yet
        remove_metrics(path)
        return
    if len(keep) < len(lines):
        write_atomic(path, "".join(keep).encode(), force=True)
    try:
        _write_summary(path)
    except OSError as e:
        raise MgrowError(f"{path}: cannot write metrics ({e.strerror})") from None


SUMMARY_FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_acc", "lr", "images_per_s",
                  "wall_s")


def summary_path(metrics_path: Path) -> Path:
    """Return the CSV summary beside a metrics file: `OUT.metrics.jsonl` -> `OUT.summary.csv`."""
    metrics_path = Path(metrics_path)
    return metrics_path.with_name(metrics_path.name.removesuffix(".jsonl")
                                  .removesuffix(".metrics") + ".summary.csv")


def write_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to the metrics file (creating it) and rewrite the CSV summary
    from it, so the summary always holds exactly the metrics file's epochs, resumes included."""
    try:
        with open(path, "a") as f:
            f.write(dump_json(record) + "\n")
        _write_summary(path)
    except OSError as e:
        raise MgrowError(f"{path}: cannot write metrics ({e.strerror})") from None


def remove_metrics(path: Path) -> None:
    """Remove a metrics file and its CSV summary, if there (a previous run's, before a fresh
    run writes its own with its first epoch's record)."""
    for target in (Path(path), summary_path(path)):
        try:
            target.unlink(missing_ok=True)
        except OSError as e:
            raise MgrowError(f"{target}: cannot remove stale metrics ({e.strerror})") from None


def _write_summary(metrics: Path) -> None:
    """Write the metrics records as CSV (a header, one row per epoch) beside them, whole."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    target = summary_path(metrics)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in SUMMARY_FIELDS}
                         for r in rows)
    os.replace(tmp, target)


def epoch_line(record: dict, epochs: float, eta_s: float) -> str:
    """Return the plain progress line of one epoch's record, for logs (no terminal)."""
    acc = "-" if record["test_acc"] is None else f"{100 * record['test_acc']:.2f}%"
    minutes, secs = divmod(max(round(eta_s), 0), 60)
    eta = f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
    return (f"epoch {record['epoch']:g}/{epochs:g}  loss {record['train_loss']:.4f}  "
            f"acc {acc}  lr {record['lr']:.4g}  {record['images_per_s']:.0f} img/s  ETA {eta}")


class Reporter:
    """Shows progress on rank 0: a rich bar (stderr; plain lines when stderr is not a
    terminal), JSON lines (stdout), a callback or nothing."""

    def __init__(self, progress: Progress, total: int, step: int) -> None:
        if not callable(progress) and progress not in ("bar", "quiet", "json"):
            raise MgrowError(f"unknown progress mode {progress!r} (bar, quiet or json)")
        if progress == "bar" and not sys.stderr.isatty():
            progress = "lines"  # logs of unattended runs: a live bar would be noise
        self.progress, self.total, self.step = progress, total, step
        self.t0 = time.perf_counter()
        self.bar: Any = None

    def __enter__(self) -> Reporter:
        if self.progress == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                TextColumn("acc {task.fields[acc]}"),
                                TextColumn("{task.fields[speed]} img/s"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.step,
                                          epoch="-", loss="-", acc="-", speed="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, step: int, epoch: int, loss: float, speed: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, epoch=epoch, loss=f"{loss:.3f}",
                            speed=f"{speed:.0f}")

    def epoch(self, record: dict) -> None:
        if callable(self.progress):
            self.progress(record)
        elif self.progress == "json":
            print(dump_json(record), flush=True)
        elif self.progress == "lines":  # ETA: this process's mean time per step so far
            done = record["step"] - self.step
            eta = (time.perf_counter() - self.t0) / done * (record["steps"] - record["step"])
            epochs = record["epoch"] * record["steps"] / record["step"]
            print(epoch_line(record, epochs, eta), file=sys.stderr, flush=True)
        elif self.bar is not None and record["test_acc"] is not None:
            self.bar.update(self.task, acc=f"{record['test_acc']:.1%}")
