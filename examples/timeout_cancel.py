"""A node timeout and a run cancellation.

``slow_lookup`` takes longer than its 50 ms timeout: the attempt fails as TIMEOUT and the
fallback edge answers from a cache instead. Then a run whose node waits forever is cancelled from
outside: the node sees its cancellation on its context, and the run raises RunCancelled.

    python examples/timeout_cancel.py
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from floxide_grpc import LocalRunner, NodeContext, RunCancelled, Workflow, node


@node(timeout=timedelta(milliseconds=50))
async def slow_lookup(key: str) -> str:
    """A lookup that never answers in time."""
    await asyncio.sleep(10)
    return f"{key}: fresh"


@node
def from_cache(key: str) -> str:
    """The fallback: an older value."""
    return f"{key}: cached"


lookup = Workflow("timeout", start=slow_lookup)
lookup.on_failure(slow_lookup, from_cache)

started = asyncio.Event()
saw_cancel: list[bool] = []


@node
async def wait_forever(ctx: NodeContext, _: str) -> str:
    """Wait until cancelled."""
    started.set()
    try:
        await asyncio.Event().wait()
    finally:
        saw_cancel.append(ctx.cancelled)
    return "unreachable"


waiting = Workflow("cancellable", start=wait_forever)


async def main() -> None:
    runner = LocalRunner(lookup)
    print(await runner.run("user:1"))
    print(f"errors: {[(e.node, e.message) for e in runner.errors]}")

    canceller = LocalRunner(waiting)
    run = asyncio.create_task(canceller.run("job"))
    await started.wait()
    canceller.cancel()
    try:
        await run
    except RunCancelled as exc:
        print(f"cancelled: {exc.__class__.__name__}, the node saw it: {saw_cancel == [True]}")


if __name__ == "__main__":
    asyncio.run(main())
