"""``WorkerService.Connect``: one bidirectional stream per worker, a session on an etcd lease.

The worker says hello; the server grants a lease, writes the session key on it (the only key a
lease carries) and answers with the session's parameters. The server renews the lease only while
it hears from the worker (within two heartbeat intervals), and revokes it after a TTL of silence;
etcd deletes the session key, and every replica's expiry watch re-queues the session's claims.
Results are acknowledged in-band; only faults of the stream as a whole end it with a status (see
``worker_service.proto``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from floxide_grpc._proto.floxide.v1 import worker_service_pb2
from floxide_grpc._version import PROTOCOL_VERSION
from floxide_grpc.errors import (
    ClaimLost,
    FloxideError,
    InvalidArgument,
    PermissionDenied,
    StatusCode,
    Unauthenticated,
    Unavailable,
)
from floxide_server.auth import current
from floxide_server.dispatch import Dispatcher
from floxide_server.rates import Counts
from floxide_server.ready import Queued
from floxide_server.sessions import Session, SessionConfig, Sessions
from floxide_server.store import Store
from floxide_server.store.claims import ClaimToken
from floxide_server.store.completion import MAX_CHAIN, Sticky
from floxide_server.store.kv import KVUnavailable
from floxide_server.store.payloads import Limits
from floxide_server.tasks import first_done, first_error
from floxide_server.tokens import Principal, Tokens

__all__ = ["WorkerService", "add_worker_service"]

log = logging.getLogger(__name__)

ConnectRequest = worker_service_pb2.ConnectRequest
ConnectResponse = worker_service_pb2.ConnectResponse
Spawn = Callable[[Coroutine[Any, Any, None]], None]
"""Start a piece of a frame's work (its results applied, its claims checked) in the session's
results group: concurrent with the stream's next messages, finished before the stream ends."""


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
        store: Store,
        sessions: Sessions,
        dispatcher: Dispatcher,
        limits: Limits,
        config: SessionConfig,
        server_id: str,
        tokens: Tokens | None = None,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.limits = limits
        self.config = config
        self.server_id = server_id
        self.tokens = tokens
        self.streams = Counts(limits.max_streams_per_token)

    async def Connect(
        self,
        requests: AsyncIterator[ConnectRequest | None],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ConnectResponse]:
        """Serve one worker stream (see the module's docstring).

        The stream's tasks run in :meth:`_serve`, in a task of this handler's own (never across
        a ``yield``, where grpc runs the handler): a fault of the stream ends this stream only,
        with its status; its end lets the results being applied finish, bounded by the TTL.
        """
        try:
            async with asyncio.timeout(self.config.hello_timeout.total_seconds()):
                first = await anext(requests, None)
        except TimeoutError as exc:
            raise InvalidArgument("no hello within the hello timeout") from exc
        if first is None or not first.HasField("hello"):
            raise InvalidArgument("the first message of a worker stream must be a hello")
        principal = current()
        namespace = first.hello.namespace or "default"  # as every request spells it
        if principal is not None and not principal.may_name(namespace):
            raise PermissionDenied(f"the token may not serve namespace {namespace!r}")
        holder = principal.token_id if principal is not None else ""
        if holder:  # with auth off, no token to count them by
            self.streams.open(holder, f"the token {holder}'s worker streams")
        try:
            session = self._session(first, requests, principal)
            async with contextlib.aclosing(session) as responses:  # closed now, not by the GC
                async for response in responses:
                    yield response
        finally:
            if holder:
                self.streams.close(holder)

    async def _session(
        self,
        first: ConnectRequest,
        requests: AsyncIterator[ConnectRequest | None],
        principal: Principal | None,
    ) -> AsyncGenerator[ConnectResponse, None]:
        """The session of a stream whose hello was admitted: opened, served, closed."""
        session = await self.sessions.open(first.hello)
        try:
            self.dispatcher.add(session)
            yield ConnectResponse(hello_ack=self._ack(session))
            closing = asyncio.Event()
            serving = asyncio.create_task(self._serve(session, first, requests, closing, principal))
            try:
                async for response in _outgoing(session, serving):
                    yield response
            finally:
                closing.set()  # stop reading and renewing; results in flight finish
                await asyncio.wait([serving])
                if not serving.cancelled():
                    serving.exception()  # a fault already ended the stream with its status
        finally:
            await self.sessions.close(session)

    async def _serve(
        self,
        session: Session,
        first: ConnectRequest,
        requests: AsyncIterator[ConnectRequest | None],
        closing: asyncio.Event,
        principal: Principal | None = None,
    ) -> None:
        """Read the stream and keep the session's lease until the stream ends or ``closing``.

        The stream ends UNAUTHENTICATED when its token (``principal``'s) is revoked or expires.

        The reader and the lease keeper are one task group: a fault of either ends both, and
        is raised here. Results are applied in a group of their own, which that does not cut
        short: they finish (within a lease TTL) before this returns.

        Raises:
            FloxideError: a fault of the stream (garbage, a credit overrun, the lease ended).
        """
        applying: set[asyncio.Task[None]] = set()
        fault: BaseException | None = None
        async with asyncio.TaskGroup() as results:

            def apply(work: Coroutine[Any, Any, None]) -> None:
                task = results.create_task(work)
                applying.add(task)
                task.add_done_callback(applying.discard)

            try:
                async with asyncio.TaskGroup() as stream:
                    self._take(session, apply, first, skip_hello=True)
                    reader = stream.create_task(self._read(session, apply, requests))
                    keeper = stream.create_task(self.sessions.keep(session))
                    revoked = stream.create_task(self._until_revoked(principal))
                    await first_done([reader, asyncio.ensure_future(closing.wait())])
                    keeper.cancel()
                    revoked.cancel()
            except BaseExceptionGroup as group:
                fault = first_error(group)
            if applying:
                await asyncio.wait(set(applying), timeout=self.config.lease_ttl.total_seconds())
                for task in applying:
                    task.cancel()
        if fault is not None:
            raise fault

    async def _until_revoked(self, principal: Principal | None) -> None:
        """Raise once the stream's token is revoked or expires (never, with auth off)."""
        if principal is None or self.tokens is None:
            await asyncio.Future()
            return
        await self.tokens.ended(principal)
        raise Unauthenticated(f"the token {principal.token_id} was revoked or has expired")

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

    async def _read(
        self, session: Session, apply: Spawn, requests: AsyncIterator[ConnectRequest | None]
    ) -> None:
        async for request in requests:
            self._take(session, apply, request)

    def _take(
        self,
        session: Session,
        apply: Spawn,
        request: ConnectRequest | None,
        *,
        skip_hello: bool = False,
    ) -> None:
        if request is None:
            raise InvalidArgument("a message of the stream does not parse as a ConnectRequest")
        session.last_heard = time.monotonic()
        if request.HasField("hello") and not skip_hello:
            raise InvalidArgument("hello is allowed in the first message only")
        if request.credit:
            session.credit.grant(request.credit, len(session.held))
            session.record.slots += request.credit
        if request.results:
            tokens = {r.claim_token for r in request.results} & session.held
            session.report(tokens)  # no cancel for them, and a drain waits for their acks
            # Applied concurrently with the stream's next messages: one slow Txn must not hold
            # up the session's other results, nor its heartbeats.
            apply(self._results(session, list(request.results), tokens))
        if request.HasField("heartbeat") and session.lists_claims and not session.checking:
            session.checking = True  # one check at a time: a slow etcd skips heartbeats
            apply(self.sessions.check_listed(session, request.heartbeat.held_claim_tokens))
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
            returned = 0
            for ack, assignment, revision, slot in applied:
                returned += slot
                response.result_acks.append(ack)
                if assignment is not None:  # the successor, claimed with the result (sticky)
                    response.assignments.append(assignment)
                    ended = self.dispatcher.cancel_if_ended(
                        session.namespace, assignment.claim_token, revision
                    )
                    if ended is not None:  # after its assignment, in the same frame
                        response.cancels.append(ended)
            session.outbox.put_nowait(response)
            # Only now: an assignment in a slot a result returned goes after the result's
            # acknowledgement (a worker applying result_acks first never sees more held than
            # its credit, whatever frames the outbox merges).
            for _ in range(returned):
                session.credit.give_back()
        finally:
            session.report(tokens, done=True)
            self.dispatcher.wake(session.namespace)

    async def _result(
        self, session: Session, result: worker_service_pb2.StepResult
    ) -> tuple[worker_service_pb2.ResultAck, worker_service_pb2.Assignment | None, int, bool]:
        """Apply one result; its successor's assignment comes back too if the session took it.

        The successor is taken in the completing Txn when this session holds the claim, is not
        draining, serves the successor's node and has not chained ``MAX_CHAIN`` steps in a row:
        the result's slot goes straight to the next step of its chain.

        Returns:
            The acknowledgement, the successor's assignment and its claim's revision, and
            whether the result's slot is to be given back once the acknowledgement is queued.
        """
        ack = worker_service_pb2.ResultAck(claim_token=result.claim_token)
        held = result.claim_token in session.held
        refused = _refused(result, session.lease)
        if refused:  # nothing changes: a claim held stays held, for a result that names it
            ack.code, ack.message, ack.reason = ClaimLost.code, refused, ClaimLost.reason
            return ack, None, 0, False
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
        assignment, revision = None, 0
        with session.making_claims():  # its successor is in etcd before the reply says so
            try:
                completion = await self.store.completions.complete(
                    session.namespace,
                    result.claim_token,
                    result.transition,
                    result.context_operations,
                    snapshot=snapshot,
                    sticky=sticky,
                )
            except (KVUnavailable, Unavailable) as exc:
                ack.code, ack.message = StatusCode.UNAVAILABLE, f"not applied, send it again: {exc}"
                ack.reason = Unavailable.reason
                return ack, None, 0, False  # still held, and so is its slot
            except FloxideError as exc:  # ClaimLost, AlreadyExists, InvalidArgument and others
                ack.code, ack.message, ack.reason = exc.code, str(exc), exc.reason
            except Exception:  # one bad result must not end the stream of the others
                log.exception("result of %s could not be applied", result.item_id)
                ack.code, ack.message = StatusCode.INTERNAL, "internal error (logged by the server)"
                ack.reason = FloxideError.reason
            else:
                ack.code, ack.message = completion.code, completion.message
                ack.reason = completion.reason
                if completion.claim is not None:  # the result's slot goes to the successor
                    assignment = session.assign(completion.claim)
                    revision = completion.claim.revision
        if held:
            session.drop(result.claim_token)
        # Its slot comes back (once acknowledged), unless the successor took it; a repeat of an
        # answered result returns none.
        return ack, assignment, revision, assignment is None and held

    async def drain(self, grace: timedelta) -> None:
        """Tell every session of this replica to drain, and wait for what they hold (bounded)."""
        for session in list(self.sessions.live.values()):
            drain = worker_service_pb2.Drain(reason="the server is shutting down")
            drain.grace.FromTimedelta(grace)
            session.draining = True
            session.outbox.put_nowait(ConnectResponse(drain=drain))
        waits = [
            asyncio.ensure_future(s.idle.wait())
            for s in self.sessions.live.values()
            if not s.idle.is_set()
        ]
        try:
            if waits:
                await asyncio.wait(waits, timeout=grace.total_seconds())
        finally:
            for wait in waits:
                wait.cancel()
        for session in list(self.sessions.live.values()):
            session.outbox.put_nowait(None)


