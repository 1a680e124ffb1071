"""Channel counts at a width multiplier, the one rule every family scales by.

Owns `channels`. Imports nothing of mgrow.
"""


def channels(base: int, width: float) -> int:
    """Return a channel count scaled by `width` (at least 1)."""
    return max(1, int(round(base * width)))
