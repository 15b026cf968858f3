"""``WorkerService.Connect``: one bidirectional stream per worker, a session on an etcd lease.

The worker says hello; the server grants a lease, writes the session key on it (the only key a
lease carries) and answers with the session's parameters. While the worker is heard from, the
server renews the lease; when it is not heard from for a TTL, the server stops renewing and the
lease ends in etcd, which deletes the session key, and every replica's expiry watch re-queues
the session's claims. Results are acknowledged in-band; only faults of the stream as a whole end
it with a status (see ``worker_service.proto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from floxide_grpc import PROTOCOL_VERSION
from floxide_grpc._proto.floxide.v1 import records_pb2, worker_service_pb2
from floxide_grpc.errors import (
    AlreadyExists,
    ClaimLost,
    FailedPrecondition,
    FloxideError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SessionEnded,
    StatusCode,
    Unavailable,
    WorkflowNotFound,
)
from floxide_server.dispatch import Dispatcher, Queued, Session
from floxide_server.store import Store
from floxide_server.store.claims import ClaimToken
from floxide_server.store.completion import MAX_CHAIN, Sticky
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, KVUnavailable, Put, Txn
from floxide_server.store.payloads import Limits, namespace_of
from floxide_server.store.workflows import WorkflowStore

__all__ = ["SessionConfig", "WorkerService", "add_worker_service"]

log = logging.getLogger(__name__)

ConnectRequest = worker_service_pb2.ConnectRequest
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
    """

    lease_ttl: timedelta = timedelta(seconds=10)
    heartbeat_interval: timedelta = timedelta(seconds=3)
    max_credit: int = 1024
    hello_timeout: timedelta = timedelta(seconds=10)


def _parse(data: bytes) -> ConnectRequest | None:
    """Deserialize leniently: garbage becomes ``None`` and ends the stream as INVALID_ARGUMENT."""
    try:
        return ConnectRequest.FromString(data)
    except DecodeError:
        return None


