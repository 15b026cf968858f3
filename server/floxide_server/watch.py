"""Shared watches: one etcd watch per prefix per replica, whatever the number of subscribers.

``WaitForCompletion``, dispatch and the store services' watch streams subscribe here instead of
opening a watch each: a thousand clients waiting on runs of one namespace cost one watch of its
``runinfo/`` prefix. A watch starts with its first subscriber and stops with its last; its task
lives in the task group of :meth:`Watches.run`.
"""

from __future__ import annotations

import asyncio
import logging

from floxide_server.store.kv import KV, Compacted, Event, KVUnavailable
from floxide_server.tasks import Ready

__all__ = ["RESYNC", "Subscription", "Watches"]

log = logging.getLogger(__name__)

RESYNC = None
"""Delivered instead of an event when the watch lost history (compaction, or a pause while the
store did not answer): re-read the state."""


class Subscription:
    """Events under one prefix, from the moment :meth:`Watches.open` returned."""

    def __init__(self, watches: Watches, prefix: bytes, key: bytes | None = None) -> None:
        self.watches = watches
        self.prefix = prefix
        self.key = key
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed = False

    async def next(self) -> Event | None:
        """The next event, or :data:`RESYNC` after a compaction."""
        return await self.queue.get()

    def close(self) -> None:
        """Stop receiving events. Idempotent."""
        if not self._closed:
            self._closed = True
            self.watches._release(self)


class _Shared:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.subscribers: set[Subscription] = set()
        self.started: asyncio.Future[None] = loop.create_future()
        self.task: asyncio.Task[None] | None = None


class Watches:
    """A registry of shared prefix watches on one KV."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._shared: dict[bytes, _Shared] = {}
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self, ready: Ready[None]) -> None:
        """Own the watches' tasks until cancelled; ready once :meth:`open` may be called."""
        try:
            async with asyncio.TaskGroup() as self._tasks:
                ready.set_result(None)
                await asyncio.Future()  # until cancelled
        finally:
            self._tasks = None
            self._shared.clear()

    async def open(self, prefix: bytes, key: bytes | None = None) -> Subscription:
        """Subscribe to every change under ``prefix`` (only of ``key``, if given).

        The watch runs when this returns. One watch of the prefix serves every subscriber; a
        subscriber of one key is woken only by that key's changes.

        Raises:
            KVUnavailable: the watch could not start (or the watches are not running).
        """
        if self._tasks is None:
            raise KVUnavailable("watches are not running")
        shared = self._shared.get(prefix)
        if shared is None or shared.task is None or shared.task.done():
            shared = self._shared[prefix] = _Shared(asyncio.get_running_loop())
            shared.task = self._tasks.create_task(self._follow(prefix, shared))
        subscription = Subscription(self, prefix, key)
        shared.subscribers.add(subscription)
        try:
            await asyncio.shield(shared.started)
        except BaseException:  # could not start, or the opener was cancelled meanwhile
            subscription.close()
            raise
        return subscription

    def _release(self, subscription: Subscription) -> None:
        shared = self._shared.get(subscription.prefix)
        if shared is None:
            return
        shared.subscribers.discard(subscription)
        if not shared.subscribers and shared.task is not None:
            shared.task.cancel()
            del self._shared[subscription.prefix]

    async def _follow(self, prefix: bytes, shared: _Shared) -> None:
        """Deliver the prefix's events to its subscribers; re-read when history is lost.

        A watch that cannot start tells its first subscribers why and ends; one that loses
        the store later tells its subscribers to re-read once it is back.
        """
        try:
            await self._deliver(prefix, shared)
        finally:  # ended before it started: its openers must not wait for it
            if not shared.started.done():
                shared.started.set_exception(KVUnavailable(f"the watch of {prefix!r} stopped"))
                shared.started.exception()

    async def _deliver(self, prefix: bytes, shared: _Shared) -> None:
        while True:
            try:
                _, revision = await self.kv.range(prefix, limit=1)
            except KVUnavailable as exc:
                if not shared.started.done():
                    shared.started.set_exception(exc)
                    shared.started.exception()  # retrieved: the openers raise it
                    self._shared.pop(prefix, None)
                    return
                log.warning("watch of %r paused: %s", prefix, exc)
                await asyncio.sleep(1.0)
                continue
            if shared.started.done():  # started again after a loss: what was missed is unknown
                self._broadcast(shared, RESYNC)
            else:
                shared.started.set_result(None)
            try:
                async for event in self.kv.watch(prefix, revision + 1):
                    for subscription in list(shared.subscribers):
                        if subscription.key is None or subscription.key == event.kv.key:
                            subscription.queue.put_nowait(event)
            except Compacted:  # the loop starts again and tells the subscribers to re-read
                log.warning("watch of %r lost history to compaction; subscribers re-read", prefix)

    @staticmethod
    def _broadcast(shared: _Shared, event: Event | None) -> None:
        for subscription in list(shared.subscribers):
            subscription.queue.put_nowait(event)
