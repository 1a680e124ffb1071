"""The process around the command line: one-line errors and exit codes, signals outside
training, closed or broken standard streams.

Owns `main` (the `mgrow` entry point). Imports cli.app (the commands are registered by
the package) and mgrow.errors.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys

import typer
from pydantic import ValidationError

from ..errors import MgrowError
from .app import app


def main() -> None:
    """Run the CLI; user errors print one line on stderr and exit 2 (with --debug: raise).

    Anything unforeseen also ends in one line (exit 1) naming the command and the
    exception, pointing to --debug for the traceback. A stdout closed at start is a write
    error (one line, exit 1, as GNU tools) for a command that prints its product there (see
    _closed_stdout); one closed by its reader (broken pipe) ends in one line and exit 141,
    as SIGPIPE would.
    """
    _reopen_closed_fds()
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 prints
        with contextlib.suppress(AttributeError, ValueError):  # escaped, not as a crash
            stream.reconfigure(errors="backslashreplace")
    # Ctrl-C or SIGTERM outside a training loop (which saves a checkpoint on them): one
    # line, locks released, temporary files removed; not a silent kill
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)
    try:
        code = _closed_stdout(_run())
        _ignore_signals()  # the command's work and its message are done: its status stands
        _flush_stdout()
    except BrokenPipeError:
        code = _broken_pipe()
    sys.exit(code)


def _run() -> int:
    """Return the exit status of the command line, after printing any error in one line."""
    try:
        code = app(standalone_mode=False, prog_name="mgrow")
        if _SIGNALS:  # typer returns KeyboardInterrupt as a silent exit status 130
            return _interrupted()
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except BrokenPipeError:
        raise
    except typer.TyperException as e:  # usage errors: one line naming the command's --help
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `mgrow`: the help, not an error
            print(e.format_message())
            return 0
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _error(f"{' '.join(e.format_message().split())}{hint}", e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a training loop
        return _interrupted()
    except MgrowError as e:
        if "--debug" in sys.argv:
            raise
        if type(e).__name__ == "Interrupted":  # engine.Interrupted: stopped by a signal
            _ignore_signals()
        return _error(str(e), getattr(e, "exit_code", 2))
    except OSError as e:
        if "--debug" in sys.argv:
            raise
        return _error(str(e), 2)
    except ValidationError as e:  # a value the schema refuses that no earlier check caught
        if "--debug" in sys.argv:
            raise
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or e.title
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's
        return _error(f"invalid {loc}: {msg} (got {err.get('input')!r:.60})", 2)
    except Exception as e:  # the last resort: one line, never a traceback
        if "--debug" in sys.argv:
            raise
        command = _command() or "mgrow"
        what = " ".join(str(e).split())[:200]
        return _error(f"{command} failed unexpectedly: {type(e).__name__}"
                      f"{': ' + what if what else ''} (run again with --debug for the "
                      "traceback)", 1)


_SIGNALS: list[int] = []  # the signals that interrupted a command outside training


def _on_signal(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM outside a training loop: unwind from wherever the program is."""
    _SIGNALS.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    """Return the exit status of Ctrl-C or SIGTERM outside training, after one line."""
    _ignore_signals()
    from ..files import WRITTEN
    done = f"after writing {', '.join(map(str, dict.fromkeys(WRITTEN)))} (complete)" \
        if WRITTEN else "nothing was written"
    if _SIGNALS and _SIGNALS[0] == signal.SIGTERM:
        return _error(f"terminated by SIGTERM; {done}", 143)
    return _error(f"interrupted; {done}", 130)


def _error(message: str, code: int) -> int:
    """Print `mgrow: error: MESSAGE` on stderr and return `code`."""
    print(f"mgrow: error: {message}", file=sys.stderr)
    return code


def _reopen_closed_fds() -> None:
    """Put /dev/null on a closed stdin, stdout or stderr, so that no file mgrow opens takes
    their descriptor (and C libraries writing to fd 1 or 2 write nowhere); a closed stdout
    becomes a _ClosedStdout, which remembers whether anything was printed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free descriptor: this one
            if fd == 1:
                sys.stdout = _ClosedStdout(open(1, "wb", closefd=False), encoding="utf-8")
    if sys.stderr is None:  # else print(file=sys.stderr) would write to stdout
        sys.stderr = open(2, "w", closefd=False)


class _ClosedStdout(io.TextIOWrapper):
    """stdout when it was closed at start: writes go nowhere, `wrote` says there were some."""

    wrote = False

    def write(self, s: str) -> int:
        self.wrote = self.wrote or bool(s)
        return super().write(s)


# Commands whose product is the file they write: what they print on stdout (`wrote X`,
# --json's metrics) reports on it, and a closed stdout loses only that report.
WRITERS = ("convert", "train", "train-sibling", "fuse", "finetune", "export")


def _closed_stdout(code: int) -> int:
    """Return the exit status once a command ran: 1, after one line, when it printed its
    product (eval, flops, info, cka, any --help or --version: every command but the
    WRITERS) on a stdout closed at start, as GNU tools end in `write error`; else `code`."""
    if code != 0 or not isinstance(sys.stdout, _ClosedStdout) or not sys.stdout.wrote:
        return code
    if _command() in WRITERS and "--help" not in sys.argv[1:]:
        return code
    return _error("write error: stdout is closed", 1)


def _command() -> str | None:
    """Return the command named on the command line (its first word that is no option)."""
    return next((a for a in sys.argv[1:] if not a.startswith("-")), None)


def _flush_stdout() -> None:
    """Flush stdout now, so a broken pipe is reported here rather than at interpreter exit."""
    if sys.stdout is not None:
        sys.stdout.flush()


def _broken_pipe() -> int:
    """Return 141 after one line, once the reader of stdout went away (see main)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush finds no pipe
    return _error("stdout was closed by its reader (broken pipe)", 141)


def _ignore_signals() -> None:
    """Ignore further Ctrl-C/SIGTERM while exiting after an interruption: a user pressing
    Ctrl-C again would otherwise get tracebacks from interpreter shutdown after the one-line
    message."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
