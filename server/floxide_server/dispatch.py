"""Dispatch: push ready items to this replica's worker sessions, within the credit they grant.

No polling: per namespace, one task follows the queue through a shared watch (a new ready item
wakes it) and is woken when a session grants credit. It claims items in a guarded Txn (so
replicas racing for an item cannot both win), serving the least recently served run first so
that one busy run does not starve the others, and puts each assignment on its session's outbox.
The ready items are indexed by the nodes that serve them (:mod:`floxide_server.ready`): a wake
looks only at what the sessions with credit may run, not at what waits for other workers.
Chains mostly bypass it: a result claims its successor for the same slot (sticky, see
:meth:`floxide_server.store.completion.Completions.complete`), up to ``MAX_CHAIN`` steps in a row.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, worker_service_pb2
from floxide_grpc.errors import FloxideError, SessionEnded, Unavailable
from floxide_server.ready import Key, Queued, ReadyItems
from floxide_server.sessions import Session, Sessions
from floxide_server.store.claims import Claims, ClaimToken
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Event, KVUnavailable
from floxide_server.tasks import Ready, first_done
from floxide_server.watch import RESYNC, Subscription, Watches

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

ConnectResponse = worker_service_pb2.ConnectResponse
_TAKE_SCAN = 64
"""Runs of each node a result looks through for a queued item to take with its completion."""
_CANCELS = {
    records_pb2.RUN_STATUS_CANCELLED: worker_service_pb2.CANCEL_REASON_RUN_CANCELLED,
    records_pb2.RUN_STATUS_COMPLETED: worker_service_pb2.CANCEL_REASON_RUN_FINISHED,
    records_pb2.RUN_STATUS_FAILED: worker_service_pb2.CANCEL_REASON_RUN_FINISHED,
    records_pb2.RUN_STATUS_TIMED_OUT: worker_service_pb2.CANCEL_REASON_RUN_TIMED_OUT,
}


MAX_ENDED_KEPT = 10_000
"""Runs this replica saw ending, kept to cancel what a completion hands over just after."""


def cancel(claim: ClaimToken, reason: int) -> worker_service_pb2.Cancel:
    """The Cancel that tells a worker to stop a claim of a run that is over."""
    return worker_service_pb2.Cancel(
        claim_token=str(claim),
        run_id=claim.run_id,
        item_id=claim.item_id,
        reason=reason,  # type: ignore[arg-type]
        message=f"run {claim.run_id} is over",
    )


class Dispatcher:
    """Matches ready items with sessions of this replica."""

    def __init__(self, claims: Claims, watches: Watches, sessions: Sessions) -> None:
        self.claims = claims
        self.watches = watches
        self.sessions = sessions
        self._ready: dict[str, ReadyItems] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._ended: collections.OrderedDict[tuple[str, str], tuple[int, int]] = (
            collections.OrderedDict()
        )

    async def run(self, ready: Ready[None]) -> None:
        """Own dispatch's tasks until cancelled; ready once sessions may be added.

        A failure of a namespace's dispatch loop or of a claim, other than the store not
        answering, ends ``run()`` with it.
        """
        try:
            async with asyncio.TaskGroup() as self._group:
                ready.set_result(None)
                await asyncio.Future()  # until cancelled
        finally:
            self._group = None
            self._tasks.clear()

    def add(self, session: Session) -> None:
        """Start dispatching to a session (of :attr:`Sessions.live`)."""
        if session.namespace not in self._tasks or self._tasks[session.namespace].done():
            self._wake[session.namespace] = asyncio.Event()
            if self._group is None:
                raise Unavailable("the server is not dispatching (shutting down): reconnect")
            self._tasks[session.namespace] = self._group.create_task(
                self._follow(session.namespace)
            )
        self.wake(session.namespace)

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
        ready = self._ready.setdefault(namespace, ReadyItems())
        ready.clear(run_id)
        for kv in entries:
            ready.add(Queued(work_item_pb2.WorkItem.FromString(kv.value), kv.mod_revision))

    async def _loop(self, namespace: str, queue: Subscription, runs: Subscription) -> None:
        wake = self._wake[namespace]
        while True:
            await self._dispatch(namespace)
            queued = asyncio.ensure_future(queue.next())
            changed = asyncio.ensure_future(runs.next())
            done = await first_done([queued, changed, asyncio.ensure_future(wake.wait())])
            wake.clear()
            if queued in done:
                await self._queued(namespace, queued.result())
            if changed in done:
                event = changed.result()
                if event is RESYNC:
                    await self._reread(namespace)
                    await self._recheck_held(namespace)
                elif not event.deleted:
                    record = records_pb2.RunRecord.FromString(event.kv.value)
                    if record.status == records_pb2.RUN_STATUS_RUNNING:
                        await self._reread(namespace, record.run_id)  # a resumed run's items
                    elif record.status in _CANCELS:
                        reason = _CANCELS[record.status]
                        self.run_ended(namespace, record.run_id, reason, event.kv.mod_revision)
            while not queue.queue.empty():
                await self._queued(namespace, queue.queue.get_nowait())

    async def _queued(self, namespace: str, event: Event | None) -> None:
        """Apply a queue event to the ready set (re-read it all after a RESYNC)."""
        if event is RESYNC:
            await self._reread(namespace)
            return
        ready = self._ready.setdefault(namespace, ReadyItems())
        run_item = event.kv.key[len(Keys(namespace).queue()) :].decode().split("/")
        if len(run_item) != 2:
            return
        if event.deleted:
            ready.remove(run_item[0], run_item[1])
        else:
            item = work_item_pb2.WorkItem.FromString(event.kv.value)
            ready.add(Queued(item, event.kv.mod_revision))

    async def _recheck_held(self, namespace: str) -> None:
        """After the runs' watch lost history: stop what workers hold of runs that ended."""
        keys = Keys(namespace)
        held = {
            ClaimToken.parse(token).run_id
            for session in self.sessions.live.values()
            if session.namespace == namespace
            for token in session.held
        }
        for run_id in held:
            found = await self.claims.kv.get(keys.run_info(run_id))
            if found is None:  # removed: long over
                self.run_ended(namespace, run_id, _CANCELS[records_pb2.RUN_STATUS_COMPLETED], 0)
                continue
            status = records_pb2.RunRecord.FromString(found.value).status
            if status in _CANCELS:
                self.run_ended(namespace, run_id, _CANCELS[status], found.mod_revision)

    def run_ended(self, namespace: str, run_id: str, reason: int, revision: int) -> None:
        """Tell this replica's workers to stop the items they hold of a run that ended.

        ``revision`` is the ending's (0: unknown, long ago).
        """
        self._ended[(namespace, run_id)] = (reason, revision)
        while len(self._ended) > MAX_ENDED_KEPT:
            self._ended.popitem(last=False)
        for session in self.sessions.live.values():
            if session.namespace != namespace:
                continue
            claims = [ClaimToken.parse(token) for token in session.held - session.reporting]
            cancels = [cancel(claim, reason) for claim in claims if claim.run_id == run_id]
            if cancels:
                session.outbox.put_nowait(ConnectResponse(cancels=cancels))

    def cancel_if_ended(
        self, namespace: str, token: str, revision: int
    ) -> worker_service_pb2.Cancel | None:
        """A Cancel for a claim just handed over, if its run was seen ending meanwhile.

        A successor or sibling claimed with a result is held only once its completion
        returns: a run that ended in between was not cancelled for it. ``revision``: the
        claim's (0: unknown).
        """
        claim = ClaimToken.parse(token)
        ended = self._ended.get((namespace, claim.run_id))
        if ended is None:
            return None
        reason, ended_at = ended
        # Claimed before the run ended; a claim made after (a resumed run's) goes on.
        before = not ended_at or not revision or revision < ended_at
        return cancel(claim, reason) if before else None

    def _plan(self, namespace: str) -> list[tuple[Session, Queued]]:
        """Take items for sessions with credit, one at a time, the front run first.

        The sessions with credit say which keys they may take from; of those, the key whose
        front run's turn comes first gives its item to the session with the most credit left
        that serves it. A run served goes to the back everywhere, so a run with many ready items
        (a wide fan-out, a chain back from its sticky session) takes turns with the others and
        starves none. A wake costs the items it hands out and the keys the sessions serve, never
        the items that wait for other sessions.
        """
        ready = self._ready.get(namespace)
        sessions = [s for s in self.sessions.live.values() if s.namespace == namespace and s.open]
        if not ready or not sessions:
            return []
        credit = {s.lease: s.credit.available for s in sessions}
        left = sum(credit.values())
        takers: dict[Key, list[Session]] = {}
        for session in sessions:
            for key in ready.keys_for(session.serving):
                takers.setdefault(key, []).append(session)
        fronts = [(front[0], key) for key in takers if (front := ready.front(key)) is not None]
        heapq.heapify(fronts)  # (the turn of the key's front run, the key)
        plan: list[tuple[Session, Queued]] = []
        while left and fronts:
            turn, key = fronts[0]
            front = ready.front(key)
            takers[key] = [s for s in takers[key] if credit[s.lease] > 0]
            if front is None or not takers[key]:
                heapq.heappop(fronts)
                continue
            if front[0] != turn:  # its front run was served from another key: now behind
                heapq.heapreplace(fronts, (front[0], key))
                continue
            taker = max(takers[key], key=lambda s: credit[s.lease])
            credit[taker.lease] -= 1
            left -= 1
            plan.append((taker, front[1]))
            ready.serve(front[1])  # the key is looked at again: its next front, or none
        return plan

    async def _dispatch(self, namespace: str) -> None:
        """Start a claim for each planned item; the loop goes on watching meanwhile."""
        assert self._group is not None
        for session, queued in self._plan(namespace):
            session.credit.take()  # given back if the claim fails
            self._group.create_task(self._claim_or_return(session, queued))

    async def _claim_or_return(self, session: Session, queued: Queued) -> None:
        try:
            claimed = await self._claim(session, queued)
        except SessionEnded:  # still queued: another session takes it, this one nothing more
            log.debug("session %016x ended before claiming %s", session.lease, queued.item.item_id)
            claimed = False
            session.lapsed = True
            self.give_back(session.namespace, queued)
        except Exception as exc:  # one claim, not the loop: logged (whole if unexpected)
            expected = isinstance(exc, (KVUnavailable, OSError, FloxideError))
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "claim of %s/%s failed: %s",
                queued.item.run_id,
                queued.item.item_id,
                exc,
                exc_info=not expected,
            )
            claimed = False
            # Still queued, as far as we know: try it again in a while.
            asyncio.get_running_loop().call_later(1.0, self.give_back, session.namespace, queued)
        if not claimed:
            session.credit.give_back()  # not claimed: the slot stays free
            self.wake(session.namespace)

    def take(self, session: Session) -> Queued | None:
        """A fresh ready item the session serves, to claim with one of its results.

        The result's completion claims it in its own Txn (a fan-out's next branch), so the
        slot goes on without a trip through dispatch; the front runs first, as in dispatch.
        """
        ready = self._ready.get(session.namespace)
        if ready is None:
            return None
        found: list[tuple[int, Queued]] = []  # the first fresh item of each key, with its turn
        for key in ready.keys_for(session.serving):
            for turn, queued in ready.scan(key, _TAKE_SCAN):
                if queued.item.HasField("input"):
                    found.append((turn, queued))
                    break
        if not found:
            return None
        _, queued = min(found, key=lambda turn_queued: turn_queued[0])
        ready.serve(queued)
        return queued

    def give_back(self, namespace: str, queued: Queued) -> None:
        """Return a taken item that no Txn claimed, to be dispatched again."""
        self._ready.setdefault(namespace, ReadyItems()).add(queued)
        self.wake(namespace)

    async def _claim(self, session: Session, queued: Queued) -> bool:
        """Whether the item went to the session (not: another got it, or its run ended).

        Raises:
            SessionEnded: the session ended first.
        """
        if session.lease not in self.sessions.live:
            raise SessionEnded(f"session {session.lease:016x} ended")
        item = queued.item
        with session.making_claims():
            claim = await self.claims.claim(
                session.namespace, session.lease, item.run_id, item.item_id, queued=queued
            )
            if claim is None:
                return False
            assignment = session.assign(claim)
        session.outbox.put_nowait(ConnectResponse(assignments=[assignment]))
        return True
