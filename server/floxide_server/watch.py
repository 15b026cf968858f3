"""Shared watches: one etcd watch per prefix per replica, whatever the number of subscribers.

``WaitForCompletion`` and the store services' watch streams subscribe here instead of opening a
watch each: a thousand clients waiting on runs of one namespace cost one watch of its
``runinfo/`` prefix. A watch starts with its first subscriber and stops with its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from floxide_server.store.kv import KV, Compacted, Event

__all__ = ["RESYNC", "Subscription", "Watches"]

log = logging.getLogger(__name__)

RESYNC = None
"""Delivered instead of an event when the watch lost history (compaction): re-read the state."""


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
    def __init__(self) -> None:
        self.subscribers: set[Subscription] = set()
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Watches:
    """A registry of shared prefix watches on one KV."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._shared: dict[bytes, _Shared] = {}

    async def open(self, prefix: bytes, key: bytes | None = None) -> Subscription:
        """Subscribe to every change under ``prefix`` (only of ``key``, if given).

        The watch runs when this returns. One watch of the prefix serves every subscriber; a
        subscriber of one key is woken only by that key's changes.

        Raises:
            KVUnavailable: the watch could not start.
        """
        shared = self._shared.get(prefix)
        if shared is None or shared.task is None or shared.task.done():
            shared = self._shared[prefix] = _Shared()
            shared.task = asyncio.create_task(self._follow(prefix, shared))
        subscription = Subscription(self, prefix, key)
        shared.subscribers.add(subscription)
        started = asyncio.ensure_future(shared.started.wait())
        assert shared.task is not None
        await asyncio.wait({started, shared.task}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if not shared.started.is_set():
            subscription.close()
            shared.task.result()  # raises why the watch could not start
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
        while True:
            _, revision = await self.kv.range(prefix, limit=1)
            shared.started.set()
            try:
                async for event in self.kv.watch(prefix, revision + 1):
                    for subscription in list(shared.subscribers):
                        if subscription.key is None or subscription.key == event.kv.key:
                            subscription.queue.put_nowait(event)
            except Compacted:
                log.warning("watch of %r lost history to compaction; subscribers re-read", prefix)
                for subscription in list(shared.subscribers):
                    subscription.queue.put_nowait(RESYNC)

    async def close(self) -> None:
        """Stop every watch."""
        tasks = [s.task for s in self._shared.values() if s.task is not None]
        self._shared.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
