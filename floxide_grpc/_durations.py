"""Durations in messages, as configured.

``0.05s`` or ``1209600s``: never ``1.2096e+06s``, nor the ``0.0484138s`` that a clock measured.
"""

from __future__ import annotations

__all__ = ["format_seconds"]


def format_seconds(seconds: float) -> str:
    """A duration as it was configured, to the microsecond: ``0.05s``, ``2s``, ``1209600s``."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
