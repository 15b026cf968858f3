"""Dispatch: push ready items to this replica's worker sessions, within the credit they grant.

No polling: per namespace, one task follows the queue through a shared watch (a new ready item
wakes it) and is woken when a session grants credit. It claims items in a guarded Txn (so
replicas racing for an item cannot both win), serving the least recently served run first so
that one busy run does not starve the others, and puts each assignment on its session's outbox.
Chains mostly bypass it: a result claims its successor for the same slot (sticky, see
:meth:`floxide_server.store.completion.Completions.complete`), up to ``MAX_CHAIN`` steps in a row.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import typing

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, worker_service_pb2
from floxide_server.store.claims import Claim, Claims, ClaimToken, Snapshot
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Event, KVUnavailable
from floxide_server.watch import RESYNC, Subscription, Watches

__all__ = ["Dispatcher", "Session"]

log = logging.getLogger(__name__)

ConnectResponse = worker_service_pb2.ConnectResponse
_TAKE_SCAN = 64
"""Runs a result looks through for a queued item to take with its completion."""
_CANCELS = {
    records_pb2.RUN_STATUS_CANCELLED: worker_service_pb2.CANCEL_REASON_RUN_CANCELLED,
    records_pb2.RUN_STATUS_COMPLETED: worker_service_pb2.CANCEL_REASON_RUN_FINISHED,
    records_pb2.RUN_STATUS_FAILED: worker_service_pb2.CANCEL_REASON_RUN_FINISHED,
}


@dataclasses.dataclass(eq=False)
class Session:
    """One connected worker stream on this replica."""

    lease: int
    namespace: str
    record: records_pb2.WorkerRecord
    credit: int
    max_credit: int
    draining: bool = False
    held: set[str] = dataclasses.field(default_factory=set)
    snapshots: dict[str, Snapshot] = dataclasses.field(default_factory=dict)
    outbox: asyncio.Queue[ConnectResponse | None] = dataclasses.field(default_factory=asyncio.Queue)
    last_heard: float = dataclasses.field(default_factory=time.monotonic)
    reporting: set[str] = dataclasses.field(default_factory=set)
    tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def hold(self, claim: Claim) -> None:
        """The worker was assigned this claim."""
        self.held.add(claim.token)
        if claim.snapshot is not None:
            self.snapshots[claim.token] = claim.snapshot
        self._settle()

    def drop(self, token: str) -> None:
        """The worker no longer holds this claim."""
        self.held.discard(token)
        self.snapshots.pop(token, None)
        self._settle()

    def assign(self, claim: Claim) -> worker_service_pb2.Assignment:
        """Hold a claim, and make the assignment that tells the worker."""
        assignment = worker_service_pb2.Assignment(
            item=claim.item, claim_token=claim.token, context=claim.context
        )
        if claim.deadline_ms:
            assignment.deadline.FromMilliseconds(claim.deadline_ms)
        self.hold(claim)
        return assignment

    def report(self, tokens: set[str], *, done: bool = False) -> None:
        """Results for these claims are being applied (``done``: and acknowledged)."""
        if done:
            self.reporting -= tokens
        else:
            self.reporting |= tokens
        self._settle()

    def _settle(self) -> None:
        """Idle: nothing held, no result between its arrival and its acknowledgement."""
        if self.held or self.reporting:
            self.idle.clear()
        else:
            self.idle.set()

    def serves(self, item: work_item_pb2.WorkItem) -> bool:
        """Whether the worker runs this item's node (of this definition)."""
        return any(
            s.workflow == item.workflow
            and s.node == item.node
            and (not s.definition_hash or s.definition_hash == item.definition_hash)
            for s in self.record.nodes
        )

    @property
    def open(self) -> bool:
        """Whether it takes new work now."""
        return self.credit > 0 and not self.draining


class Queued(typing.NamedTuple):
    """A queue entry: the item (with its input when it is fresh and small) and its revision."""

    item: work_item_pb2.WorkItem
    revision: int


