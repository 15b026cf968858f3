"""The workflows the clock tests' worker processes serve (tests/faults/test_clocks.py).

``flaky`` fails its first attempt and is retried after a fixed 3 s (no jitter). Each attempt
appends ``start ATTEMPT T`` and ``end ATTEMPT T`` to the side channel ``FLOXIDE_FAULT_LOG``, T by
``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process on the machine, and
libfaketime leaves it alone (FAKETIME_DONT_FAKE_MONOTONIC=1), so the test can compare the times.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path

from floxide_grpc import Backoff, NodeContext, RetryPolicy, Workflow, node

BACKOFF = 3.0
"""The wait between ``flaky``'s attempts, in seconds."""


@node(timeout=timedelta(seconds=2))
async def quick(x: int) -> int:
    await asyncio.sleep(0.2)
    return x


quick_enough = Workflow("quick_enough", start=quick)


@node(timeout=timedelta(seconds=0.5))
async def slow(x: int) -> int:
    await asyncio.sleep(5)
    return x


too_slow = Workflow("too_slow", start=slow)


def _log(event: str, attempt: int) -> None:
    with Path(os.environ["FLOXIDE_FAULT_LOG"]).open("a") as log:
        log.write(f"{event} {attempt} {time.monotonic()!r}\n")


@node(
    retry=RetryPolicy(
        max_attempts=2,
        initial_backoff=timedelta(seconds=BACKOFF),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
def flaky(ctx: NodeContext, x: int) -> int:
    _log("start", ctx.attempt)
    try:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return x
    finally:
        _log("end", ctx.attempt)


retried = Workflow("retried", start=flaky)
