"""The elected replica fires the durable timers (:mod:`floxide_server.store.timers`).

It keeps each namespace's *timer clock*: milliseconds of leadership, advanced on the leader's
monotonic clock and written to ``timer-clock`` every :data:`CHECKPOINT_EVERY` seconds, together
with the reading at which the leader first saw each timer that does not say yet (``seen_at``).
A timer fires once the clock has run its delay past its ``seen_at``. A new leader resumes the
clock from what was written, which is behind the old leader's by at most a checkpoint: a timer is
late by at most that plus the election (and any time no replica led), never early, and no
process reads another's clock. (etcd leases are no timers: whole seconds, and every etcd leader
election renews them all.) A timer or a clock that does not parse is logged and skipped: one bad
key must not stop every leader in turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.election import NotLeading
from floxide_server.store import timers
from floxide_server.store.keys import Keys
from floxide_server.store.kv import (
    KV,
    Compare,
    Event,
    KeyValue,
    KVUnavailable,
    Put,
    Request,
    Txn,
)
from floxide_server.store.lineage import Lineage
from floxide_server.store.timers import Outcome
from floxide_server.watch import RESYNC, Subscription, Watches

__all__ = ["CHECKPOINT_EVERY", "Firer"]

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 2.0
"""Seconds between writes of the timer clock: how late a failover may make a timer."""
PAGE = 512
"""Timers read per range when a leader loads them."""
RACED_AGAIN_MS = 50
"""How soon a timer whose Txn lost a race with another write is tried again."""
WAITING_AGAIN_MS = 2000
"""How often a retry waiting for its paused run is looked at again."""
STORE_PAUSE = 1.0
"""Seconds before the firer tries etcd again after it did not answer."""


@dataclasses.dataclass(eq=False)
class _Pending(timers.Timer):
    """A timer as the leader follows it."""

    seen_at: int  # the clock's reading when first seen (by this leader, or as written)
    written: bool  # seen_at is in etcd
    not_before: int = 0  # the clock's reading before which it is not looked at again

    @property
    def due(self) -> int:
        """When it is looked at next, on the clock."""
        return max(self.seen_at + self.record.delay_ms, self.not_before)


class Firer:
    """The elected replica's timers of one namespace (see the module's docstring).

    Args:
        kv: The store.
        namespace: The namespace.
        guard: The compare that holds while this replica leads (its writes of the clock and of
            ``seen_at`` are guarded by it); ``None`` without an election: the clock is then
            neither read nor written, and each timer is measured from when this replica saw it.
        max_txn_ops: etcd's ``--max-txn-ops``.
        monotonic: The clock measured on (seconds).
        lineage: Starts a nested workflow's next child run, and fails a timed-out child's
            parent item (without it, only ordinary items are retried).
    """

    def __init__(
        self,
        kv: KV,
        namespace: str,
        guard: Callable[[], Compare] | None,
        max_txn_ops: int,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        lineage: Lineage | None = None,
    ) -> None:
        self.kv = kv
        self.lineage = lineage
        self.keys = Keys(namespace)
        self.guard = guard
        self.max_txn_ops = max_txn_ops
        self.monotonic = monotonic
        self.pending: dict[bytes, _Pending] = {}
        self._due: list[tuple[int, int, _Pending]] = []  # a heap; entries may be stale
        self._pushed = 0
        self._base = 1
        self._since = monotonic()

    def now(self) -> int:
        """The timer clock's reading, in milliseconds."""
        return self._base + int((self.monotonic() - self._since) * 1000)

    async def run(self, watches: Watches) -> None:
        """Fire due timers while leading, until cancelled.

        etcd not answering pauses it, keeping what it measured: only a new leader starts over.
        """
        updates = await watches.open(self.keys.timer())
        try:
            while True:
                try:
                    await self.resume()
                    break
                except KVUnavailable as exc:
                    log.warning("timers of %r wait for etcd: %s", self.keys.namespace, exc)
                    await asyncio.sleep(STORE_PAUSE)
            checkpoint = self.monotonic()
            while True:
                try:
                    await self.fire_due()
                    if self.monotonic() - checkpoint >= CHECKPOINT_EVERY:
                        await self.checkpoint()
                        checkpoint = self.monotonic()
                    events = await self._wait(updates, checkpoint)
                    for event in events:
                        await self._follow(event)
                except KVUnavailable as exc:
                    log.warning("timers of %r paused: %s", self.keys.namespace, exc)
                    await asyncio.sleep(STORE_PAUSE)
        finally:
            updates.close()

    async def _wait(self, updates: Subscription, checkpoint: float) -> list[Event | None]:
        """Wait for the next due timer, the next checkpoint or the next events."""
        wait = CHECKPOINT_EVERY - (self.monotonic() - checkpoint)
        if (first := self._first()) is not None:
            wait = min(wait, (first.due - self.now()) / 1000)
        events: list[Event | None] = []
        try:
            async with asyncio.timeout(max(wait, 0)):
                events.append(await updates.next())
        except TimeoutError:
            pass
        while not updates.queue.empty():  # what else arrived with it
            events.append(updates.queue.get_nowait())
        return events

    async def _follow(self, event: Event | None) -> None:
        if event is RESYNC:
            await self.load()
        elif event.deleted:
            self.pending.pop(event.kv.key, None)
        else:
            self._add(event.kv, self.pending)

    async def resume(self) -> None:
        """Take the clock up where the last leader wrote it, and read every timer."""
        if self.guard is not None:
            clock = await self.kv.get(self.keys.timer_clock)
            # It starts at 1: a seen_at of 0 says "not seen yet".
            base = 1
            if clock is not None:
                try:
                    base = max(int(clock.value), 1)
                except ValueError:  # only later for it: what was seen is measured again
                    log.error("timer clock of %r is not a number: %r", self.keys.namespace, clock)
            self._base, self._since = base, self.monotonic()
        await self.load()

    async def load(self) -> None:
        """Read every timer (those already followed keep their ``seen_at``)."""
        pending: dict[bytes, _Pending] = {}
        start = None
        while True:
            found, _ = await self.kv.range(self.keys.timer(), start=start, limit=PAGE)
            for kv in found:
                if (known := self.pending.get(kv.key)) is not None:
                    pending[kv.key] = known
                self._add(kv, pending)
            if len(found) < PAGE:
                break
            start = found[-1].key + b"\0"
        self.pending = pending
        self._due = []
        for timer in pending.values():
            self._push(timer)

    def _add(self, kv: KeyValue, pending: dict[bytes, _Pending]) -> None:
        """Follow a timer put: a new one is seen now, unless a leader wrote when it saw it."""
        try:
            record = TimerRecord.FromString(kv.value)
        except DecodeError:
            log.error("timer %r does not parse: skipped (%d bytes)", kv.key, len(kv.value))
            return
        known = pending.get(kv.key)
        if known is not None and known.created == kv.create_revision:
            known.record = record
            known.written = known.written or bool(record.seen_at)
            return
        written = bool(record.seen_at) and self.guard is not None
        seen_at = record.seen_at if written else self.now()
        timer = _Pending(kv.key, kv.create_revision, record, seen_at, written)
        pending[kv.key] = timer
        self._push(timer)

    def _push(self, timer: _Pending) -> None:
        self._pushed += 1
        heapq.heappush(self._due, (timer.due, self._pushed, timer))

    def _first(self) -> _Pending | None:
        """The timer looked at next, without the heap's stale entries."""
        while self._due:
            due, _, timer = self._due[0]
            if self.pending.get(timer.key) is timer and due == timer.due:
                return timer
            heapq.heappop(self._due)
        return None

    async def fire_due(self) -> int:
        """Fire every timer whose delay has run, earliest first; returns how many fired."""
        fired = 0
        while (timer := self._first()) is not None and timer.due <= self.now():
            heapq.heappop(self._due)
            try:
                if timer.record.HasField("item"):
                    outcome = await timers.fire_retry(self.kv, self.keys, timer, self.lineage)
                else:
                    outcome = await timers.time_out(
                        self.kv, self.keys, timer, self.max_txn_ops, self.lineage
                    )
            except BaseException:
                self._push(timer)  # not fired (etcd did not answer, say): due still
                raise
            if outcome is Outcome.WAITS or outcome is Outcome.RACED:
                # Its run is paused; or its run or item moved as it fired: read them again.
                later = WAITING_AGAIN_MS if outcome is Outcome.WAITS else RACED_AGAIN_MS
                timer.not_before = self.now() + later
                self._push(timer)
                continue
            fired += outcome is Outcome.FIRED
            if self.pending.get(timer.key) is timer:
                del self.pending[timer.key]  # its delete is on its way through the watch
        return fired

    async def checkpoint(self) -> None:
        """Write the clock, with ``seen_at`` of each timer not written yet (leader only).

        Nothing is written while no timer is pending: the clock need only be ahead of every
        ``seen_at`` written, and those are written with it.
        """
        if self.guard is None or not self.pending:
            return
        try:
            guard = self.guard()
        except NotLeading:
            return  # deposed: the election cancels this firer as soon as it hears
        keys = self.keys
        unwritten = [p for p in self.pending.values() if not p.written]
        per_txn = max(self.max_txn_ops - 2, 1)
        for first in range(0, max(len(unwritten), 1), per_txn):
            batch = unwritten[first : first + per_txn]
            stamps: list[Request] = []
            for timer in batch:
                record = TimerRecord()
                record.CopyFrom(timer.record)
                record.seen_at = timer.seen_at
                stamps.append(
                    Txn(
                        [Compare.created_at(timer.key, timer.created)],
                        [Put(timer.key, record.SerializeToString())],
                    )
                )
            clock = Put(keys.timer_clock, str(self.now()).encode())
            result = await self.kv.txn(Txn([guard], [clock, *stamps]))
            if not result.succeeded:
                return  # deposed, likewise
            for timer in batch:
                timer.written = True
