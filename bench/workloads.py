"""The workloads' workflows (shared/bench/WORKLOADS.md), served by the benchmark's workers."""

from __future__ import annotations

import asyncio

from floxide_grpc import NextAll, Workflow, node

STEPS = 10
FANOUT = 100


def _chain(name: str, step: object) -> Workflow:
    flow = Workflow(name, start=step)
    previous = flow.add(step)
    for n in range(2, STEPS + 1):
        current = flow.add(step, name=f"step{n}")
        flow.edge(previous, current)
        previous = current
    return flow


@node(name="step")
def add1(x: int) -> int:
    return x + 1


@node(name="step")
async def add1_sleep(x: int) -> int:
    await asyncio.sleep(0.010)  # simulated I/O
    return x + 1


@node
def split(n: int) -> NextAll[int]:
    return NextAll([n + i for i in range(FANOUT)])


@node
def double(x: int) -> int:
    return x * 2


@node(join=True)
def join_sum(values: list[int]) -> int:
    return sum(values)


@node
def terminal(total: int) -> int:
    return total


chain10 = _chain("chain10", add1)
sleep10 = _chain("sleep10", add1_sleep)
fan100 = (
    Workflow("fan100", start=split)
    .edge(split, double)
    .edge(double, join_sum)
    .edge(join_sum, terminal)
)
