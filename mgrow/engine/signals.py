"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop in one line.

The first signal sets a flag the loop reads after each step; a second stops at once
(keeping the last checkpoint); both end in `Interrupted`, whose exit status is the shell's
128 + the signal's number (130 for Ctrl-C).

Owns `Interrupted` and `stop_on_signals`. Imports mgrow.errors.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import MgrowError


class Interrupted(MgrowError):
    """Training stopped by SIGINT or SIGTERM, after saving a checkpoint; `exit_code` is the
    shell's 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        super().__init__(message)
        signum = getattr(signal, signal_name or "", signal.SIGINT)
        self.exit_code = 128 + int(signum)


@dataclass
class _Stop:
    signal: str | None = None  # name of the first signal received
    at_once: str | None = None  # name of a second signal: stopping without a checkpoint


@contextlib.contextmanager
def stop_on_signals(checkpoint: Path | None = None) -> Iterator[_Stop]:
    """Yield a flag that SIGINT/SIGTERM set (main thread only); old handlers come back on exit.

    A second signal stops at once (KeyboardInterrupt wherever the loop is; an interrupted
    checkpoint write leaves the previous checkpoint) and becomes `Interrupted`, naming the
    checkpoint to resume from; further signals are ignored while stopping.
    """
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.at_once:
            return
        if stop.signal is not None:
            stop.at_once = signal.Signals(signum).name
            raise KeyboardInterrupt  # a second signal: stop at once
        stop.signal = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except KeyboardInterrupt:
        if not stop.at_once:
            raise
        kept = (f"the last checkpoint {checkpoint} is intact; run again with --resume to "
                f"continue from it" if checkpoint is not None and Path(checkpoint).exists()
                else "no checkpoint had been saved yet")
        raise Interrupted(f"stopped at once by a second signal ({stop.at_once}): {kept}",
                          stop.signal) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
