"""The server's deadlines, alone: what one failure or many answered claims do to them.

``Claims.time_out`` is stood in for here: the test needs it to fail in a way a real etcd will
not on demand (a bug's exception), and to count its calls. The end-to-end behaviour is in
tests/e2e/test_deadlines.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from floxide_server.deadlines import Deadlines
from floxide_server.store.claims import ClaimToken
from floxide_server.tasks import started

from floxide_grpc._proto.floxide.v1 import worker_service_pb2
from tests.helpers import eventually


@dataclasses.dataclass
class Holder:
    lease: int = 1
    namespace: str = "ns"
    held: set[str] = dataclasses.field(default_factory=set)
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse | None] = dataclasses.field(
        default_factory=asyncio.Queue
    )


class FailingOnce:
    """``time_out`` raises a bug's exception once, then ends the claim."""

    def __init__(self) -> None:
        self.calls = 0

    async def time_out(self, namespace: str, token: ClaimToken, *_: Any) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return True


def token(n: int) -> str:
    return str(ClaimToken(1, f"{n:016x}", 1, "run", f"item{n}"))


async def test_a_failing_deadline_is_tried_again_and_the_others_go_on() -> None:
    claims = FailingOnce()
    deadlines = Deadlines(claims, timedelta(0))  # type: ignore[arg-type]
    holder = Holder(held={token(1)})
    async with asyncio.TaskGroup() as tasks:
        _, running = await started(tasks, deadlines.run)
        deadlines.start(holder, token(1), 50)
        response = await asyncio.wait_for(holder.outbox.get(), 10)  # after the retry
        assert response is not None
        [cancel] = response.cancels
        assert cancel.claim_token == token(1)
        assert cancel.reason == worker_service_pb2.CANCEL_REASON_TIMEOUT
        assert cancel.message == "past its timeout of 0.05s"
        assert claims.calls == 2 and not running.done()  # the loop lives on
        running.cancel()


async def test_answered_claims_do_not_pile_up_until_their_deadlines() -> None:
    deadlines = Deadlines(FailingOnce(), timedelta(seconds=2))  # type: ignore[arg-type]
    holder = Holder()
    for n in range(1000):  # an hour each: answered long before
        deadlines.start(holder, token(n), 3_600_000)
        deadlines.stop(token(n))
    assert len(deadlines._heap) <= 64


async def test_a_claim_answered_before_its_deadline_is_not_timed_out() -> None:
    claims = FailingOnce()
    deadlines = Deadlines(claims, timedelta(0))  # type: ignore[arg-type]
    holder = Holder(held={token(1), token(2)})
    async with asyncio.TaskGroup() as tasks:
        _, running = await started(tasks, deadlines.run)
        deadlines.start(holder, token(1), 20)
        deadlines.start(holder, token(2), 20)
        deadlines.stop(token(1))  # its result came
        holder.held.discard(token(1))
        await eventually(lambda: _called(claims), within=10)
        running.cancel()
    assert claims.calls == 1  # token 2's, which failed: token 1's was never tried


async def _called(claims: FailingOnce) -> bool:
    return claims.calls > 0
