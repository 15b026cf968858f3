"""Retries with exponential backoff on a flaky node.

``fetch`` fails its first three attempts; its policy allows five, waiting 10, 20, then 40 ms
(exponential, no jitter so the schedule is exact). Every failed attempt is recorded with its
number and kind.

    python examples/retry_backoff.py
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from floxide_grpc import Backoff, LocalRunner, NodeContext, RetryPolicy, Workflow, node

POLICY = RetryPolicy(
    max_attempts=5,
    initial_backoff=timedelta(milliseconds=10),
    max_backoff=timedelta(seconds=1),
    backoff=Backoff.EXPONENTIAL,
    jitter=False,
)


@node(retry=POLICY)
async def fetch(ctx: NodeContext, url: str) -> str:
    """Fetch a page from a server that is down for the first three tries."""
    if ctx.attempt <= 3:
        raise TimeoutError(f"{url} did not answer")
    return f"{url}: 200 OK on attempt {ctx.attempt}"


workflow = Workflow("retry_backoff", start=fetch)


async def main() -> None:
    waits = [POLICY.backoff_for(attempt) / timedelta(milliseconds=1) for attempt in (1, 2, 3)]
    print(f"backoff schedule (ms): {waits}")
    runner = LocalRunner(workflow)
    started = time.monotonic()
    print(await runner.run("https://example.test/data"))
    elapsed = time.monotonic() - started
    for error in runner.errors:
        print(f"attempt {error.attempt} failed: {error.message}")
    print(f"waited at least {sum(waits):.0f} ms: {elapsed * 1000 >= sum(waits)}")


if __name__ == "__main__":
    asyncio.run(main())
