"""The `mgrow` command line: one function a subcommand; parse, call the library, print.

Layers inside the package, bottom to top: app (the Typer app), options (shared option
types and converters), growing / training / inspecting (one module per group of commands,
registered on `app` when imported here), main (the entry point: errors, signals, streams).
The CLI is the top of mgrow's import graph below the package root: it may import anything
in mgrow, and nothing in mgrow imports it.
"""

from . import growing, inspecting, training  # noqa: F401  (each registers its commands)
from .app import PIPELINE, app
from .main import main

__all__ = ["PIPELINE", "app", "main"]
