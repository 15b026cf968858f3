"""Leader election among replicas, through etcd: etcd's own recipe (``concurrency.Election``).

Each candidate holds a lease and puts ``/floxide/v1/election/{name}/{lease}`` on it, its identity
as the value (:func:`floxide_server.store.keys.election`). The candidate whose key has the lowest
create revision leads; each other one watches the deletion of the key just before its own (no
polling), then looks again. A candidate whose lease ends (it died, or could not reach etcd for a
TTL) loses its key, and the next one leads.

**Never a leader past its lease.** A lease ends on etcd's clock, not ours, and a replica cut off
from etcd does not hear that it did. So a candidate counts its lease as good only until a TTL
(minus a margin) after it *sent* its last successful keep-alive, on its monotonic clock: by then
etcd may have ended it. When that time passes without a renewal, or the lease or the key is gone,
it stops leading at once (:attr:`Election.leading` turns false, duties run by
:meth:`Election.lead` are cancelled) and campaigns again with a new lease. Still, a replica may
act a moment after it stopped leading (a write in flight): duties guard their writes with
:meth:`Election.guard`, a compare that holds only while this candidate's key stands.

:meth:`Election.run` campaigns until cancelled, in a task group of its own, and resigns on the
way out (it revokes its lease, so that the next candidate leads at once). etcd not answering
while campaigning is logged and retried after a pause; any other failure ends ``run()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import grpc

from floxide_server.store.keys import election
from floxide_server.store.kv import KV, Compacted, Compare, KeyValue, KVUnavailable, Put, Txn
from floxide_server.tasks import Ready, first_error

__all__ = ["MAINTENANCE", "Election", "NotLeading"]

log = logging.getLogger(__name__)

MAINTENANCE = "maintenance"
"""The server's election: its leader runs the stuck-run reconciler and fires the timers."""

_ETCD_DOWN = (KVUnavailable, grpc.aio.AioRpcError)
"""etcd's condition, not a fault of ours: paused and retried."""


class NotLeading(Exception):
    """Raised by :meth:`Election.guard` when this candidate does not lead."""


class _TermOver(Exception):
    """A candidacy ended: its lease ended, may have ended, or its key was deleted."""