class _Ready:
    """The ready items of one namespace, by run; runs in serving order.

    A run enters at the back, and goes to the back each time it is served: the front is the
    run that has waited longest since it was last served. Planning reads from the front, so its
    cost follows the items it hands out, not how many runs wait.
    """

    def __init__(self) -> None:
        self.runs: collections.OrderedDict[str, dict[str, Queued]] = collections.OrderedDict()

    def add(self, queued: Queued) -> None:
        self.runs.setdefault(queued.item.run_id, {})[queued.item.item_id] = queued

    def remove(self, run_id: str, item_id: str) -> None:
        items = self.runs.get(run_id)
        if items is not None:
            items.pop(item_id, None)
            if not items:
                del self.runs[run_id]

    def clear(self, run_id: str = "") -> None:
        if run_id:
            self.runs.pop(run_id, None)
        else:
            self.runs.clear()

    def served(self, run_id: str) -> None:
        if run_id in self.runs:
            self.runs.move_to_end(run_id)


class Dispatcher:
    """Matches ready items with sessions of this replica."""

    def __init__(self, claims: Claims, watches: Watches) -> None:
        self.claims = claims
        self.watches = watches
        self.sessions: dict[int, Session] = {}
        self._ready: dict[str, _Ready] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._claims: set[asyncio.Task[None]] = set()

    def add(self, session: Session) -> None:
        """Start dispatching to a session."""
        self.sessions[session.lease] = session
        if session.namespace not in self._tasks or self._tasks[session.namespace].done():
            self._wake[session.namespace] = asyncio.Event()
            self._tasks[session.namespace] = asyncio.create_task(self._follow(session.namespace))
        self.wake(session.namespace)

    def remove(self, session: Session) -> None:
        """Stop dispatching to a session."""
        self.sessions.pop(session.lease, None)

    def wake(self, namespace: str) -> None:
        """Look for work to push (credit was granted, or something changed)."""
        event = self._wake.get(namespace)
        if event is not None:
            event.set()

    async def _follow(self, namespace: str) -> None:
        keys = Keys(namespace)
        while True:
            try:
                queue = await self.watches.open(keys.queue())
                runs = await self.watches.open(keys.run_infos)
                try:
                    await self._reread(namespace)
                    await self._loop(namespace, queue, runs)
                finally:
                    queue.close()
                    runs.close()
            except (KVUnavailable, OSError) as exc:
                log.warning("dispatch in %r paused: %s", namespace, exc)
                await asyncio.sleep(1.0)

    async def _reread(self, namespace: str, run_id: str = "") -> None:
        keys = Keys(namespace)
        entries, _ = await self.claims.kv.range(keys.queue(run_id, "") if run_id else keys.queue())
        ready = self._ready.setdefault(namespace, _Ready())
        ready.clear(run_id)
        for kv in entries:
            ready.add(Queued(work_item_pb2.WorkItem.FromString(kv.value), kv.mod_revision))

    async def _loop(self, namespace: str, queue: Subscription, runs: Subscription) -> None:
        wake = self._wake[namespace]
        while True:
            await self._dispatch(namespace)
            queued = asyncio.ensure_future(queue.next())
            changed = asyncio.ensure_future(runs.next())
            woken = asyncio.ensure_future(wake.wait())
            done, pending = await asyncio.wait(
                {queued, changed, woken}, return_when=asyncio.FIRST_COMPLETED
            )
            for future in pending:
                future.cancel()
            wake.clear()
            if queued in done:
                await self._queued(namespace, queued.result())
            if changed in done:
                event = changed.result()
                if event is RESYNC:
                    await self._reread(namespace)
                elif not event.deleted:
                    record = records_pb2.RunRecord.FromString(event.kv.value)
                    if record.status == records_pb2.RUN_STATUS_RUNNING:
                        await self._reread(namespace, record.run_id)  # a resumed run's items
                    elif record.status in _CANCELS:
                        self._cancel_held(namespace, record.run_id, _CANCELS[record.status])
            while not queue.queue.empty():
                await self._queued(namespace, queue.queue.get_nowait())

    async def _queued(self, namespace: str, event: Event | None) -> None:
        """Apply a queue event to the ready set (re-read it all after a RESYNC)."""
        if event is RESYNC:
            await self._reread(namespace)
            return
        ready = self._ready.setdefault(namespace, _Ready())
        run_item = event.kv.key[len(Keys(namespace).queue()) :].decode().split("/")
        if len(run_item) != 2:
            return
        if event.deleted:
            ready.remove(run_item[0], run_item[1])
        else:
            item = work_item_pb2.WorkItem.FromString(event.kv.value)
            ready.add(Queued(item, event.kv.mod_revision))

    def _cancel_held(self, namespace: str, run_id: str, reason: int) -> None:
        """Tell this replica's workers to stop the items they hold of a finished run."""
        for session in self.sessions.values():
            if session.namespace != namespace:
                continue
            claims = [ClaimToken.parse(token) for token in session.held - session.reporting]
            cancels = [
                worker_service_pb2.Cancel(
                    claim_token=str(claim),
                    run_id=run_id,
                    item_id=claim.item_id,
                    reason=reason,  # type: ignore[arg-type]
                    message=f"run {run_id} is over",
                )
                for claim in claims
                if claim.run_id == run_id
            ]
            if cancels:
                session.outbox.put_nowait(ConnectResponse(cancels=cancels))

    def _plan(self, namespace: str) -> list[tuple[Session, Queued]]:
        """Take items for sessions with credit: one per run in a round, front runs first.

        So a run with many ready items (a wide fan-out, a chain back from its sticky session)
        takes turns with the others and starves none.
        """
        ready = self._ready.get(namespace)
        sessions = [s for s in self.sessions.values() if s.namespace == namespace and s.open]
        if not ready or not ready.runs or not sessions:
            return []
        credit = {s.lease: s.credit for s in sessions}
        left = sum(credit.values())
        plan: list[tuple[Session, Queued]] = []
        while left:
            served: list[tuple[str, str]] = []
            for run_id, items in ready.runs.items():
                if not left:
                    break
                for queued in items.values():
                    item = queued.item
                    takers = [s for s in sessions if credit[s.lease] > 0 and s.serves(item)]
                    if takers:
                        taker = max(takers, key=lambda s: credit[s.lease])
                        credit[taker.lease] -= 1
                        left -= 1
                        plan.append((taker, queued))
                        served.append((run_id, item.item_id))
                        break
            if not served:
                break
            for run_id, item_id in served:
                ready.remove(run_id, item_id)
                ready.served(run_id)
        return plan

    async def _dispatch(self, namespace: str) -> None:
        """Start a claim for each planned item; the loop goes on watching meanwhile."""
        for session, queued in self._plan(namespace):
            session.credit -= 1  # spent now, given back if the claim fails
            task = asyncio.create_task(self._claim_or_return(session, queued))
            self._claims.add(task)
            task.add_done_callback(self._claims.discard)

    async def _claim_or_return(self, session: Session, queued: Queued) -> None:
        try:
            claimed = await self._claim(session, queued)
        except Exception as exc:
            log.warning("claim of %s/%s failed: %s", queued.item.run_id, queued.item.item_id, exc)
            claimed = False
            # Still queued, as far as we know: try it again in a while.
            asyncio.get_running_loop().call_later(1.0, self.give_back, session.namespace, queued)
        if not claimed:
            session.credit += 1  # not claimed: the slot stays free
            self.wake(session.namespace)

    def take(self, session: Session) -> Queued | None:
        """A fresh ready item the session serves, to claim with one of its results.

        The result's completion claims it in its own Txn (a fan-out's next branch), so the
        slot goes on without a trip through dispatch; the front runs first, as in dispatch.
        """
        ready = self._ready.get(session.namespace)
        if ready is None:
            return None
        for looked, (run_id, items) in enumerate(ready.runs.items()):
            if looked >= _TAKE_SCAN:
                break
            for queued in items.values():
                if queued.item.HasField("input") and session.serves(queued.item):
                    ready.remove(run_id, queued.item.item_id)
                    ready.served(run_id)
                    return queued
        return None

    def give_back(self, namespace: str, queued: Queued) -> None:
        """Return a taken item that no Txn claimed, to be dispatched again."""
        self._ready.setdefault(namespace, _Ready()).add(queued)
        self.wake(namespace)

    async def _claim(self, session: Session, queued: Queued) -> bool:
        if session.lease not in self.sessions:
            return False
        item = queued.item
        claim = await self.claims.claim(
            session.namespace, session.lease, item.run_id, item.item_id, queued=queued
        )
        if claim is None:
            return False
        session.outbox.put_nowait(ConnectResponse(assignments=[session.assign(claim)]))
        return True

    async def close(self) -> None:
        """Stop dispatching."""
        for task in [*self._tasks.values(), *self._claims]:
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
