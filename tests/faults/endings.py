"""The workflows the run-ending tests' worker processes serve (tests/faults/test_run_endings.py,
tests/faults/test_child_runs.py).

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
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from floxide_grpc import (
    Backoff,
    Hold,
    Merge,
    NextAll,
    NodeContext,
    RetryPolicy,
    Workflow,
    node,
    subworkflow,
)

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


# Nested workflows (tests/faults/test_child_runs.py). The inner workflow fans out to two steps,
# each held at the gate of the spec's tag when it says "hold", and joins them. Its first branch
# fails as the spec's mode says: "once" (the first time only, for the whole test: a file in the
# gate remembers), "always", or never ("ok").


@dataclass
class Trail:
    seen: Annotated[list[str], Merge.APPEND] = field(default_factory=list)


@node
async def fork_in(ctx: NodeContext, spec: dict[str, Any]) -> NextAll[dict[str, Any]]:
    if spec.get("hold_first"):
        await held(ctx, spec["tag"])
    ctx.append("seen", f"child-of-{spec['tag']}")
    return NextAll([{**spec, "index": i} for i in range(2)])


@node
async def inner_step(ctx: NodeContext, spec: dict[str, Any]) -> int:
    if spec.get("hold"):
        await held(ctx, spec["tag"], spec["index"])
    _log(f"ran {spec['tag']} {ctx.node} {spec['index']} {ctx.run_id} {ctx.attempt}")
    failed_once = Path(os.environ["FLOXIDE_FAULT_GATE"]) / f"failed-{spec['tag']}"
    if spec["index"] == 0 and (
        spec["mode"] == "always" or (spec["mode"] == "once" and not failed_once.exists())
    ):
        failed_once.write_text("")
        raise RuntimeError(f"inner step of {spec['tag']} fails ({spec['mode']})")
    return int(spec.get("value", 1)) + int(spec["index"])


@node(join=True)
def join_in(ctx: NodeContext, values: list[int]) -> int:
    _log(f"inner-context {ctx.run_id} {','.join(ctx.state.seen)}")
    return sum(values)


inner_pair = (
    Workflow("inner_pair", start=fork_in, context=Trail)
    .edge(fork_in, inner_step)
    .edge(inner_step, join_in)
)


@node
def begin(ctx: NodeContext, spec: dict[str, Any]) -> dict[str, Any]:
    ctx.append("seen", f"parent-{spec['tag']}")
    return spec


@node
def after(total: int) -> int:
    return total


@node
def rescue(spec: dict[str, Any]) -> int:
    return -1


pair = subworkflow(inner_pair, name="pair").with_settings(
    retry=RetryPolicy(
        max_attempts=2,
        initial_backoff=timedelta(milliseconds=200),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
nested_outer = (
    Workflow("nested_outer", start=begin, context=Trail)
    .edge(begin, pair)
    .edge(pair, after)
    .on_failure(pair, rescue)
)


@node
def spread_specs(spec: dict[str, Any]) -> NextAll[dict[str, Any]]:
    return NextAll([{**spec, "value": 10 * i} for i in range(spec["n"])])


@node(join=True)
def total_of(values: list[int]) -> int:
    return sum(values)


each = subworkflow(inner_pair, name="each")
nested_wide = (
    Workflow("nested_wide", start=spread_specs, context=Trail)
    .edge(spread_specs, each)
    .edge(each, total_of)
)
