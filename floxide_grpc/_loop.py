"""The event loop the server and worker processes run on: uvloop where it is installed.

gRPC's asyncio layer schedules a callback or more per message, so the loop's own cost is a
share of every step; uvloop trims it (bench/run.py: about 5-10 % more steps/s in W1, less
worker CPU). Without uvloop (Windows, or not installed) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a new event loop, like :func:`asyncio.run`."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
