"""mgrow: grow a trained network into a wider one by recombining its learned templates."""

__version__ = "0.1.0"


class MgrowError(Exception):
    """A problem with the user's input or environment, reported in one line without traceback."""
