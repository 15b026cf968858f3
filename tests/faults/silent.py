"""The workflows of the etcd-silence tests' worker processes (test_unknown_outcomes.py).

Every step adds 1 to the run's context field ``done``, applied exactly once with its step, so a
run's ``done`` counts its steps: a step applied twice, or lost, shows there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from floxide_grpc import Backoff, Merge, NextAll, NodeContext, RetryPolicy, Workflow, node


@dataclass
class Steps:
    done: Annotated[int, Merge.ADD] = 0


@node
async def first(ctx: NodeContext, x: int) -> int:
    ctx.add("done", 1)
    await asyncio.sleep(0.1)
    return x + 1


@node
async def second(ctx: NodeContext, x: int) -> int:
    ctx.add("done", 1)
    await asyncio.sleep(0.1)
    return x * 2


@node
def third(ctx: NodeContext, x: int) -> int:
    ctx.add("done", 1)
    return x + 3


chain = Workflow("silent_chain", start=first, context=Steps).edge(first, second).edge(second, third)


@node
def spread(ctx: NodeContext, n: int) -> NextAll[int]:
    ctx.add("done", 1)
    return NextAll(list(range(n)))


@node
async def branch(ctx: NodeContext, x: int) -> int:
    ctx.add("done", 1)
    await asyncio.sleep(0.02)
    return x


@node(join=True)
def gather(ctx: NodeContext, xs: list[int]) -> int:
    ctx.add("done", 1)
    return sum(xs)


fan = Workflow("silent_fan", start=spread, context=Steps).edge(spread, branch).edge(branch, gather)


@node(
    retry=RetryPolicy(
        max_attempts=3,
        initial_backoff=timedelta(milliseconds=300),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
def flaky(ctx: NodeContext, x: int) -> int:
    if ctx.attempt == 1:
        raise RuntimeError("down the first time")  # a retry timer fires for each run
    ctx.add("done", 1)
    return x


retried = Workflow("silent_retry", start=flaky, context=Steps)
