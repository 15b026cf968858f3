"""Deadlines are the server's: an attempt that outlives its timeout fails, whatever its worker does.

An assignment carries its timeout as a duration; the worker measures it from receipt and should
report ERROR_KIND_TIMEOUT itself. The replica that sent the assignment measures it too, on its
own monotonic clock from when it sent it, plus a grace (``--deadline-grace``) for the worker's
report to arrive. Past that, :meth:`floxide_server.store.claims.Claims.time_out` ends the claim
as a failed attempt of kind TIMEOUT (the node's retry policy decides what follows), a ``Cancel``
is pushed to the worker, and a result sent later is refused. A worker in any language, even one
that ignores timeouts, is held to it.

The slot stays taken until the worker reports the claim (a sync node that ignores its cancel
holds it until its thread returns), so its credit is never overrun. Only the sending replica can
measure: a claim lives on its session's lease, which that replica alone renews; if the replica
dies, the lease ends and the claim is released as WORKER_LOST.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
import typing
from collections.abc import Callable
from datetime import timedelta

from floxide_grpc._durations import format_seconds
from floxide_grpc._proto.floxide.v1 import worker_service_pb2
from floxide_server.store.claims import Claims, ClaimToken
from floxide_server.store.kv import KVUnavailable
from floxide_server.tasks import Ready

__all__ = ["Deadlines"]

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0
"""Seconds before a deadline whose Txn etcd did not answer is tried again."""


class Holder(typing.Protocol):
    """What a deadline needs of the session that holds its claim."""

    lease: int
    namespace: str
    held: set[str]
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse | None]


@dataclasses.dataclass(order=True)
class _Deadline:
    due: float
    token: str = dataclasses.field(compare=False)
    timeout_ms: int = dataclasses.field(compare=False)
    holder: Holder = dataclasses.field(compare=False)


class Deadlines:
    """The deadlines of the claims this replica sent, measured on its monotonic clock.

    Args:
        claims: Ends a claim as a TIMEOUT attempt.
        grace: Added to each timeout before the server acts.
        monotonic: The clock measured on (seconds).
    """

    def __init__(
        self,
        claims: Claims,
        grace: timedelta,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claims = claims
        self.grace = grace.total_seconds()
        self.monotonic = monotonic
        self._heap: list[_Deadline] = []
        self._timing: dict[str, _Deadline] = {}
        self._changed = asyncio.Event()

    def start(self, holder: Holder, token: str, timeout_ms: int) -> None:
        """The claim was sent to the holder's worker now: its deadline runs from here."""
        if timeout_ms:
            self._time(_Deadline(self._after(timeout_ms / 1000), token, timeout_ms, holder))

    def _after(self, seconds: float) -> float:
        return self.monotonic() + seconds + self.grace

    def _time(self, deadline: _Deadline) -> None:
        self._timing[deadline.token] = deadline
        heapq.heappush(self._heap, deadline)
        self._changed.set()

    def stop(self, token: str) -> None:
        """The claim's result arrived (or its session ended): no deadline any more."""
        if (
            self._timing.pop(token, None) is not None
            and len(self._heap) > 2 * len(self._timing) + 64
        ):
            # Stopped deadlines stay in the heap until due: rebuilt, it holds the live ones only.
            self._heap = list(self._timing.values())
            heapq.heapify(self._heap)

    async def run(self, ready: Ready[None]) -> None:
        """Time out claims past their deadline, until cancelled."""
        ready.set_result(None)
        while True:
            self._changed.clear()
            now = self.monotonic()
            while self._heap and self._heap[0].due <= now:
                deadline = heapq.heappop(self._heap)
                if self._timing.get(deadline.token) is deadline:
                    await self._expire(deadline)
            wait = self._heap[0].due - self.monotonic() if self._heap else None
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def _expire(self, deadline: _Deadline) -> None:
        holder, token = deadline.holder, deadline.token
        if token not in holder.held:  # answered, or the session ended
            self._timing.pop(token, None)
            return
        parsed = ClaimToken.parse(token)
        try:
            ended = await self.claims.time_out(
                holder.namespace, parsed, deadline.timeout_ms, int(self.grace * 1000)
            )
        except Exception as exc:  # etcd's condition, or a bug: this deadline, not the server
            log.log(
                logging.WARNING if isinstance(exc, KVUnavailable) else logging.ERROR,
                "deadline of %s not enforced yet (%r); again in %gs",
                token,
                exc,
                RETRY_AFTER,
            )
            again = _Deadline(self.monotonic() + RETRY_AFTER, token, deadline.timeout_ms, holder)
            if self._timing.get(token) is deadline:  # not answered meanwhile
                self._time(again)
            return
        self._timing.pop(token, None)
        if not ended:
            return
        log.info("claim %s passed its deadline: attempt timed out, worker told to cancel", token)
        cancel = worker_service_pb2.Cancel(
            claim_token=token,
            run_id=parsed.run_id,
            item_id=parsed.item_id,
            reason=worker_service_pb2.CANCEL_REASON_TIMEOUT,
            message=f"past its timeout of {format_seconds(deadline.timeout_ms / 1000)}",
        )
        holder.outbox.put_nowait(worker_service_pb2.ConnectResponse(cancels=[cancel]))
