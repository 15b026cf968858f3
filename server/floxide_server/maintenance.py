"""What every replica tends in the background, for every namespace: safe on all of them at once.

- **Expired sessions**: a watch on ``session/`` sees a session key deleted (its lease ended:
  the worker was killed, frozen or cut off) and re-queues that session's claims, each a failed
  attempt of kind WORKER_LOST. Releases are guarded Txns, so replicas racing do it once.
- **Reconcile**: at start-up and then every lease TTL, claims whose session no longer exists
  (they expired while no replica ran) are released the same way, and wide fan-outs whose
  expansion a crash interrupted are finished.
- **Retention**: runs finished longer ago than the retention period are removed in bounded
  batches, one guarded Txn and one range delete per run.
- **Retry timers**: due timers are fired (a Txn that checks the run and the item), woken by the
  earliest timer's due time or by a new timer, so a restart loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from floxide_server.store import Store, fanout, timers
from floxide_server.store.keys import NAMESPACES, Keys
from floxide_server.store.kv import KV, KVUnavailable
from floxide_server.store.retention import remove_finished
from floxide_server.watch import RESYNC, Watches

__all__ = ["Maintenance"]

log = logging.getLogger(__name__)


class Maintenance:
    """Background tending of every namespace in the index."""

    def __init__(
        self,
        kv: KV,
        store: Store,
        watches: Watches,
        reconcile_every: float,
        retention: float,
        retention_by_namespace: Mapping[str, float] | None = None,
    ) -> None:
        self.kv = kv
        self.store = store
        self.watches = watches
        self.reconcile_every = reconcile_every
        self.retention = retention
        self.retention_by_namespace = dict(retention_by_namespace or {})
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._index: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Follow the namespace index, tending each namespace in it."""
        self._index = asyncio.create_task(self._follow_index())

    async def _follow_index(self) -> None:
        while True:
            try:
                updates = await self.watches.open(NAMESPACES)
                try:
                    found, _ = await self.kv.range(NAMESPACES)
                    for kv in found:
                        self._tend(kv.key[len(NAMESPACES) :].decode())
                    while True:
                        event = await updates.next()
                        if event is not RESYNC and not event.deleted:
                            self._tend(event.kv.key[len(NAMESPACES) :].decode())
                finally:
                    updates.close()
            except KVUnavailable as exc:
                log.warning("namespace index unavailable: %s", exc)
                await asyncio.sleep(1.0)

    def _tend(self, namespace: str) -> None:
        if namespace in self._tasks:
            return
        self._tasks[namespace] = [
            asyncio.create_task(self._guard(self._expiries, namespace)),
            asyncio.create_task(self._guard(self._reconcile, namespace)),
            asyncio.create_task(self._guard(self._timers, namespace)),
            asyncio.create_task(self._guard(self._retain, namespace)),
        ]

    async def _guard(self, body: object, namespace: str) -> None:
        assert callable(body)
        while True:
            try:
                await body(namespace)
            except (KVUnavailable, OSError) as exc:
                log.warning(
                    "%s of %r paused: %s", getattr(body, "__name__", "task"), namespace, exc
                )
                await asyncio.sleep(1.0)

    async def release_session(self, namespace: str, lease: int) -> int:
        """Re-queue every claim of an ended session; how many this call released."""
        claims, _ = await self.kv.range(Keys(namespace).claim(lease))
        released = 0
        for kv in claims:
            run_id, item_id = kv.key[len(Keys(namespace).claim(lease)) :].decode().split("/")
            released += await self.store.claims.release(namespace, lease, run_id, item_id)
        if released:
            log.info("session %x of %r ended: re-queued %d items", lease, namespace, released)
        return released

    async def _expiries(self, namespace: str) -> None:
        keys = Keys(namespace)
        updates = await self.watches.open(keys.session())
        try:
            while True:
                event = await updates.next()
                if event is RESYNC:
                    await self._reconcile_once(namespace)
                elif event.deleted:
                    lease = int(event.kv.key[len(keys.session()) :].decode(), 16)
                    await self.release_session(namespace, lease)
        finally:
            updates.close()

    async def _reconcile_once(self, namespace: str) -> None:
        keys = Keys(namespace)
        expansions, _ = await self.kv.range(keys.expansion())
        for kv in expansions:  # fan-outs whose expansion a crash interrupted
            run_id, item_id = kv.key[len(keys.expansion()) :].decode().split("/")
            await fanout.expand(self.kv, namespace, run_id, item_id)
        claims, _ = await self.kv.range(keys.prefix + b"claim/")
        leases = {int(kv.key[len(keys.prefix + b"claim/") :].split(b"/")[0], 16) for kv in claims}
        for lease in leases:
            if await self.kv.get(keys.session(lease)) is None:
                await self.release_session(namespace, lease)

    async def _reconcile(self, namespace: str) -> None:
        while True:
            await self._reconcile_once(namespace)
            await asyncio.sleep(self.reconcile_every)

    async def _timers(self, namespace: str) -> None:
        keys = Keys(namespace)
        updates = await self.watches.open(keys.timer())
        try:
            while True:
                await timers.fire_timers(self.kv, namespace)
                first, _ = await self.kv.range(keys.timer(), limit=1)
                wait = 1.0
                if first:
                    due_ms = int(first[0].key[len(keys.timer()) :].split(b"/")[0])
                    wait = min(max(due_ms / 1000 - time.time(), 0.0), 1.0)
                event = asyncio.ensure_future(updates.next())
                done, _ = await asyncio.wait({event}, timeout=wait)
                if not done:
                    event.cancel()
        finally:
            updates.close()

    async def _retain(self, namespace: str) -> None:
        retention = self.retention_by_namespace.get(namespace, self.retention)
        while True:
            cutoff = int((time.time() - retention) * 1000)
            removed = await remove_finished(self.kv, namespace, cutoff)
            if removed:
                log.info("retention removed %d finished runs of %r", removed, namespace)
                continue  # there may be more: next batch at once
            await asyncio.sleep(min(max(retention / 10, 0.2), 60.0))

    async def close(self) -> None:
        """Stop tending."""
        tasks = [t for ts in self._tasks.values() for t in ts]
        if self._index is not None:
            tasks.append(self._index)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