class Election:
    """One candidate in the election ``name``, known to the others as ``identity``.

    Args:
        kv: The store (etcd).
        name: The election: candidates of one name elect one leader.
        identity: This candidate's name for logs and :meth:`leader` (the server id).
        ttl: The lease's TTL (whole seconds, at least 1): a dead leader is followed within it.
        margin: How long before its lease could end a candidate stops leading; a quarter of
            the TTL by default.
    """

    def __init__(
        self,
        kv: KV,
        name: str,
        identity: str,
        ttl: timedelta,
        *,
        margin: timedelta | None = None,
    ) -> None:
        self.kv = kv
        self.name = name
        self.identity = identity
        self.ttl = max(int(ttl.total_seconds()), 1)
        self.margin = self.ttl / 4 if margin is None else margin.total_seconds()
        if not 0 <= self.margin < self.ttl:
            raise ValueError(f"the margin must be less than the TTL ({self.ttl} s)")
        self.prefix = election(name)
        self._lease = 0  # the current candidacy's lease; 0 between candidacies
        self._key: KeyValue | None = None  # this candidate's key, once it leads
        self._valid_until = 0.0  # monotonic: the lease may have ended from then on
        self._gained = asyncio.Event()  # set while leading
        self._lost = asyncio.Event()  # of the current (or last) leadership: set once it ended
        self._lost.set()

    # -- what the duties use -------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this candidate leads now (never once its lease may have ended)."""
        return self._gained.is_set() and time.monotonic() < self._valid_until

    async def wait_leading(self) -> None:
        """Return once this candidate leads."""
        while not self.leading:
            await self._gained.wait()
            if not self.leading:  # the lease's time is up: the step-down is due at once
                await self._lost.wait()

    async def lead(self, duty: Callable[[], Awaitable[None]]) -> None:
        """Run ``duty()`` while this candidate leads, until cancelled.

        The duty starts when leadership is gained and is cancelled (and awaited) when it is lost;
        it starts again when leadership is gained again. If the duty returns on its own, so does
        this; if it raises, this raises the same.
        """
        while True:
            await self.wait_leading()
            lost = self._lost
            try:
                async with asyncio.TaskGroup() as tasks:
                    running = tasks.create_task(_awaited(duty), name=f"{self.name} duty")
                    ended = tasks.create_task(lost.wait())
                    await asyncio.wait([running, ended], return_when=asyncio.FIRST_COMPLETED)
                    running.cancel()
                    ended.cancel()
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            if not running.cancelled():
                return

    def guard(self) -> Compare:
        """A compare that holds only while this candidate still leads, for a duty's writes.

        A leader's key stands until its lease ends; no key made later can be ahead of it.

        Raises:
            NotLeading: this candidate does not lead now.
        """
        key = self._key
        if key is None or not self.leading:
            raise NotLeading(f"{self.identity} does not lead {self.name!r}")
        return Compare.created_at(key.key, key.create_revision)

    async def leader(self) -> str | None:
        """The leader's identity as etcd has it now (the first candidate), or ``None``."""
        found, _ = await self.kv.range(self.prefix)
        if not found:
            return None
        return min(found, key=_order).value.decode()

    # -- campaigning ---------------------------------------------------------------------------

    async def run(self, ready: Ready[None]) -> None:
        """Campaign until cancelled (again after each lost lease); resign on the way out.

        Raises:
            Exception: a failure that is not etcd's (etcd not answering is retried).
        """
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._campaign(), name=f"election {self.name}")
            ready.set_result(None)

    async def resign(self) -> None:
        """Stop leading (or waiting to) now, and revoke the lease so that the next one leads.

        While :meth:`run` runs, this candidate then campaigns again with a new lease, behind
        the others.
        """
        lease, self._lease = self._lease, 0
        self._step_down("resigned")
        if lease:
            await self._revoke(lease)

    async def _campaign(self) -> None:
        pause = 0.1
        while True:
            try:
                await self._candidacy()
                pause = 0.1
            except _TermOver as exc:
                log.info("candidacy in %r ended (%s); campaigning again", self.name, exc)
            except _ETCD_DOWN as exc:
                log.warning("campaign in %r paused: etcd does not answer: %s", self.name, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.ttl)

    async def _candidacy(self) -> None:
        """One lease: put the key, wait for its turn, lead; until the lease ends.

        Raises:
            _TermOver: the lease ended, may have, or the key was deleted.
        """
        sent = time.monotonic()
        lease = await self.kv.grant(self.ttl)
        self._lease, self._valid_until = lease, sent + self.ttl - self.margin
        key = election(self.name, lease)
        try:
            try:
                await self.kv.txn(
                    Txn([Compare.missing(key)], [Put(key, self.identity.encode(), lease)])
                )
            except ValueError as exc:  # etcd's "requested lease not found": it ended already
                if "lease not found" not in str(exc):
                    raise
                raise self._over("the lease ended before its key was put") from exc
            # The two report the candidacy's end in ``over`` rather than fail the task group:
            # Python 3.11's TaskGroup can lose a cancellation of its task when a child fails.
            over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.TaskGroup() as tasks:
                    parts = [
                        tasks.create_task(_report(over, functools.partial(self._keep, lease))),
                        tasks.create_task(
                            _report(over, functools.partial(self._contend, lease, key))
                        ),
                    ]
                    await asyncio.wait([over])
                    for part in parts:
                        part.cancel()
            except BaseExceptionGroup as group:  # a failure that is not etcd's
                raise first_error(group) from None
            finally:
                if over.done():
                    over.exception()  # retrieved, even when this was cancelled meanwhile
            over.result()  # raises why the candidacy ended
        finally:
            if self._lease == lease:  # not resigned already
                self._lease = 0
                self._step_down("the candidacy stopped")
                await self._revoke(lease)  # so that a successor need not wait for the TTL

    async def _keep(self, lease: int) -> None:
        """Renew the lease every third of its TTL; raise once it ended or may have."""
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(min(interval, max(self._valid_until - time.monotonic(), 0)))
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self._valid_until - sent):
                    left = await self.kv.keep_alive(lease)
            except TimeoutError:
                raise self._over(
                    f"no keep-alive answered for {self.ttl - self.margin:g} s"
                ) from None
            except _ETCD_DOWN as exc:
                log.warning("election %r: keep-alive failed: %s", self.name, exc)
                continue
            if not left:
                raise self._over("the lease ended")
            self._valid_until = sent + self.ttl - self.margin

    async def _contend(self, lease: int, key: bytes) -> None:
        """Wait until no candidate is ahead, lead, and raise when the key is deleted."""
        while True:
            found, revision = await self.kv.range(self.prefix)
            found.sort(key=_order)
            mine = next((i for i, kv in enumerate(found) if kv.key == key), None)
            if mine is None:
                raise self._over("the candidate's key was deleted")
            if mine == 0:
                break
            await self._deleted(found[mine - 1].key, revision + 1)
        if self._lease != lease:  # resigned meanwhile
            raise self._over("resigned")
        self._key = found[0]
        self._lost = asyncio.Event()
        self._gained.set()
        log.info("leading %s as %s", self.name, self.identity)
        await self._deleted(key, revision + 1)
        raise self._over("the leader's key was deleted")

    async def _deleted(self, key: bytes, revision: int) -> None:
        """Return once ``key`` is deleted (at ``revision`` or later)."""
        while True:
            try:
                async for event in self.kv.watch(key, revision):
                    if event.deleted and event.kv.key == key:
                        return
            except Compacted:  # history lost: look at the key as it stands, and watch on
                found, now = await self.kv.range(key)
                if all(kv.key != key for kv in found):
                    return
                revision = now + 1
                continue
            raise KVUnavailable(f"the watch of {key!r} ended")

    def _over(self, why: str) -> _TermOver:
        """Stop leading at once (not once the candidacy's tasks are done): the term is over."""
        self._step_down(why)
        return _TermOver(why)

    def _step_down(self, why: str) -> None:
        self._key = None
        if self._gained.is_set():
            self._gained.clear()
            self._lost.set()
            log.info("no longer leading %s as %s: %s", self.name, self.identity, why)

    async def _revoke(self, lease: int) -> None:
        """Revoke a lease (within a second: if etcd does not answer, it ends with its TTL)."""
        try:
            async with asyncio.timeout(min(self.ttl, 1.0)):
                await self.kv.revoke(lease)
        except (*_ETCD_DOWN, TimeoutError) as exc:
            log.warning(
                "election %r: lease %x not revoked (%s); it ends with its TTL",
                self.name,
                lease,
                exc,
            )


def _order(kv: KeyValue) -> tuple[int, bytes]:
    """Candidates in line: by create revision, then by key (one group commit may write two)."""
    return kv.create_revision, kv.key


async def _awaited(duty: Callable[[], Awaitable[None]]) -> None:
    await duty()


async def _report(over: asyncio.Future[None], part: Callable[[], Awaitable[None]]) -> None:
    """Run a part of a candidacy; its end (or etcd not answering) is reported in ``over``."""
    try:
        await part()
    except (_TermOver, *_ETCD_DOWN) as exc:
        if not over.done():
            over.set_exception(exc)