class WorkerService:
    """The worker stream's servicer."""

    def __init__(
        self,
        kv: KV,
        workflows: WorkflowStore,
        store: Store,
        dispatcher: Dispatcher,
        limits: Limits,
        config: SessionConfig,
        server_id: str,
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.store = store
        self.dispatcher = dispatcher
        self.limits = limits
        self.config = config
        self.server_id = server_id

    async def Connect(
        self,
        requests: AsyncIterator[ConnectRequest | None],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ConnectResponse]:
        """Serve one worker stream (see the module's docstring)."""
        try:
            async with asyncio.timeout(self.config.hello_timeout.total_seconds()):
                first = await anext(requests, None)
        except TimeoutError as exc:
            raise InvalidArgument("no hello within the hello timeout") from exc
        if first is None or not first.HasField("hello"):
            raise InvalidArgument("the first message of a worker stream must be a hello")
        session = await self._open(first.hello)
        try:
            yield ConnectResponse(hello_ack=self._ack(session))
            await self._take(session, first, skip_hello=True)
            reader = asyncio.create_task(self._read(session, requests))
            keeper = asyncio.create_task(self._keep(session))
            try:
                async for response in _outgoing(session, reader, keeper):
                    yield response
            finally:
                for task in (reader, keeper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            await self._close(session)

    async def _open(self, hello: worker_service_pb2.Hello) -> Session:
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
        if hello.credit > self.config.max_credit:
            raise ResourceExhausted(
                f"credit {hello.credit} is over the limit of {self.config.max_credit}"
            )
        ttl = max(int(self.config.lease_ttl.total_seconds()), 1)
        lease = await self.kv.grant(ttl)
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
        session = Session(lease, namespace, worker, hello.credit, self.config.max_credit)
        self.dispatcher.add(session)
        log.info("session %x opened for worker %r in %r", lease, hello.worker_id, namespace)
        return session

    def _ack(self, session: Session) -> worker_service_pb2.HelloAck:
        ack = worker_service_pb2.HelloAck(
            session_id=session.record.session_id,
            protocol_version=PROTOCOL_VERSION,
            server_id=self.server_id,
            max_payload_bytes=self.limits.max_payload_bytes,
            max_credit=self.config.max_credit,
        )
        ack.lease_ttl.FromTimedelta(self.config.lease_ttl)
        ack.heartbeat_interval.FromTimedelta(self.config.heartbeat_interval)
        return ack

    async def _read(self, session: Session, requests: AsyncIterator[ConnectRequest | None]) -> None:
        async for request in requests:
            await self._take(session, request)

    async def _take(
        self, session: Session, request: ConnectRequest | None, *, skip_hello: bool = False
    ) -> None:
        if request is None:
            raise InvalidArgument("a message of the stream does not parse as a ConnectRequest")
        session.last_heard = time.monotonic()
        if request.HasField("hello") and not skip_hello:
            raise InvalidArgument("hello is allowed in the first message only")
        if request.credit:
            session.credit += request.credit
            if session.credit + len(session.held) > session.max_credit:
                raise ResourceExhausted(
                    f"credit {session.credit + len(session.held)} is over the limit of "
                    f"{session.max_credit}"
                )
            session.record.slots += request.credit
        if request.results:
            tokens = {r.claim_token for r in request.results} & session.held
            session.report(tokens)  # no cancel for them, and a drain waits for their acks
            # Applied concurrently with the stream's next messages: one slow Txn must not hold
            # up the session's other results, nor its heartbeats.
            task = asyncio.create_task(self._results(session, list(request.results), tokens))
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
        if request.HasField("drain"):
            session.draining = True
            log.info("worker of session %x is draining", session.lease)
        self.dispatcher.wake(session.namespace)

    async def _results(
        self, session: Session, results: list[worker_service_pb2.StepResult], tokens: set[str]
    ) -> None:
        try:
            response = ConnectResponse()
            # A frame may carry several results: applied concurrently (group commit batches
            # them), unless one claim is repeated, whose second answer depends on the first.
            if len({r.claim_token for r in results}) == len(results):
                applied = await asyncio.gather(*(self._result(session, r) for r in results))
            else:
                applied = [await self._result(session, r) for r in results]
            for ack, assignment in applied:
                response.result_acks.append(ack)
                if assignment is not None:  # the successor, claimed with the result (sticky)
                    response.assignments.append(assignment)
            session.outbox.put_nowait(response)
        finally:
            session.report(tokens, done=True)
            self.dispatcher.wake(session.namespace)

    async def _result(
        self, session: Session, result: worker_service_pb2.StepResult
    ) -> tuple[worker_service_pb2.ResultAck, worker_service_pb2.Assignment | None]:
        """Apply one result; its successor's assignment comes back too if the session took it.

        The successor is taken in the completing Txn when this session holds the claim, is not
        draining, serves the successor's node and has not chained ``MAX_CHAIN`` steps in a row:
        the result's slot goes straight to the next step of its chain.
        """
        ack = worker_service_pb2.ResultAck(claim_token=result.claim_token)
        held = result.claim_token in session.held
        if not held and not _of_session(result.claim_token, session.lease):
            ack.code = StatusCode.FAILED_PRECONDITION
            ack.message = "this session does not hold that claim (it is another session's)"
            return ack, None
        snapshot = session.snapshots.get(result.claim_token)
        sticky = None
        if held and not session.draining and (snapshot is None or snapshot.depth < MAX_CHAIN):
            namespace = session.namespace
            sticky = Sticky(
                session.lease,
                session.serves,
                take=lambda: self.dispatcher.take(session),
                give_back=lambda queued: self.dispatcher.give_back(namespace, Queued(*queued)),
            )
        claim = None
        try:
            completion = await self.store.completions.complete(
                session.namespace,
                result.claim_token,
                result.transition,
                result.context_operations,
                snapshot=snapshot,
                sticky=sticky,
            )
            ack.code, ack.message, claim = completion.code, completion.message, completion.claim
        except (KVUnavailable, Unavailable) as exc:
            ack.code, ack.message = StatusCode.UNAVAILABLE, f"not applied, send it again: {exc}"
            return ack, None  # still held, and so is its slot
        except (ClaimLost, AlreadyExists, InvalidArgument, NotFound, ResourceExhausted) as exc:
            ack.code, ack.message = exc.code, str(exc)
        except FloxideError as exc:
            ack.code, ack.message = exc.code, str(exc)
        except Exception:  # one bad result must not end the stream of the others
            log.exception("result of %s could not be applied", result.item_id)
            ack.code, ack.message = StatusCode.INTERNAL, "internal error (logged by the server)"
        assignment = None
        if claim is not None:  # the result's slot goes to the successor
            assignment = session.assign(claim)
        elif held:  # a repeat of an answered result returns no slot
            session.credit += 1
        if held:
            session.drop(result.claim_token)
        return ack, assignment

    async def _keep(self, session: Session) -> None:
        """Renew the lease while the worker is heard from; end the stream when it has ended."""
        ttl = self.config.lease_ttl.total_seconds()
        interval = min(self.config.heartbeat_interval.total_seconds(), ttl / 3)
        keys = Keys(session.namespace)
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - session.last_heard > ttl:
                # Silent for a whole TTL: stop renewing. etcd ends the lease on its own clock.
                if await self.kv.get(keys.session(session.lease)) is None:
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
            key = keys.session(session.lease)
            await self.kv.txn(
                Txn(
                    [Compare.exists(key)],
                    [Put(key, session.record.SerializeToString(), session.lease)],
                )
            )

    async def _close(self, session: Session) -> None:
        """The stream ended: end the session now, so its claims are re-queued at once."""
        self.dispatcher.remove(session)
        if session.tasks:  # results being applied finish first (bounded)
            await asyncio.wait(set(session.tasks), timeout=self.config.lease_ttl.total_seconds())
        with contextlib.suppress(KVUnavailable, grpc.aio.AioRpcError):
            await self.kv.revoke(session.lease)
        log.info("session %x closed (%d claims left to re-queue)", session.lease, len(session.held))

    async def drain(self, grace: timedelta) -> None:
        """Tell every session of this replica to drain, and wait for what they hold (bounded)."""
        for session in list(self.dispatcher.sessions.values()):
            drain = worker_service_pb2.Drain(reason="the server is shutting down")
            drain.grace.FromTimedelta(grace)
            session.draining = True
            session.outbox.put_nowait(ConnectResponse(drain=drain))
        waits = [
            asyncio.ensure_future(s.idle.wait())
            for s in self.dispatcher.sessions.values()
            if not s.idle.is_set()
        ]
        if waits:
            _, late = await asyncio.wait(waits, timeout=grace.total_seconds())
            for wait in late:
                wait.cancel()
        for session in list(self.dispatcher.sessions.values()):
            session.outbox.put_nowait(None)


async def _outgoing(
    session: Session, reader: asyncio.Task[None], keeper: asyncio.Task[None]
) -> AsyncIterator[ConnectResponse]:
    """The session's outbox as the response stream, until its end or a fault of the stream."""
    while True:
        if not session.outbox.empty() and not reader.done() and not keeper.done():
            response = session.outbox.get_nowait()  # no wait needed: the common case under load
            if response is None:
                return
            yield _coalesced(session, response)
            continue
        message = asyncio.ensure_future(session.outbox.get())
        done, _ = await asyncio.wait({message, reader, keeper}, return_when=asyncio.FIRST_COMPLETED)
        if message in done:
            response = message.result()
            if response is None:
                return
            yield _coalesced(session, response)
            continue
        message.cancel()
        for task in done:
            task.result()  # a stream fault ends the stream with its status
        while not session.outbox.empty():  # the worker closed its side: flush
            response = session.outbox.get_nowait()
            if response is not None:
                yield response
        return


def _coalesced(session: Session, response: ConnectResponse) -> ConnectResponse:
    """The response with whatever else already waits in the outbox: one frame, one write.

    The end of the stream (``None``) stays in the outbox for the loop to see.
    """
    while not session.outbox.empty():
        more = session.outbox.get_nowait()
        if more is None:
            session.outbox.put_nowait(None)  # nothing follows the end: it may go last
            break
        response.MergeFrom(more)
    return response


def _of_session(token: str, lease: int) -> bool:
    """Whether a token names a claim of this session (a malformed one names none)."""
    try:
        return ClaimToken.parse(token).lease == lease
    except InvalidArgument:
        return False


def add_worker_service(server: grpc.aio.Server, service: WorkerService) -> None:
    """Register the worker stream with a lenient request parser (see :func:`_parse`)."""
    handler = grpc.method_handlers_generic_handler(
        "floxide.v1.WorkerService",
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                service.Connect,
                request_deserializer=_parse,
                response_serializer=ConnectResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
