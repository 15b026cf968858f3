"""The elected replica fires the durable timers (:mod:`floxide_server.store.timers`).

It keeps each namespace's *timer clock*: milliseconds of leadership, advanced on the leader's
monotonic clock and written to ``timer-clock`` every :data:`CHECKPOINT_EVERY` seconds, together
with the reading at which the leader first saw each timer that does not say yet (``seen_at``).
A timer fires once the clock has run its delay past its ``seen_at``. A new leader resumes the
clock from what was written, which is behind the old leader's by at most a checkpoint: a timer is
late by at most that plus the election, never early, and no process reads another's clock.
(etcd leases are no timers: whole seconds, and every etcd leader election renews them all.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.election import NotLeading
from floxide_server.store import timers
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Event, KeyValue, Put, Request, Txn
from floxide_server.store.timers import Outcome
from floxide_server.watch import RESYNC, Watches

__all__ = ["CHECKPOINT_EVERY", "Firer"]

CHECKPOINT_EVERY = 2.0
"""Seconds between writes of the timer clock: how late a failover may make a timer."""
PAGE = 512
"""Timers read per range when a leader loads them."""
RACED_AGAIN_MS = 50
"""How soon a timer whose Txn lost a race with another write is tried again."""


@dataclasses.dataclass
class _Pending(timers.Timer):
    """A timer as the leader follows it."""

    seen_at: int  # the clock's reading when first seen (by this leader, or as written)
    written: bool  # seen_at is in etcd
    retry_from: int = 0  # the clock's reading before which a waiting timer is not looked at

    @property
    def due(self) -> int:
        return self.seen_at + self.record.delay_ms


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
    """

    def __init__(
        self,
        kv: KV,
        namespace: str,
        guard: Callable[[], Compare] | None,
        max_txn_ops: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.keys = Keys(namespace)
        self.guard = guard
        self.max_txn_ops = max_txn_ops
        self.monotonic = monotonic
        self.pending: dict[bytes, _Pending] = {}
        self._base = 1
        self._since = monotonic()

    def now(self) -> int:
        """The timer clock's reading, in milliseconds."""
        return self._base + int((self.monotonic() - self._since) * 1000)

    async def run(self, watches: Watches) -> None:
        """Fire due timers while leading, until cancelled."""
        keys = self.keys
        updates = await watches.open(keys.timer())
        try:
            await self.resume()
            checkpoint = self.monotonic()
            while True:
                await self.fire_due()
                if self.monotonic() - checkpoint >= CHECKPOINT_EVERY:
                    await self.checkpoint()
                    checkpoint = self.monotonic()
                wait = CHECKPOINT_EVERY - (self.monotonic() - checkpoint)
                now = self.now()
                due = min((max(p.due, p.retry_from) for p in self.pending.values()), default=None)
                if due is not None:
                    wait = min(wait, (due - now) / 1000)
                events: list[Event | None] = []
                try:
                    async with asyncio.timeout(max(wait, 0)):
                        events.append(await updates.next())
                except TimeoutError:
                    pass
                while not updates.queue.empty():  # what else arrived with it
                    events.append(updates.queue.get_nowait())
                for event in events:
                    if event is RESYNC:
                        await self.load()
                    elif event.deleted:
                        self.pending.pop(event.kv.key, None)
                    else:
                        self._add(event.kv, self.pending)
        finally:
            updates.close()

    async def resume(self) -> None:
        """Take the clock up where the last leader wrote it, and read every timer."""
        if self.guard is not None:
            clock = await self.kv.get(self.keys.timer_clock)
            # It starts at 1: a seen_at of 0 says "not seen yet".
            self._base, self._since = int(clock.value) if clock else 1, self.monotonic()
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

    def _add(self, kv: KeyValue, pending: dict[bytes, _Pending]) -> None:
        """Follow a timer put: a new one is seen now, unless a leader wrote when it saw it."""
        record = TimerRecord.FromString(kv.value)
        known = pending.get(kv.key)
        if known is not None and known.created == kv.create_revision:
            known.record = record
            known.written = known.written or bool(record.seen_at)
            return
        written = bool(record.seen_at) and self.guard is not None
        seen_at = record.seen_at if written else self.now()
        pending[kv.key] = _Pending(kv.key, kv.create_revision, record, seen_at, written)

    async def fire_due(self) -> int:
        """Fire every timer whose delay has run; returns how many fired."""
        now = self.now()
        due = sorted(
            (p for p in self.pending.values() if p.due <= now and p.retry_from <= now),
            key=lambda p: p.due,
        )
        fired = 0
        for timer in due:
            if timer.record.HasField("item"):
                outcome = await timers.fire_retry(self.kv, self.keys, timer)
            else:
                outcome = await timers.time_out(self.kv, self.keys, timer, self.max_txn_ops)
            if outcome is Outcome.WAITS:  # for its run (paused, or failed): look again later
                timer.retry_from = self.now() + int(CHECKPOINT_EVERY * 1000)
                continue
            if outcome is Outcome.RACED:  # its run or item moved as it fired: read them again
                timer.retry_from = self.now() + RACED_AGAIN_MS
                continue
            fired += outcome is Outcome.FIRED
            if self.pending.get(timer.key) is timer:
                del self.pending[timer.key]  # its delete is on its way through the watch
        return fired

    async def checkpoint(self) -> None:
        """Write the clock, with ``seen_at`` of each timer not written yet (leader only)."""
        if self.guard is None:
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
