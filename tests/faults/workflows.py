"""The workflow the fault tests' worker processes serve.

Every execution appends ``node attempt pid`` to the file named by ``FLOXIDE_FAULT_LOG`` (a side
channel the test owns). The middle node announces itself in ``FLOXIDE_FAULT_GATE/started-*``
and then waits for the file ``FLOXIDE_FAULT_GATE/release``, so a test can fault a worker while
it holds the item.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from floxide_grpc import Merge, NextAll, NodeContext, Workflow, node


@dataclass
class Steps:
    done: Annotated[int, Merge.ADD] = 0


def _log(ctx: NodeContext) -> None:
    with Path(os.environ["FLOXIDE_FAULT_LOG"]).open("a") as log:
        log.write(f"{ctx.node} {ctx.attempt} {os.getpid()}\n")


@node
def prepare(ctx: NodeContext, x: int) -> int:
    _log(ctx)
    ctx.add("done", 1)
    return x + 1


@node
async def hold(ctx: NodeContext, x: int) -> int:
    _log(ctx)
    gate = Path(os.environ["FLOXIDE_FAULT_GATE"])
    (gate / f"started-{ctx.attempt}-{os.getpid()}").write_text("")
    for _ in range(1200):  # the workload waits for the test's signal, at most a minute
        if (gate / "release").exists():
            break
        await asyncio.sleep(0.05)
    ctx.add("done", 1)
    return x * 10


@node
def finish(ctx: NodeContext, x: int) -> int:
    _log(ctx)
    ctx.add("done", 1)
    return x + 5


workflow = (
    Workflow("fault_chain", start=prepare, context=Steps).edge(prepare, hold).edge(hold, finish)
)


@node
def spread(ctx: NodeContext, n: int) -> NextAll[int]:
    _log(ctx)
    return NextAll(list(range(n)))


@node
async def work(ctx: NodeContext, x: int) -> int:
    _log(ctx)
    ctx.add("done", 1)
    await asyncio.sleep(0.02)
    return x * 2


@node(join=True)
def collect(ctx: NodeContext, values: list[int]) -> dict[str, int]:
    _log(ctx)
    return {"count": len(values), "sum": sum(values)}


fan_in = (
    Workflow("fault_fan_in", start=spread, context=Steps).edge(spread, work).edge(work, collect)
)
