"""bench/chaos.py's workload: a chain, a fan-out and join, a failing attempt, a nested workflow.

The chain has 10 steps, the fan-out 20 branches; the nested workflow is a child run of two steps
between two steps of its parent. The node whose first attempt fails is retried. Every step adds
1 to the context field ``steps`` (so a run's context counts the steps whose effects were applied)
and appends ``node run item attempt pid`` to the file named by ``FLOXIDE_CHAOS_LOG`` (each line
one write in append mode: whole, whichever process wrote it), so the audit can tell executions
from commits.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from floxide_grpc import Merge, NextAll, NodeContext, RetryPolicy, Workflow, node, subworkflow

LOG = "FLOXIDE_CHAOS_LOG"
CHAIN = 10
FAN_OUT = 20


@dataclass
class Steps:
    steps: Annotated[int, Merge.ADD] = 0


def _step(ctx: NodeContext) -> None:
    line = f"{ctx.node} {ctx.run_id} {ctx.item_id} {ctx.attempt} {os.getpid()}\n"
    fd = os.open(os.environ[LOG], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    ctx.add("steps", 1)


@node(name="link")
async def link(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    await asyncio.sleep(0.005)  # a little I/O: a fault can land mid-step
    return x + 1


def _chain() -> Workflow:
    flow = Workflow("chaos_chain", start=link, context=Steps)
    previous = flow.add(link)
    for n in range(2, CHAIN + 1):
        current = flow.add(link, name=f"link{n}")
        flow.edge(previous, current)
        previous = current
    return flow


@node
def spread(ctx: NodeContext, x: int) -> NextAll[int]:
    _step(ctx)
    return NextAll([x + i for i in range(FAN_OUT)])


@node
async def branch(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    await asyncio.sleep(0.02)
    return x * 2


@node(join=True)
def gather(ctx: NodeContext, values: list[int]) -> int:
    _step(ctx)
    return sum(values)


@node(retry=RetryPolicy(max_attempts=3, initial_backoff=timedelta(milliseconds=200)))
def flaky(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails, by design")
    return x + 100


@node
def settle(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    return x + 1


@node
def enter(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    return x + 1


@node
async def inner_a(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    await asyncio.sleep(0.005)
    return x * 3


@node
def inner_b(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    return x + 7


@node
def leave(ctx: NodeContext, x: int) -> int:
    _step(ctx)
    return x - 1


chain = _chain()
fan = Workflow("chaos_fan", start=spread, context=Steps).edge(spread, branch).edge(branch, gather)
retried = Workflow("chaos_retried", start=flaky, context=Steps).edge(flaky, settle)
inner = Workflow("chaos_inner", start=inner_a, context=Steps).edge(inner_a, inner_b)
_inner = subworkflow(inner, name="inner")
nested = (
    Workflow("chaos_nested", start=enter, context=Steps).edge(enter, _inner).edge(_inner, leave)
)


def expected(workflow: str, x: int) -> tuple[int, int]:
    """A run's output on input ``x`` and its context's ``steps`` once every effect applied once.

    The flaky node's failed attempt adds nothing: a failed attempt's operations are dropped.
    """
    if workflow == "chaos_chain":
        return x + CHAIN, CHAIN
    if workflow == "chaos_fan":
        return sum(2 * (x + i) for i in range(FAN_OUT)), FAN_OUT + 2
    if workflow == "chaos_retried":
        return x + 101, 2
    if workflow == "chaos_nested":  # the child's two steps are its own effects
        return (x + 1) * 3 + 7 - 1, 2
    if workflow == "chaos_inner":  # a chaos_nested run's child, on the parent's x + 1
        return x * 3 + 7, 2
    raise ValueError(f"no workflow {workflow!r} here")
