"""The Typer application every command registers on, with its root options.

Owns `app` and `PIPELINE` (the order `mgrow --help` lists commands in). Imports
mgrow.version only.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from ..version import __version__

# `mgrow --help` lists the commands in the order a user runs them
PIPELINE = ("convert", "train", "train-sibling", "fuse", "deepen", "finetune", "eval", "flops",
            "info", "cka", "export")


class _Pipeline(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        """Return the command names in pipeline order (any other command last)."""
        rank = {name: i for i, name in enumerate(PIPELINE)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(cls=_Pipeline, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Grow a trained network into a wider (MixtureGrowth) or deeper one. "
                       "Every file mgrow reads or writes is a safetensors bundle with a manifest.")


def _version(value: bool) -> None:
    if value:
        print(f"mgrow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show Python tracebacks instead of one-line errors.")] = False,
        version: Annotated[Optional[bool], typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version.")] = None):
    pass
