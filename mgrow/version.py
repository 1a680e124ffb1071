"""mgrow's version string, in a module of its own so the CLI reads it without the package root.

Owns `__version__`. Imports nothing.
"""

__version__ = "0.1.0"
