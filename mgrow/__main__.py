"""`python -m mgrow`: the command line (mgrow.cli.main). Imports mgrow.cli only."""

from .cli import main

main()
