"""Worker sessions: one per connected worker stream, on an etcd lease; their credit; their end.

A worker says hello; :meth:`Sessions.open` grants a lease and writes the session key
``session/{lease}`` on it (the only key a lease carries). While the worker is heard from,
:meth:`Sessions.keep` renews the lease; when it is not heard from for a TTL, renewal stops and
the lease ends in etcd, which deletes the key. Every replica follows those deletions
(:meth:`Sessions.follow_expiries`) and releases the ended session's claims: each item is
re-queued as a failed attempt of kind WORKER_LOST (:meth:`floxide_server.store.claims.Claims.
release`, guarded, so replicas racing do it once). A periodic sweep
(:meth:`Sessions.release_orphans`) catches sessions that ended while no replica ran.

**Credit.** A worker grants slots; each item pushed to it takes one (:meth:`Credit.take`), and
each result that does not pass its slot to a successor gives it back (:meth:`Credit.give_back`).
Granting more than the session's limit ends the stream (:meth:`Credit.grant`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import timedelta

import grpc

from floxide_grpc import PROTOCOL_VERSION
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, worker_service_pb2
from floxide_grpc.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SessionEnded,
    WorkflowNotFound,
)
from floxide_server.deadlines import Deadlines
from floxide_server.store.claims import Claim, Claims, Snapshot
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, KVUnavailable, Put, Txn
from floxide_server.store.payloads import namespace_of
from floxide_server.store.workflows import WorkflowStore
from floxide_server.watch import RESYNC, Watches

__all__ = ["Credit", "Session", "SessionConfig", "Sessions"]

log = logging.getLogger(__name__)

ConnectResponse = worker_service_pb2.ConnectResponse


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    """Worker sessions' parameters.

    Attributes:
        lease_ttl: How long a session lives without hearing from its worker (etcd's minimum
            is about 2 s).
        heartbeat_interval: How often workers should send a heartbeat.
        max_credit: The most items one worker may hold at once.
        hello_timeout: How long a new stream may take to say hello.
        deadline_grace: How long past an attempt's timeout the server waits for its result
            before it fails the attempt itself (:mod:`floxide_server.deadlines`).
    """

    lease_ttl: timedelta = timedelta(seconds=10)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    max_credit: int = 1024
    hello_timeout: timedelta = timedelta(seconds=10)
    deadline_grace: timedelta = timedelta(seconds=2)

    @property
    def stale_after_ms(self) -> int:
        """A worker unheard for three heartbeats is stale (its lease may still stand)."""
        return int(self.heartbeat_interval.total_seconds() * 3000)


class Credit:
    """The slots a worker granted and has not used yet, within the session's limit.

    Attributes:
        available: Slots free now.
        limit: The most slots the worker may hold and have free at once.
    """

    def __init__(self, granted: int, limit: int) -> None:
        self.available = granted
        self.limit = limit

    def grant(self, slots: int, held: int) -> None:
        """The worker grants more slots.

        Raises:
            ResourceExhausted: the slots free and held would pass the limit.
        """
        self.available += slots
        if self.available + held > self.limit:
            raise ResourceExhausted(
                f"credit {self.available + held} is over the limit of {self.limit}"
            )

    def take(self) -> None:
        """An item goes to the worker: one slot is used."""
        assert self.available > 0, "no slot to take"
        self.available -= 1

    def give_back(self) -> None:
        """A slot is free again: its item was not claimed, or its result took no successor."""
        self.available += 1


@dataclasses.dataclass(eq=False)
class Session:
    """One connected worker stream on this replica."""

    lease: int
    namespace: str
    record: records_pb2.WorkerRecord
    credit: Credit
    draining: bool = False
    held: set[str] = dataclasses.field(default_factory=set)
    snapshots: dict[str, Snapshot] = dataclasses.field(default_factory=dict)
    outbox: asyncio.Queue[ConnectResponse | None] = dataclasses.field(default_factory=asyncio.Queue)
    last_heard: float = dataclasses.field(default_factory=time.monotonic)
    reporting: set[str] = dataclasses.field(default_factory=set)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    deadlines: Deadlines | None = None

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
        if self.deadlines is not None:
            self.deadlines.stop(token)
        self._settle()

    def assign(self, claim: Claim) -> worker_service_pb2.Assignment:
        """Hold a claim, and make the assignment that tells the worker."""
        assignment = worker_service_pb2.Assignment(
            item=claim.item, claim_token=claim.token, context=claim.context
        )
        if claim.timeout_ms:
            assignment.timeout.FromMilliseconds(claim.timeout_ms)
        self.hold(claim)
        if self.deadlines is not None:
            self.deadlines.start(self, claim)
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
        return self.credit.available > 0 and not self.draining


class Sessions:
    """This replica's sessions, and every session's lease, expiry and listing."""

    def __init__(
        self,
        kv: KV,
        workflows: WorkflowStore,
        claims: Claims,
        watches: Watches,
        config: SessionConfig,
        server_id: str,
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.claims = claims
        self.watches = watches
        self.config = config
        self.server_id = server_id
        self.live: dict[int, Session] = {}
        self.deadlines = Deadlines(claims, config.deadline_grace)
        self._none_live = asyncio.Event()
        self._none_live.set()

    async def open(self, hello: worker_service_pb2.Hello) -> Session:
        """Check a hello, grant its session a lease and write the session's key.

        Raises:
            FailedPrecondition: another protocol version.
            InvalidArgument: the hello names no node.
            NotFound: a node offered is not of a registered workflow.
            ResourceExhausted: the credit offered is over the limit.
        """
        if hello.protocol_version != PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"protocol version {hello.protocol_version} is not supported; this server speaks "
                f"{PROTOCOL_VERSION}"
            )
        namespace = namespace_of(hello.namespace)
        if not hello.nodes:
            raise InvalidArgument("hello names no node to serve")
        for served in hello.nodes:
            try:
                record = await self.workflows.record(
                    namespace, served.workflow, served.definition_hash
                )
            except (WorkflowNotFound, InvalidArgument) as exc:
                raise NotFound(
                    f"hello offers node {served.node!r} of {served.workflow!r}: {exc}"
                ) from exc
            if not any(n.name == served.node for n in record.definition.nodes):
                raise NotFound(f"workflow {served.workflow!r} has no node {served.node!r}")
        credit = Credit(0, self.config.max_credit)
        credit.grant(hello.credit, 0)
        lease = await self.kv.grant(max(int(self.config.lease_ttl.total_seconds()), 1))
        worker = records_pb2.WorkerRecord(
            session_id=f"{lease:x}",
            worker_id=hello.worker_id,
            namespace=namespace,
            nodes=hello.nodes,
            status=records_pb2.WORKER_STATUS_IDLE,
            slots=hello.credit,
            server_id=self.server_id,
            sdk=hello.sdk,
        )
        worker.connected_at.GetCurrentTime()
        worker.last_heartbeat.GetCurrentTime()
        await self.kv.txn(
            Txn([], [Put(Keys(namespace).session(lease), worker.SerializeToString(), lease)])
        )
        session = Session(lease, namespace, worker, credit, deadlines=self.deadlines)
        self.live[lease] = session
        self._none_live.clear()
        log.info("session %x opened for worker %r in %r", lease, hello.worker_id, namespace)
        return session

    async def keep(self, session: Session) -> None:
        """Renew the lease while the worker is heard from, until the session ends.

        Raises:
            SessionEnded: the lease ended (the worker was silent for a TTL, or etcd ended it).
        """
        ttl = self.config.lease_ttl.total_seconds()
        interval = min(self.config.heartbeat_interval.total_seconds(), ttl / 3)
        key = Keys(session.namespace).session(session.lease)
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - session.last_heard > ttl:
                # Silent for a whole TTL: stop renewing. etcd ends the lease on its own clock.
                if await self.kv.get(key) is None:
                    raise SessionEnded("the session's lease ended: no heartbeat within its TTL")
                continue
            if not await self.kv.keep_alive(session.lease):
                raise SessionEnded("the session's lease ended; reconnect for a new session")
            session.record.last_heartbeat.GetCurrentTime()
            session.record.status = (
                records_pb2.WORKER_STATUS_DRAINING
                if session.draining
                else records_pb2.WORKER_STATUS_BUSY
                if session.held
                else records_pb2.WORKER_STATUS_IDLE
            )
            await self.kv.txn(
                Txn(
                    [Compare.exists(key)],
                    [Put(key, session.record.SerializeToString(), session.lease)],
                )
            )

    async def close(self, session: Session) -> None:
        """The stream ended: end the session now, so that its claims are re-queued at once.

        If etcd does not answer, the lease ends by itself within its TTL.
        """
        try:
            await self.kv.revoke(session.lease)
        except (KVUnavailable, grpc.aio.AioRpcError) as exc:
            log.warning(
                "session %x: lease not revoked (%s); it ends with its TTL", session.lease, exc
            )
        finally:
            self.live.pop(session.lease, None)
            if not self.live:
                self._none_live.set()
        log.info("session %x closed (%d claims left to re-queue)", session.lease, len(session.held))

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until every session of this replica has closed (at most ``timeout`` s).

        Returns:
            Whether they all did.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._none_live.wait()
        except TimeoutError:
            return False
        return True

    async def release(self, namespace: str, lease: int) -> int:
        """Re-queue every claim of an ended session; how many this call released."""
        prefix = Keys(namespace).claim(lease)
        claims, _ = await self.kv.range(prefix)
        released = 0
        for kv in claims:
            run_id, item_id = kv.key[len(prefix) :].decode().split("/")
            released += await self.claims.release(namespace, lease, run_id, item_id)
        if released:
            log.info("session %x of %r ended: re-queued %d items", lease, namespace, released)
        return released

    async def follow_expiries(self, namespace: str) -> None:
        """Release the claims of each session of the namespace whose key is deleted."""
        keys = Keys(namespace)
        updates = await self.watches.open(keys.session())
        try:
            while True:
                event = await updates.next()
                if event is RESYNC:
                    await self.release_orphans(namespace)
                elif event.deleted:
                    await self.release(namespace, int(event.kv.key[len(keys.session()) :], 16))
        finally:
            updates.close()

    async def release_orphans(self, namespace: str) -> None:
        """Release claims whose session no longer exists (it ended while no replica ran)."""
        keys = Keys(namespace)
        claims, _ = await self.kv.range(keys.claims)
        leases = {int(kv.key[len(keys.claims) :].split(b"/")[0], 16) for kv in claims}
        for lease in leases:
            if await self.kv.get(keys.session(lease)) is None:
                await self.release(namespace, lease)

    async def list(self, namespace: str) -> list[records_pb2.WorkerRecord]:
        """The namespace's sessions, with liveness judged from their last heartbeat."""
        found, _ = await self.kv.range(Keys(namespace).session())
        now = time.time_ns() // 1_000_000
        workers = []
        for entry in found:
            record = records_pb2.WorkerRecord.FromString(entry.value)
            age = now - record.last_heartbeat.ToMilliseconds()
            record.liveness = (
                records_pb2.LIVENESS_STATUS_ALIVE
                if age <= self.config.stale_after_ms
                else records_pb2.LIVENESS_STATUS_STALE
            )
            workers.append(record)
        return workers
