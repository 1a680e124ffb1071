"""The one exception mgrow raises for a user's problem; the bottom of the import graph.

Owns `MgrowError`. Imports nothing of mgrow: every other module may import it.
"""


class MgrowError(Exception):
    """A problem with the user's input or environment, reported in one line without traceback."""
