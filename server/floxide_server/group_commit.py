"""Group commit: transactions submitted while one is in flight go to the store together.

Under load, every completion, claim and start is its own small Txn, and each costs a round trip
and the store's fixed cost per request far more than its few writes. :class:`GroupCommit` keeps
at most one batch in flight; the transactions that arrive meanwhile wait, and the next batch
takes as many of them as fit (the store then applies them as sub-transactions of one request,
each with its own compares, so one that fails its guards fails alone). Alone, a transaction
goes at once: group commit adds no latency when there is nothing to group.

Two transactions go in one batch only if neither writes a key the other compares, reads or
writes (:class:`Footprint`), and none overtakes one it conflicts with. A batch is then the same
as its transactions one after another in the order they were submitted, and etcd's rule against
a key written twice in one request always holds.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from floxide_server.store.kv import Delete, Put, Txn, TxnResult
from floxide_server.tasks import Background

__all__ = ["Footprint", "GroupCommit"]

log = logging.getLogger(__name__)

Commit = Callable[[Sequence[Txn]], Awaitable[Sequence[TxnResult | BaseException]]]


@dataclasses.dataclass(slots=True)
class Footprint:
    """The keys a transaction writes, and every key it touches (compares, reads or writes).

    Prefix operations are kept as prefixes, and every key and prefix adds its ancestors (its
    prefixes ending in ``/``), so that overlaps are set lookups: a prefix covers a key or a
    deeper prefix exactly when it is one of its ancestors. A prefix not ending in ``/`` makes
    the footprint conflict with any other.
    """

    writes: set[bytes] = dataclasses.field(default_factory=set)
    touches: set[bytes] = dataclasses.field(default_factory=set)
    write_prefixes: set[bytes] = dataclasses.field(default_factory=set)
    touch_prefixes: set[bytes] = dataclasses.field(default_factory=set)
    write_ancestors: set[bytes] = dataclasses.field(default_factory=set)
    touch_ancestors: set[bytes] = dataclasses.field(default_factory=set)
    odd: bool = False
    size: int = 0

    @classmethod
    def of(cls, txn: Txn) -> Footprint:
        """The footprint of a transaction, both branches and nested ones included."""
        footprint = cls()
        footprint._add(txn)
        return footprint

    def _add(self, txn: Txn) -> None:
        for compare in txn.compares:
            if compare.range_end:  # a range compare touches every key it may cover
                self._touch(_covering(compare.key, compare.range_end), prefix=True, write=False)
            else:
                self._touch(compare.key, prefix=False, write=False)
            self.size += len(compare.key) + len(compare.range_end) + 16
        for request in (*txn.success, *txn.failure):
            if isinstance(request, Txn):
                self._add(request)
            elif isinstance(request, Put):
                self._touch(request.key, prefix=False, write=True)
                self.size += len(request.key) + len(request.value)
            else:
                self._touch(request.key, prefix=request.prefix, write=isinstance(request, Delete))
                self.size += len(request.key)

    def _touch(self, key: bytes, *, prefix: bool, write: bool) -> None:
        ancestors = _ancestors(key)
        if prefix:
            self.odd |= not key.endswith(b"/")
            self.touch_prefixes.add(key)
            self.touch_ancestors.add(key)
        else:
            self.touches.add(key)
        self.touch_ancestors.update(ancestors)
        if write:
            (self.write_prefixes if prefix else self.writes).add(key)
            self.write_ancestors.update(ancestors)
            if prefix:
                self.write_ancestors.add(key)

    def conflicts(self, other: Footprint) -> bool:
        """Whether either writes what the other touches."""
        return self.odd or other.odd or _writes_into(self, other) or _writes_into(other, self)

    def merge(self, other: Footprint) -> None:
        """Add another footprint's keys (a batch's footprint is the union of its members')."""
        self.writes |= other.writes
        self.touches |= other.touches
        self.write_prefixes |= other.write_prefixes
        self.touch_prefixes |= other.touch_prefixes
        self.write_ancestors |= other.write_ancestors
        self.touch_ancestors |= other.touch_ancestors
        self.odd |= other.odd
        self.size += other.size


