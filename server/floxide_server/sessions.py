"""Worker sessions: one per connected worker stream, on an etcd lease; their credit; their end.

A worker says hello; :meth:`Sessions.open` grants a lease and writes, in one Txn, the session
key ``session/{lease}`` on it (the only key a lease carries) and the session's durable record
``worker/{lease}`` (on no lease). :meth:`Sessions.keep` renews the lease only while the worker
was heard from within two heartbeat intervals, and revokes it after a TTL of silence, so a silent
worker's session ends within the TTL plus one heartbeat interval of its last message; if the
replica dies, etcd ends the lease within a TTL of its last renewal. Every replica follows the
session keys' deletions (:meth:`Sessions.follow_expiries`): it stamps the durable record's
``ended_at`` and releases the ended session's claims, each item re-queued as a failed attempt of
kind WORKER_LOST (:meth:`floxide_server.store.claims.Claims.release`, guarded, so replicas racing
do it once). A periodic sweep (:meth:`Sessions.release_orphans`) catches sessions that ended
while no replica watched.

**Liveness** comes from the lease alone (:meth:`Sessions.list`): the time left of it, as etcd's
leader times it, says whether it was renewed within two heartbeat intervals (ALIVE) or not
(STALE); a session whose lease is gone is not live, and is listed DEAD from its durable record
until retention removes it. What a session holds is read from its claim keys. No wall clock of
one process is compared with another's.

**Credit.** A worker grants slots; each item pushed to it takes one (:meth:`Credit.take`), and
each result that does not pass its slot to a successor gives it back (:meth:`Credit.give_back`).
Granting more than the session's limit ends the stream (:meth:`Credit.grant`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Collection, Iterator
from datetime import timedelta

import grpc

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, worker_service_pb2
from floxide_grpc._version import PROTOCOL_VERSION
from floxide_grpc.errors import (
    ClaimLost,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SessionEnded,
    WorkflowNotFound,
)
from floxide_server.deadlines import Deadlines
from floxide_server.ready import Key, key_of
from floxide_server.store.claims import Claim, Claims, ClaimToken, Snapshot
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, KeyValue, KVUnavailable, Put, Txn
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
            is about 2 s; etcd counts whole seconds).
        heartbeat_interval: How often workers should send a heartbeat; the lease is renewed
            only while the worker was heard from within two of them.
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
    def lease_seconds(self) -> int:
        """The lease's TTL as granted: etcd's whole seconds."""
        return max(int(self.lease_ttl.total_seconds()), 1)

    @property
    def alive_seconds(self) -> int:
        """The whole seconds a session's lease must have left for it to be ALIVE.

        More than ``lease_ttl - 2 * heartbeat_interval`` seconds left means that the lease was
        renewed within two heartbeat intervals. etcd reports what is left in whole seconds,
        rounded down, so the rule reads: at least ``floor(lease_ttl - 2 * heartbeat_interval)``
        whole seconds left, and at least 1 (with a TTL of a few seconds, as in tests, the
        difference may be under a second, and a renewed lease always has a whole second left:
        renewals come at least three times per TTL, and etcd's minimum TTL is 2 s).
        """
        heartbeats = 2 * self.heartbeat_interval.total_seconds()
        return max(math.floor(self.lease_seconds - heartbeats), 1)


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
    """One connected worker stream on this replica.

    Attributes:
        serving: The keys of the nodes the worker serves, from its hello (an empty hash: any).
        lapsed: Its lease is gone, as a claim found out: it takes nothing more, while the keeper
            of its lease ends its stream.
    """

    lease: int
    namespace: str
    record: records_pb2.WorkerRecord
    credit: Credit
    draining: bool = False
    lapsed: bool = False
    held: set[str] = dataclasses.field(default_factory=set)
    snapshots: dict[str, Snapshot] = dataclasses.field(default_factory=dict)
    outbox: asyncio.Queue[ConnectResponse | None] = dataclasses.field(default_factory=asyncio.Queue)
    last_heard: float = dataclasses.field(default_factory=time.monotonic)
    reporting: set[str] = dataclasses.field(default_factory=set)
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    deadlines: Deadlines | None = None
    lists_claims: bool = False
    unlisted: dict[str, int] = dataclasses.field(default_factory=dict)
    checked_at: int = 0
    checking: bool = False
    claiming: int = 0
    """Transactions in flight that may make a claim for it (a dispatch, a result taking its
    successor): such a claim is in etcd before it is held here, while its reply is on its way."""
    claims_begun: int = 0
    """How many such transactions ever began (a check sees whether one overlapped it)."""
    serving: frozenset[Key] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.idle.set()
        self.serving = frozenset((s.workflow, s.node, s.definition_hash) for s in self.record.nodes)

    @contextlib.contextmanager
    def making_claims(self) -> Iterator[None]:
        """Mark a transaction that may claim for this session, until what it claimed is held."""
        self.claiming += 1
        self.claims_begun += 1
        try:
            yield
        finally:
            self.claiming -= 1

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
        return assignment

    def sent(self, response: ConnectResponse) -> None:
        """A frame goes to the worker now: the deadlines of its assignments start."""
        if self.deadlines is not None:
            for assignment in response.assignments:
                timeout = assignment.timeout.ToMilliseconds()
                self.deadlines.start(self, assignment.claim_token, timeout)

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
        """Whether the worker runs this item's node (of this definition, or of any)."""
        return key_of(item) in self.serving or (item.workflow, item.node, "") in self.serving

    @property
    def open(self) -> bool:
        """Whether it takes new work now."""
        return self.credit.available > 0 and not self.draining and not self.lapsed


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
        lease = await self.kv.grant(self.config.lease_seconds)
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
        keys = Keys(namespace)
        value = worker.SerializeToString()
        await self.kv.txn(
            Txn([], [Put(keys.session(lease), value, lease), Put(keys.worker(lease), value)])
        )
        session = Session(
            lease,
            namespace,
            worker,
            credit,
            deadlines=self.deadlines,
            lists_claims=hello.lists_claims,
        )
        self.live[lease] = session
        self._none_live.clear()
        log.info("session %x opened for worker %r in %r", lease, hello.worker_id, namespace)
        return session

    async def keep(self, session: Session) -> None:
        """Renew the lease on evidence that the worker lives; revoke it after a TTL of silence.

        Silence is measured on this replica's monotonic clock from the worker's last message
        (any message counts: :attr:`Session.last_heard`). Every heartbeat interval (at most a
        third of the TTL) the lease is renewed if the worker was heard from within the last
        two heartbeat intervals, and left to run down otherwise. The loop never sleeps past the
        moment the silence reaches the TTL, and then revokes the lease itself: a silent
        worker's session ends within the TTL (plus etcd's answer) of its last message, inside
        the documented bound of the TTL plus one heartbeat interval. Should this replica die,
        etcd ends the lease by itself within a TTL of its last renewal.

        Raises:
            SessionEnded: the worker was silent for a TTL (the lease is revoked), or the lease
                ended otherwise.
        """
        ttl = self.config.lease_ttl.total_seconds()
        heartbeat = self.config.heartbeat_interval.total_seconds()
        interval = min(heartbeat, ttl / 3)
        key = Keys(session.namespace).session(session.lease)
        last_renewed = time.monotonic()
        while True:
            await asyncio.sleep(min(interval, max(session.last_heard + ttl - time.monotonic(), 0)))
            silent = time.monotonic() - session.last_heard
            if silent >= ttl:
                await self._revoke(session)
                raise SessionEnded(
                    f"no message from the worker for {ttl:g} s (the lease TTL): the session "
                    "ended; reconnect for a new session"
                )
            if silent > 2 * heartbeat:
                continue  # no evidence: not renewed; etcd's leader times what is left
            sent = time.monotonic()
            try:
                renewed = await self.kv.keep_alive(session.lease)
            except KVUnavailable as exc:  # the lease may stand: etcd is silent, not the worker
                if time.monotonic() - last_renewed > ttl:
                    raise SessionEnded(
                        "the session's lease could not be renewed for its TTL; reconnect"
                    ) from exc
                log.warning("session %x: lease not renewed yet (%s)", session.lease, exc)
                continue
            if not renewed:
                raise SessionEnded("the session's lease ended; reconnect for a new session")
            last_renewed = sent
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

    async def _revoke(self, session: Session) -> bool:
        """End the session's lease now; whether etcd answered (if not, it ends by its TTL)."""
        try:
            await self.kv.revoke(session.lease)
        except (KVUnavailable, grpc.aio.AioRpcError) as exc:
            log.warning(
                "session %x: lease not revoked (%s); it ends with its TTL", session.lease, exc
            )
            return False
        return True

    async def check_listed(self, session: Session, listed: Collection[str]) -> None:
        """Release the session's claims that its worker's heartbeats keep not listing.

        A claim made before the previous heartbeat's check, listed by neither heartbeat since,
        and not sent on this stream (which loses nothing), never reached the worker: a claim
        this replica never learned it made. It is released without using an attempt. A claim
        made since the previous check may still be on its way, and waits; so does every claim
        while a transaction that may claim for the session is in flight (or began during the
        check): its claim is in etcd before its reply says so, however late that reply is.
        """
        try:
            keys = Keys(session.namespace)
            prefix = keys.claim(session.lease)
            begun = session.claims_begun
            found, revision = await self.kv.range(prefix)
            if session.claiming or session.claims_begun != begun:
                return  # not a miss: what is claimed now may not be held yet; checked next time
            listed = set(listed)
            unlisted: dict[str, int] = {}
            for claim in found:
                token = claim.value.decode(errors="replace")  # a claim key holds its token
                if not _is_token(token):
                    continue  # an older storage format's claim: released with its session
                if token in listed or token in session.held or token in session.reporting:
                    continue  # listed; or sent on this stream, which loses nothing
                if claim.create_revision <= session.checked_at:
                    unlisted[token] = session.unlisted.get(token, 0) + 1
            session.unlisted, session.checked_at = unlisted, revision
            for token, misses in unlisted.items():
                if misses < 2:
                    continue
                released = await self.claims.release_unreceived(
                    session.namespace, ClaimToken.parse(token)
                )
                if released:
                    log.warning("claim %s was never received by its worker: re-queued", token)
        except (KVUnavailable, grpc.aio.AioRpcError) as exc:  # checked again next heartbeat
            log.info("session %x: claims not checked (%s)", session.lease, exc)
        finally:
            session.checking = False

    async def close(self, session: Session) -> None:
        """The stream ended: end the session now, so that its claims are re-queued at once.

        Its durable record gets its ``ended_at``, with the session's last state. If etcd does
        not answer, the lease ends by itself within its TTL, and a replica that sees it end (or
        the reconcile sweep) stamps the record.
        """
        try:
            if await self._revoke(session):
                await self._record_end(session.namespace, session.lease, session.record)
        except (KVUnavailable, grpc.aio.AioRpcError) as exc:
            log.warning("session %x: its end not recorded (%s)", session.lease, exc)
        finally:
            self.live.pop(session.lease, None)
            for token in session.held:  # released with the session, as WORKER_LOST
                self.deadlines.stop(token)
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

    async def _record_end(
        self, namespace: str, lease: int, latest: records_pb2.WorkerRecord | None = None
    ) -> bool:
        """Stamp an ended session's durable record with ``ended_at`` (a time for people), once.

        Guarded by the record's revision, so it never recreates a record retention removed,
        nor stamps one twice. ``latest``: the session's last state, written with it.

        Returns:
            Whether this call stamped it.
        """
        key = Keys(namespace).worker(lease)
        for _ in range(3):  # only another replica stamping the same end moves it
            found = await self.kv.get(key)
            if found is None:
                return False
            record = records_pb2.WorkerRecord.FromString(found.value)
            if record.HasField("ended_at"):
                return False
            if latest is not None:
                record.CopyFrom(latest)
            record.ClearField("liveness")
            record.ended_at.GetCurrentTime()
            stamped = await self.kv.txn(
                Txn(
                    [Compare.modified_at(key, found.mod_revision)],
                    [Put(key, record.SerializeToString())],
                )
            )
            if stamped.succeeded:
                return True
        return False

    async def release(self, namespace: str, lease: int) -> int:
        """A session ended: stamp its record's end, and re-queue every claim it held.

        Returns:
            How many claims this call released.
        """
        await self._record_end(namespace, lease)
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
                    await self.release(namespace, _lease_of(event.kv.key, keys.session()))
        finally:
            updates.close()

    async def release_orphans(self, namespace: str) -> None:
        """Release sessions that ended unseen (while no replica watched, or in a crash).

        Their claims are re-queued, and their durable records without ``ended_at`` stamped.
        """
        keys = Keys(namespace)
        claims, _ = await self.kv.range(keys.claims)
        records, _ = await self.kv.range(keys.worker())
        leases = {int(kv.key[len(keys.claims) :].split(b"/")[0], 16) for kv in claims}
        leases |= {
            _lease_of(kv.key, keys.worker())
            for kv in records
            if not records_pb2.WorkerRecord.FromString(kv.value).HasField("ended_at")
        }
        # Read after the claims and records: a session that ended in between is seen ended.
        sessions, _ = await self.kv.range(keys.session())
        for lease in sorted(leases - {_lease_of(kv.key, keys.session()) for kv in sessions}):
            await self.release(namespace, lease)

    async def list(
        self, namespace: str, *, include_dead: bool = False
    ) -> list[records_pb2.WorkerRecord]:
        """The namespace's live sessions (and, with ``include_dead``, those that ended).

        Liveness is the lease's time left as etcd's leader times it (asked for every session
        at once): ALIVE with at least :attr:`SessionConfig.alive_seconds` left, STALE with
        less; a session whose lease is gone is not live. ``current_items`` are the session's
        claim keys, read now. Ended sessions come from their durable records, DEAD, newest
        first, until retention removes them.
        """
        keys = Keys(namespace)
        kept: list[KeyValue] = []
        if include_dead:  # read before the sessions: one that ends in between is still listed
            kept, _ = await self.kv.range(keys.worker())
        found, _ = await self.kv.range(keys.session())
        leases = [_lease_of(entry.key, keys.session()) for entry in found]
        ttls, held = await asyncio.gather(
            asyncio.gather(*(self.kv.time_to_live(lease) for lease in leases)),
            asyncio.gather(*(self.kv.range(keys.claim(lease)) for lease in leases)),
        )
        workers = []
        live = set()
        for entry, lease, ttl, (claims, _) in zip(found, leases, ttls, held, strict=True):
            if ttl is None:
                continue  # its lease ended since the read: not live
            live.add(lease)
            record = records_pb2.WorkerRecord.FromString(entry.value)
            record.liveness = (
                records_pb2.LIVENESS_STATUS_ALIVE
                if ttl >= self.config.alive_seconds
                else records_pb2.LIVENESS_STATUS_STALE
            )
            prefix = keys.claim(lease)
            for claim in claims:
                run_id, item_id = claim.key[len(prefix) :].decode().split("/")
                record.current_items.add(namespace=namespace, run_id=run_id, item_id=item_id)
            if record.status != records_pb2.WORKER_STATUS_DRAINING:
                record.status = (
                    records_pb2.WORKER_STATUS_BUSY
                    if record.current_items
                    else records_pb2.WORKER_STATUS_IDLE
                )
            workers.append(record)
        ended = []
        for entry in kept:
            if _lease_of(entry.key, keys.worker()) not in live:
                record = records_pb2.WorkerRecord.FromString(entry.value)
                record.liveness = records_pb2.LIVENESS_STATUS_DEAD
                ended.append(record)
        ended.sort(key=lambda record: record.ended_at.ToNanoseconds(), reverse=True)
        return workers + ended


def _lease_of(key: bytes, prefix: bytes) -> int:
    """The lease a session's key (or its durable record's) names."""
    return int(key[len(prefix) :], 16)


def _is_token(value: str) -> bool:
    try:
        ClaimToken.parse(value)
    except ClaimLost:
        return False
    return True
