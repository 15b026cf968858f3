"""What every replica tends in the background, for every namespace: safe on all of them at once.

- **Expired sessions**: :meth:`floxide_server.sessions.Sessions.follow_expiries` releases the
  claims of each session whose lease ended (the worker was killed, frozen, cut off or silent)
  and stamps its record's ``ended_at``.
- **Reconcile**: at start-up and then every lease TTL, claims whose session no longer exists
  (they expired while no replica ran) are released the same way, records of sessions that
  ended unseen get their ``ended_at``, wide fan-outs whose expansion a crash interrupted are
  finished, and so is the settling of finished runs.
- **Stuck runs**: on the elected replica, every ``--reconcile-interval`` (30 s), running runs
  with no live item are failed as STUCK (:mod:`floxide_server.store.stuck`): those the step's
  own Txn could not end.
- **Retention**: runs finished longer ago than the retention period, and the records of worker
  sessions that ended longer ago, are removed in bounded batches
  (:mod:`floxide_server.store.retention`).
- **Timers** (retries, run timeouts): on the elected replica, fired by
  :class:`floxide_server.firing.Firer` on its monotonic clock, never early; a failover resumes
  them from the timer clock written in etcd.

Every loop runs in the task group of :meth:`Maintenance.run`; one that fails for another
reason than the store not answering ends ``run()``, and with it the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import grpc

from floxide_server.election import Election
from floxide_server.firing import Firer
from floxide_server.sessions import Sessions
from floxide_server.store import fanout, settling, stuck
from floxide_server.store.keys import NAMESPACES, Keys
from floxide_server.store.kv import KV, MAX_TXN_OPS, KVUnavailable
from floxide_server.store.lifecycle import prune_counted
from floxide_server.store.lineage import Lineage
from floxide_server.store.records import now_ms
from floxide_server.store.retention import remove_ended_sessions, remove_finished
from floxide_server.tasks import Ready
from floxide_server.watch import RESYNC, Watches

__all__ = ["Maintenance"]

log = logging.getLogger(__name__)

Tending = Callable[[str], Coroutine[Any, Any, None]]


class Maintenance:
    """Background tending of every namespace in the index."""

    def __init__(
        self,
        kv: KV,
        sessions: Sessions,
        watches: Watches,
        reconcile_every: float,
        retention: float,
        retention_by_namespace: Mapping[str, float] | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
        stuck_every: float = 30.0,
        election: Election | None = None,
        lineage: Lineage | None = None,
    ) -> None:
        self.kv = kv
        self.lineage = lineage
        self.election = election
        self.max_txn_ops = max_txn_ops
        self.stuck_every = stuck_every
        self.sessions = sessions
        self.watches = watches
        self.reconcile_every = reconcile_every
        self.retention = retention
        self.retention_by_namespace = dict(retention_by_namespace or {})
        self._tended: set[str] = set()

    async def run(self, ready: Ready[None]) -> None:
        """Follow the namespace index, tending each namespace in it, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._follow_index(tasks))
                ready.set_result(None)
        finally:
            self._tended.clear()

    async def _follow_index(self, tasks: asyncio.TaskGroup) -> None:
        while True:
            try:
                updates = await self.watches.open(NAMESPACES)
                try:
                    found, _ = await self.kv.range(NAMESPACES)
                    for kv in found:
                        self._tend(tasks, kv.key[len(NAMESPACES) :].decode())
                    while True:
                        event = await updates.next()
                        if event is not RESYNC and not event.deleted:
                            self._tend(tasks, event.kv.key[len(NAMESPACES) :].decode())
                finally:
                    updates.close()
            except KVUnavailable as exc:
                log.warning("namespace index unavailable: %s", exc)
                await asyncio.sleep(1.0)

    def _tend(self, tasks: asyncio.TaskGroup, namespace: str) -> None:
        if namespace in self._tended:
            return
        self._tended.add(namespace)
        for body in (
            self.sessions.follow_expiries,
            self._reconcile,
            self._stuck,
            self._timers,
            self._retain,
        ):
            tasks.create_task(self._guard(body, namespace))

    async def _guard(self, body: Tending, namespace: str) -> None:
        """Run a loop of a namespace again after the store stopped answering."""
        while True:
            try:
                await body(namespace)
            except (KVUnavailable, OSError, grpc.aio.AioRpcError) as exc:  # etcd's condition
                log.warning("%s of %r paused: %s", body.__name__, namespace, exc)
                await asyncio.sleep(1.0)

    async def _reconcile(self, namespace: str) -> None:
        keys = Keys(namespace)
        while True:
            expansions, _ = await self.kv.range(keys.expansion())
            for kv in expansions:  # fan-outs whose expansion a crash interrupted
                run_id, item_id = kv.key[len(keys.expansion()) :].decode().split("/")
                if self.lineage is not None:
                    await self.lineage.expand(namespace, run_id, item_id)
                else:
                    await fanout.expand(self.kv, namespace, run_id, item_id)
            await self.sessions.release_orphans(namespace)
            await settling.settle_all(self.kv, namespace, self.max_txn_ops)  # interrupted ones
            await asyncio.sleep(self.reconcile_every)

    async def _stuck(self, namespace: str) -> None:
        """Fail runs made stuck behind their Txns' back (a step's own Txn fails the others).

        On the elected replica only (any replica, with no election): each run's Txn is
        guarded by the run's own state, so two replicas at once would do no harm, only work.
        """
        if self.election is not None:
            await self.election.lead(functools.partial(self._fail_stuck, namespace))
        else:
            await self._fail_stuck(namespace)

    async def _fail_stuck(self, namespace: str) -> None:
        counted = b""  # where the next page of the quota's index starts
        while True:
            failed = await stuck.fail_stuck(
                self.kv, namespace, now_ms(), self.max_txn_ops, self.lineage
            )
            if failed:
                log.warning("reconcile failed %d stuck runs of %r", failed, namespace)
            counted = await prune_counted(self.kv, Keys(namespace), counted)
            await asyncio.sleep(self.stuck_every)

    async def _timers(self, namespace: str) -> None:
        """Fire the namespace's timers, on the elected replica only (see :mod:`.firing`)."""
        if self.election is None:
            firer = Firer(self.kv, namespace, None, self.max_txn_ops, lineage=self.lineage)
            await firer.run(self.watches)
            return
        election = self.election

        async def fire() -> None:
            firer = Firer(
                self.kv, namespace, election.guard, self.max_txn_ops, lineage=self.lineage
            )
            await firer.run(self.watches)

        await election.lead(fire)

    async def _retain(self, namespace: str) -> None:
        retention = self.retention_by_namespace.get(namespace, self.retention)
        while True:
            cutoff = int((time.time() - retention) * 1000)
            removed = await remove_finished(self.kv, namespace, cutoff)
            sessions = await remove_ended_sessions(self.kv, namespace, cutoff)
            if removed or sessions:
                log.info(
                    "retention removed %d finished runs and %d ended sessions of %r",
                    removed,
                    sessions,
                    namespace,
                )
                continue  # there may be more: next batch at once
            await asyncio.sleep(min(max(retention / 10, 0.2), 60.0))
