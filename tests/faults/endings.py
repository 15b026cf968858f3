"""The workflows the run-ending tests' worker processes serve (tests/faults/test_run_endings.py).

A held node announces itself as ``FLOXIDE_FAULT_GATE/started-{tag}-{node}-{index}-{pid}``, then
waits for ``FLOXIDE_FAULT_GATE/release-{tag}``: the file holds the wall-clock time at which every
node held by it goes on, so that nodes on several workers return in the same instant. A node
cancelled while it waits (its worker was told to stop it) appends ``cancelled {tag} {node}
{index}`` to the side channel ``FLOXIDE_FAULT_LOG``; one that goes on appends ``released ...``
and the time it did.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from floxide_grpc import Hold, NextAll, NodeContext, Workflow, node

WAIT = 60.0
"""The longest a held node waits for its release, whatever the test does."""


def _log(line: str) -> None:
    with Path(os.environ["FLOXIDE_FAULT_LOG"]).open("a") as log:
        log.write(f"{line}\n")


async def held(ctx: NodeContext, tag: str, index: int = 0) -> None:
    """Wait at the gate ``tag`` until its release time (or ``WAIT``)."""
    gate = Path(os.environ["FLOXIDE_FAULT_GATE"])
    (gate / f"started-{tag}-{ctx.node}-{index}-{os.getpid()}").write_text("")
    release = gate / f"release-{tag}"
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            if release.exists():  # written whole, then renamed into place
                await asyncio.sleep(max(float(release.read_text()) - time.time(), 0))
                break
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        _log(f"cancelled {tag} {ctx.node} {index}")
        raise
    _log(f"released {tag} {ctx.node} {index} {time.time()!r}")


# Two terminal branches of one run, each held.


@node
def fork(tag: str) -> str:
    return tag


@node
async def left(ctx: NodeContext, tag: str) -> str:
    await held(ctx, tag)
    return "left"


@node
async def right(ctx: NodeContext, tag: str) -> str:
    await held(ctx, tag)
    return "right"


two_ends = Workflow("two_ends", start=fork).edge(fork, left).edge(fork, right)


# A fan-out of held branches, joined.


@node
def spread(spec: dict[str, Any]) -> NextAll[dict[str, Any]]:
    return NextAll([{"tag": spec["tag"], "index": i} for i in range(spec["n"])])


@node
async def branch(ctx: NodeContext, x: dict[str, Any]) -> int:
    await held(ctx, x["tag"], x["index"])
    return int(x["index"])


@node(join=True)
def gather(values: list[int]) -> int:
    return sum(values)


held_fan_out = Workflow("held_fan_out", start=spread).edge(spread, branch).edge(branch, gather)


# A run that can never reach its terminal: its only branch ends with a Hold outside any join.


@node
def stall(x: int) -> Hold:
    return Hold()


@node
def never(x: int) -> int:
    return x


stalled = Workflow("stalled", start=stall).edge(stall, never)