def _covering(start: bytes, end: bytes) -> bytes:
    """The longest prefix ending in ``/`` under which every key of ``[start, end)`` lies."""
    length = next((n for n, (a, b) in enumerate(zip(start, end, strict=False)) if a != b), None)
    common = start[: min(len(start), len(end)) if length is None else length]
    return common[: common.rfind(b"/") + 1]


def _ancestors(key: bytes) -> list[bytes]:
    """The key's prefixes that end in ``/``."""
    found = []
    at = key.find(b"/")
    while at != -1:
        found.append(key[: at + 1])
        at = key.find(b"/", at + 1)
    return found


def _writes_into(writer: Footprint, reader: Footprint) -> bool:
    return (
        not writer.writes.isdisjoint(reader.touches)
        or not reader.touch_prefixes.isdisjoint(writer.write_ancestors)
        or not writer.write_prefixes.isdisjoint(reader.touch_ancestors)
    )


@dataclasses.dataclass(eq=False, slots=True)
class _Waiting:
    txn: Txn
    footprint: Footprint
    future: asyncio.Future[TxnResult]


class GroupCommit:
    """Batches concurrent transactions, one batch in flight at a time.

    Args:
        commit: Applies a batch; returns each member's result or exception, in order.
        max_members: The most transactions in one batch (etcd: ``--max-txn-ops``).
        max_bytes: The most bytes of keys and values in one batch (etcd's request limit is
            1.5 MiB by default); a bigger transaction goes alone.
    """

    def __init__(self, commit: Commit, *, max_members: int = 64, max_bytes: int = 1 << 20) -> None:
        self._commit = commit
        self.max_members = max_members
        self.max_bytes = max_bytes
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._background = Background("group commit")
        self._flushing = False
        self.batches = 0  # requests sent (a test counts them)

    async def submit(self, txn: Txn) -> TxnResult:
        """Apply a transaction, alone or with others; its result is its own."""
        waiting = _Waiting(txn, Footprint.of(txn), asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if not self._flushing:  # one flusher at most: it runs while transactions wait
            try:
                self._background.spawn(self._run())
            except RuntimeError:  # closed: this one is never sent
                self._waiting.remove(waiting)
                raise
            self._flushing = True
        return await waiting.future

    async def _run(self) -> None:
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch = self._take()
                if not batch:
                    continue
                self.batches += 1
                outcomes = await self._commit([w.txn for w in batch])
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    if waiting.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        waiting.future.set_exception(outcome)
                    else:
                        waiting.future.set_result(outcome)
                batch = []
        except BaseException as exc:
            for waiting in [*batch, *self._waiting]:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            self._waiting.clear()
            if not isinstance(exc, Exception):
                raise
            log.exception("group commit failed")
        finally:
            self._flushing = False

    def _take(self) -> list[_Waiting]:
        """The next batch: the oldest waiting transaction, and those after it that fit.

        One that is left out also keeps out every later one that conflicts with it, so a
        batch commutes with whatever it overtakes: the outcome is that of submission order.
        """
        batch: list[_Waiting] = []
        footprint = Footprint()
        skipped = Footprint()
        left: list[_Waiting] = []
        while self._waiting and len(batch) < self.max_members:
            waiting = self._waiting.popleft()
            if waiting.future.done():  # its caller gave up before it was sent
                continue
            fits = not batch or (
                footprint.size + waiting.footprint.size <= self.max_bytes
                and not footprint.conflicts(waiting.footprint)
                and not (left and skipped.conflicts(waiting.footprint))
            )
            if fits:
                batch.append(waiting)
                footprint.merge(waiting.footprint)
            else:
                left.append(waiting)
                skipped.merge(waiting.footprint)
        self._waiting.extendleft(reversed(left))
        return batch

    async def close(self) -> None:
        """Stop; transactions still waiting fail with ``CancelledError``."""
        try:
            await self._background.close()
        finally:
            for waiting in self._waiting:
                waiting.future.cancel()
            self._waiting.clear()
