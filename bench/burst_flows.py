"""bench/burst.py's workflows: ``quick`` for the fast workers, ``held`` for the busy one.

A ``held`` attempt waits until the release file named by ``FLOXIDE_BENCH_RELEASE`` (in the
busy worker's environment) exists, then returns its input.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from floxide_grpc import Workflow, node

RELEASE = "FLOXIDE_BENCH_RELEASE"


@node
async def echo(x: int) -> int:
    return x


@node
async def hold(x: int) -> int:
    release = Path(os.environ[RELEASE])
    while not release.exists():
        await asyncio.sleep(0.05)
    return x


quick = Workflow("quick", start=echo)
held = Workflow("held", start=hold)