async def _outgoing(
    session: Session, serving: asyncio.Task[None]
) -> AsyncIterator[ConnectResponse]:
    """The session's outbox as the response stream, until its end or a fault of the stream."""
    while True:
        if not session.outbox.empty() and not serving.done():
            response = session.outbox.get_nowait()  # no wait needed: the common case under load
        else:
            message = asyncio.ensure_future(session.outbox.get())
            try:
                await asyncio.wait([message, serving], return_when=asyncio.FIRST_COMPLETED)
            finally:
                message.cancel()  # a no-op once it has its message
            if not message.done() or message.cancelled():
                serving.result()  # a stream fault ends the stream with its status
                while not session.outbox.empty():  # the worker closed its side: flush
                    response = session.outbox.get_nowait()
                    if response is not None:
                        yield response
                return
            response = message.result()
        if response is None:
            return
        response = _coalesced(session, response)
        session.sent(response)
        yield response


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


def _refused(result: worker_service_pb2.StepResult, lease: int) -> str:
    """Why a result names no claim of this session ("" if it may).

    Its token is malformed or another session's, or the result's run, item or attempt are not
    its token's. Such a result is refused FAILED_PRECONDITION and records nothing (never
    INVALID_ARGUMENT, which would record a failed attempt of someone else's item).
    """
    try:
        claim = ClaimToken.parse(result.claim_token)
    except ClaimLost as exc:
        return str(exc)
    if claim.lease != lease:
        return "this session does not hold that claim (it is another session's)"
    named = (result.run_id, result.item_id, result.attempt)
    if named != (claim.run_id, claim.item_id, claim.attempt):
        return (
            f"the result names run {result.run_id!r}, item {result.item_id!r}, attempt "
            f"{result.attempt}, but its claim token names run {claim.run_id!r}, item "
            f"{claim.item_id!r}, attempt {claim.attempt}: nothing recorded"
        )
    return ""


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
