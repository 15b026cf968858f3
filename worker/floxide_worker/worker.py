"""The worker: one stream to a server, work pushed within its credit, results reported in-band.

A :class:`Worker` registers its workflows, opens ``WorkerService.Connect``, says hello with the
nodes it serves and its slots as credit, and runs each assignment with
:func:`floxide_grpc._execute.attempt` (async nodes on the loop, sync nodes in threads). Each
result goes back with its claim token; the server's in-band acknowledgement says whether it was
applied. Heartbeats keep the session's lease alive. When the stream breaks, the worker
reconnects with backoff and gets a new session; what it was running goes on, and its results are
sent on the new stream (the server refuses them if their claims were re-queued meanwhile).
``shutdown()`` drains: nothing new is taken, what is held is finished and reported, then the
stream is closed.

**Credit** (docs/protocol.md, "A worker's duties" 5-6): a slot is busy while its item runs, and
while the server holds its claim for this session, until the result's acknowledgement (the
server returns the slot, or passes it to a successor). The hello grants the slots not running
anything, whatever results wait for their acknowledgement: those are refused by any later
session and take none of its slots. An item of an earlier session that finishes after the hello
frees its slot then, with ``credit: 1`` on its result, once; a result sent again never carries
credit. So the credit granted to the current session plus the items of earlier sessions still
running never pass ``slots``.

**Held claims.** The hello sets ``lists_claims``, and every heartbeat lists the claim tokens of
the current session the worker holds: running, or reported and not yet acknowledged. The server
may release a claim of the session that heartbeats leave out (an assignment that never arrived).

Every task the worker starts has an owner that outlives it (:class:`_Scope`, an
``asyncio.TaskGroup``): the ``run()`` task belongs to the ``async with`` block, each item's
execution to ``run()``, each stream's heartbeat to that stream. When an owner ends, what it still
runs is cancelled and awaited, so nothing is left pending when the loop closes, and a failure
comes out of its owner instead of waiting for the garbage collector to log it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
import typing
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc

from floxide_grpc._auth import bearer, token_from_env
from floxide_grpc._execute import AttemptFailed, attempt
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import (
    records_pb2,
    work_item_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from floxide_grpc._status import error_from_rpc
from floxide_grpc._version import PROTOCOL_VERSION, __version__
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.errors import (
    FailedPrecondition,
    FloxideError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StatusCode,
    Unauthenticated,
    Unavailable,
)
from floxide_grpc.node import NodeKind
from floxide_grpc.tls import Tls, open_channel
from floxide_grpc.workflow import Workflow

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger(__name__)

ConnectRequest = worker_service_pb2.ConnectRequest

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """How a worker connects and behaves.

    Attributes:
        server: ``host:port`` of a server (any replica), or of several, comma-separated: after
            a connection fails, the worker tries the next (a replica killed, or cut from etcd,
            is left for one that serves).
        namespace: The namespace it serves.
        slots: How many items it runs at once (its credit).
        worker_id: Its name in liveness records.
        reconnect_backoff: The first wait before reconnecting; it doubles up to ``max_backoff``.
        max_backoff: The longest wait between reconnects.
        drain_grace: How long ``shutdown()`` waits for held items.
        nodes: Serve only these nodes (by name); empty serves every node of the workflows.
            Nodes implemented in another language are left to its workers.
        tls: TLS to the server; ``None``: plain text. Its files are read at each connection,
            so a rotated client certificate is taken at the next reconnect.
        token: The bearer token it calls with; ``None``: ``FLOXIDE_TOKEN``. Refused
            (UNAUTHENTICATED or PERMISSION_DENIED), the worker stops with the reason.
    """

    server: str
    namespace: str = "default"
    slots: int = 8
    worker_id: str = dataclasses.field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}"
    )
    reconnect_backoff: timedelta = timedelta(milliseconds=100)
    max_backoff: timedelta = timedelta(seconds=5)
    drain_grace: timedelta = timedelta(seconds=30)
    nodes: frozenset[str] = frozenset()
    tls: Tls | None = None
    token: str | None = None


@dataclasses.dataclass
class _Reported:
    """A result sent (or to send) and not yet acknowledged."""

    result: worker_service_pb2.StepResult
    session_id: str
    """The session whose claim it reports."""
    stream: _Stream | None = None
    """The stream it was last sent on."""


@dataclasses.dataclass
class _Held:
    """An assignment being run (its result, once reported, is a :class:`_Reported`)."""

    assignment: worker_service_pb2.Assignment
    session_id: str
    cancel: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    received: float = dataclasses.field(default_factory=time.monotonic)
    """When it arrived: its timeout counts from then, on this process's monotonic clock."""


class _Scope:
    """Tasks that live no longer than the block owning them (an ``asyncio.TaskGroup``).

    Leaving the block (returning, raising, or cancelled) cancels the tasks still running and
    waits for them. The block's own exception comes out as itself (a bare ``TaskGroup`` would
    wrap it in an ``ExceptionGroup``). A task that is cancelled ends alone, as in a
    ``TaskGroup``; a task that fails cancels the block and the other tasks, and its exception
    comes out of the block: as itself when it is the only one, else in an ``ExceptionGroup``.
    """

    def __init__(self) -> None:
        self._group = asyncio.TaskGroup()
        self._running: set[asyncio.Task[Any]] = set()

    def start(self, coroutine: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run ``coroutine`` as a task of this scope."""
        task = self._group.create_task(coroutine, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def __aenter__(self) -> _Scope:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._running:
            task.cancel()
        if isinstance(exc, Exception):  # the block's own failure: not the group's to wrap
            exc_type, exc, tb = None, None, None
        try:
            await self._group.__aexit__(exc_type, exc, tb)
            return
        except BaseExceptionGroup as group:
            if len(group.exceptions) > 1:
                raise
            failed = group.exceptions[0]
        context = failed.__context__
        try:
            raise failed
        finally:  # raising here chains it to the block's CancelledError: keep its own context
            failed.__context__ = context


class _Stream:
    """One connection: its outbox, session and acknowledgements."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[ConnectRequest | None] = asyncio.Queue()
        self.session_id = ""
        self.heartbeat = 3.0

    async def requests(self) -> AsyncIterator[ConnectRequest]:
        """The outbox as the request stream; what waits together goes in one frame."""
        while (request := await self.outbox.get()) is not None:
            while not request.HasField("hello") and not self.outbox.empty():
                more = self.outbox.get_nowait()
                if more is None:
                    yield request
                    return
                credit = request.credit + more.credit  # incremental: merged frames add up
                request.MergeFrom(more)
                request.credit = credit
                if more.HasField("heartbeat"):  # the later one, not both lists of claims
                    request.heartbeat.CopyFrom(more.heartbeat)
            yield request


class Worker:
    """Runs the nodes of some workflows for a server. ``run()``, ``shutdown()``, or ``async with``.

    Args:
        workflows: The workflows whose nodes it serves (registered by ``run()``).
        config: Where and how to connect.
    """

    def __init__(self, workflows: Sequence[Workflow], config: WorkerConfig) -> None:
        if config.slots < 1:
            raise ValueError("a worker needs at least one slot")
        self.workflows = list(workflows)
        self.config = config
        self._token = token_from_env() if config.token is None else config.token
        self._served_once = False  # a stream was acknowledged once: its TLS files were good
        self._servers = [s.strip() for s in config.server.split(",") if s.strip()]
        if not self._servers:
            raise ValueError("WorkerConfig.server names no server (host:port[,host:port...])")
        self._turn = 0  # which of them this worker talks to now
        self._registered: set[int] = set()  # the indexes of the workflows registered
        self._by_hash: dict[str, Workflow] = {}
        self._graphs: dict[str, Graph] = {}
        self._held: dict[str, _Held] = {}
        self._unacked: dict[str, _Reported] = {}
        self._stream: _Stream | None = None
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._acked = False  # the current stream's hello was acknowledged
        self._items: _Scope | None = None  # owns the executions while run() runs
        self._ended: asyncio.Event | None = None  # set when run() has ended
        self._scope: _Scope | None = None  # owns run() inside ``async with``
        self._ready: asyncio.Future[None] | None = None  # done when a session opens
        self.executions = 0
        """How many attempts this worker ran (for tests and metrics)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Register the workflows, then serve until :meth:`shutdown` (reconnecting as needed).

        Each item runs in a task that ``run()`` owns: an item cancelled (by the server, or by its
        deadline) or failing ends alone, as that item's result. Cancelling ``run()`` stops at
        once: the items it holds are cancelled and abandoned (the server re-queues them when the
        session ends), where ``shutdown()`` finishes and reports them first.

        Raises:
            FloxideError: The server refused this worker (its token, a registration, its
                hello) while it held nothing; retrying would not change the answer.
        """
        ended = self._ended = asyncio.Event()
        try:
            async with _Scope() as items:
                self._items = items
                try:
                    await self._register_and_serve()
                finally:
                    self._items = None
            self._stopped.set()
        finally:
            self._held.clear()  # cancelled with the scope, if any was left: abandoned
            self._idle.set()  # nothing more will be reported: no shutdown() waits for it
            ended.set()

    @property
    def _server(self) -> str:
        """The server this worker talks to now."""
        return self._servers[self._turn % len(self._servers)]

    async def _register_and_serve(self) -> None:
        await self._register_all()
        if not self._stopped.is_set():
            await self._serve_until_stopped()

    async def _register_all(self) -> None:
        """Register every workflow, waiting for a server that is not up yet."""
        backoff = self.config.reconnect_backoff.total_seconds()
        while len(self._registered) < len(self.workflows):  # a server may not be up yet: wait
            try:
                await self._register()
            except FloxideError as exc:
                if exc.code not in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
                    raise  # refused: asking again would not change the answer
                log.warning("cannot register at %s yet (%s); retrying", self._server, exc)
                self._turn += 1  # the next server, if it was given several
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.max_backoff.total_seconds())
                if self._stopped.is_set():
                    return

    async def _serve_until_stopped(self) -> None:
        """Serve one stream after another, reconnecting with backoff, until stopped."""
        backoff = self.config.reconnect_backoff.total_seconds()
        reregistered = False  # since the last hello the server acknowledged
        while not self._stopped.is_set():
            try:
                await self._serve()
                backoff = self.config.reconnect_backoff.total_seconds()
                self._turn += 1  # the server ended the stream (draining): try the next one
                reregistered = reregistered and not self._acked
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                error = (
                    error_from_rpc(exc)
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else Unavailable(str(exc))  # any other failure of the connection: again
                )
                if self._acked:
                    reregistered = False
                if isinstance(error, NotFound) and not self._acked and not reregistered:
                    # A server on a fresh store knows none of our definitions: register them
                    # again and say hello again, once per refusal.
                    log.warning("hello refused (%s): registering the workflows again", error)
                    reregistered = True
                    self._registered.clear()
                    await self._register_all()
                    continue
                if isinstance(error, Unauthenticated | PermissionDenied):
                    raise error from exc  # no answer will change without another token
                refused = isinstance(error, NotFound | FailedPrecondition | InvalidArgument) or (
                    isinstance(error, ResourceExhausted) and not self._acked
                )
                if refused and not self._held:  # retrying will not change the answer
                    raise error from exc
                log.warning(
                    "stream to %s broke (%s: %s); reconnecting", self._server, error.reason, error
                )
                self._turn += 1  # to the next server, if it was given several
            if self._stopped.is_set() or (
                self._draining.is_set() and not self._held and not self._unacked
            ):
                break
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.config.max_backoff.total_seconds())

    async def shutdown(self) -> None:
        """Drain: take nothing new, finish and report what is held, then close. Idempotent.

        Items still held after ``config.drain_grace`` are cancelled and abandoned (the server
        re-queues them). Returns once ``run()`` has ended, if it was running; every call waits
        for the same end. Cancelling ``shutdown()`` cuts the drain short: it closes at once.
        """
        if not self._draining.is_set():
            self._draining.set()
            stream = self._stream
            if stream is not None:
                stream.outbox.put_nowait(
                    ConnectRequest(drain=worker_service_pb2.Drain(reason="worker shutting down"))
                )
            try:
                async with asyncio.timeout(self.config.drain_grace.total_seconds()):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "drain grace of %gs is over; abandoning %d held item(s)",
                    self.config.drain_grace.total_seconds(),
                    len(self._held),
                )
            finally:
                self._stopped.set()
                if self._stream is not None:
                    self._stream.outbox.put_nowait(None)
                for held in list(self._held.values()):
                    if held.task is not None:
                        held.task.cancel()
        await self._stopped.wait()
        if self._ended is not None:
            await self._ended.wait()

    async def __aenter__(self) -> Worker:
        """Start ``run()`` as a task this block owns; return once the first session is open.

        Should ``run()`` fail while the block runs, the block is cancelled and leaving it raises
        what ``run()`` raised.

        Raises:
            Whatever ``run()`` raised if it ended first (a refused hello, say).
        """
        scope = _Scope()
        await scope.__aenter__()
        self._scope = scope
        ready = self._ready = asyncio.get_running_loop().create_future()
        try:
            runner = scope.start(self.run(), name=f"floxide-worker {self.config.worker_id}")
            await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # run() failed (the scope cancelled us) or we were cancelled
            self._scope = None
            await scope.__aexit__(*sys.exc_info())  # raises run()'s failure, if it failed
            raise
        finally:
            self._ready = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Shut down (drain), then leave: raises what ``run()`` raised, if it failed."""
        scope, self._scope = self._scope, None
        try:
            await self.shutdown()
        finally:
            if scope is not None:
                await scope.__aexit__(exc_type, exc, tb)

    # -- registration --------------------------------------------------------------------------

    async def _register(self) -> None:
        async with OrchestratorClient(
            self._server, namespace=self.config.namespace, tls=self.config.tls, token=self._token
        ) as client:
            for index, workflow in enumerate(self.workflows):
                if index in self._registered:
                    continue
                definition_hash = await client.register_workflow(workflow)
                self._serve_definition(definition_hash, workflow)
                self._registered.add(index)

    def _serve_definition(self, definition_hash: str, workflow: Workflow) -> None:
        """Serve a registered definition, and those of its nested workflows' child runs.

        The server registers each nested workflow with its parent and pins child runs to the
        hash the parent's definition names, which is its content hash, computed here alike.
        """
        self._by_hash[definition_hash] = workflow
        self._graphs[definition_hash] = graph = Graph(workflow.definition())
        for name in workflow.nodes:
            child = workflow.spec(name).subworkflow
            if child is not None:
                self._serve_definition(graph.child_hash(child.name), child)

    def _served(self) -> list[records_pb2.ServedNode]:
        return [
            records_pb2.ServedNode(
                workflow=workflow.name, node=name, definition_hash=definition_hash
            )
            for definition_hash, workflow in self._by_hash.items()
            for name in workflow.nodes
            if self._runs(workflow, name)
        ]

    def _runs(self, workflow: Workflow, name: str) -> bool:
        """Whether this worker runs a node of a workflow it imported.

        One its ``nodes`` keep, and not a nested workflow (the server runs those as child runs).
        """
        kept = not self.config.nodes or name in self.config.nodes
        return kept and workflow.spec(name).kind is not NodeKind.SUBWORKFLOW

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            channel = open_channel(
                self._server,
                self.config.tls,
                [
                    ("grpc.keepalive_time_ms", 30_000),
                    ("grpc.keepalive_timeout_ms", 10_000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ],
            )
        except InvalidArgument as exc:  # a TLS file unreadable: mid-rotation, once it served
            if not self._served_once:
                raise
            log.warning("cannot read the TLS files (%s); trying again", exc)
            return
        stream = _Stream()
        self._stream = stream
        # Only running items take slots from the new session: a result waiting for its
        # acknowledgement is of an earlier session, whose claims this one never holds.
        free = 0 if self._draining.is_set() else max(self.config.slots - len(self._held), 0)
        hello = worker_service_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            namespace=self.config.namespace,
            worker_id=self.config.worker_id,
            nodes=self._served(),
            credit=free,
            sdk=f"python/{__version__}",
            lists_claims=True,
        )
        stream.outbox.put_nowait(ConnectRequest(hello=hello))
        self._acked = False
        call = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect(
            stream.requests(), metadata=bearer(self._token)
        )
        try:
            read = await call.read()
            if read is grpc.aio.EOF:
                raise ConnectionError("the server closed the stream before acknowledging hello")
            first = typing.cast(worker_service_pb2.ConnectResponse, read)
            if not first.HasField("hello_ack"):
                raise ConnectionError("the server did not acknowledge hello")
            stream.session_id = first.hello_ack.session_id
            self._acked = True
            self._served_once = True
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            stream.heartbeat = (
                first.hello_ack.heartbeat_interval.ToTimedelta().total_seconds() or 3.0
            )
            log.info(
                "session %s open on %s (%s)",
                stream.session_id,
                self._server,
                first.hello_ack.server_id,
            )
            for reported in self._unacked.values():  # of earlier sessions, kept until acked
                if reported.stream is not stream:  # (not sent on this stream since its hello)
                    reported.stream = stream  # no credit: the hello counted its slot free
                    stream.outbox.put_nowait(ConnectRequest(results=[reported.result]))
            if self._draining.is_set():
                stream.outbox.put_nowait(
                    ConnectRequest(drain=worker_service_pb2.Drain(reason="worker draining"))
                )
            async with _Scope() as session:  # the heartbeat ends with the stream
                session.start(self._heartbeat(stream), name=f"heartbeat {stream.session_id}")
                while (read := await call.read()) is not grpc.aio.EOF:
                    self._take(stream, typing.cast(worker_service_pb2.ConnectResponse, read))
        finally:
            stream.outbox.put_nowait(None)
            self._stream = None
            call.cancel()
            await channel.close()

    async def _heartbeat(self, stream: _Stream) -> None:
        while True:
            await asyncio.sleep(stream.heartbeat)
            message = worker_service_pb2.Heartbeat(held_claim_tokens=self._holding(stream))
            message.sent_at.GetCurrentTime()
            stream.outbox.put_nowait(ConnectRequest(heartbeat=message))

    def _holding(self, stream: _Stream) -> list[str]:
        """The claims of the stream's session held: running, or reported and not acknowledged."""
        running = (t for t, h in self._held.items() if h.session_id == stream.session_id)
        reported = (t for t, r in self._unacked.items() if r.session_id == stream.session_id)
        return [*running, *reported]

    def _take(self, stream: _Stream, response: worker_service_pb2.ConnectResponse) -> None:
        assert self._items is not None, "streams are served inside run()"
        # Acknowledgements first, then assignments (docs/protocol.md): a slot a result
        # returned is free before an assignment in the same frame takes it.
        for ack in response.result_acks:
            if ack.code == StatusCode.UNAVAILABLE and ack.claim_token in self._unacked:
                again = self._unacked[ack.claim_token]
                again.stream = stream
                stream.outbox.put_nowait(ConnectRequest(results=[again.result]))
                continue
            reported = self._unacked.pop(ack.claim_token, None)
            result = reported.result if reported is not None else None
            if ack.code != StatusCode.OK:
                log.warning(
                    "result of %s refused: %s %s",
                    result.item_id if result else ack.claim_token,
                    StatusCode(ack.code).name
                    if ack.code in StatusCode._value2member_map_
                    else ack.code,
                    ack.message,
                )
        for assignment in response.assignments:
            held = _Held(assignment, stream.session_id)
            self._held[assignment.claim_token] = held
            self._idle.clear()
            held.task = self._items.start(self._execute(held), name=assignment.claim_token)
        for cancel in response.cancels:
            if (cancelled := self._held.get(cancel.claim_token)) is not None:
                cancelled.cancel.set()
        if response.HasField("drain"):
            # The server is going away, not this worker: report what is held, then reconnect
            # (to any replica) when the stream ends.
            log.info("server %s is draining this stream; will reconnect", self._server)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._held and not self._unacked:
            self._idle.set()

    # -- running items -------------------------------------------------------------------------

    async def _execute(self, held: _Held) -> None:
        assignment = held.assignment
        item = assignment.item
        result = worker_service_pb2.StepResult(
            claim_token=assignment.claim_token,
            run_id=item.run_id,
            item_id=item.item_id,
            attempt=item.attempt,
        )
        result.started_at.GetCurrentTime()
        try:
            workflow = self._serves(item)
            context = json.loads(assignment.context.data) if assignment.context.data else {}
            timeout = None
            if assignment.HasField("timeout"):
                timeout = assignment.timeout.ToTimedelta().total_seconds()
            self.executions += 1
            transition, operations = await attempt(
                workflow.spec(item.node),
                item,
                context,
                workflow.context,
                routes=self._graphs[item.definition_hash].node(item.node).routes,
                cancel=held.cancel,
                timeout=timeout,
                since=held.received,
            )
            result.transition.CopyFrom(transition)
            result.context_operations.extend(op.to_proto() for op in operations)
        except AttemptFailed as exc:
            result.transition.abort.CopyFrom(exc.error)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise  # the item is abandoned (run() ends, or the drain grace is over), or we exit
        except BaseException as exc:  # whatever else escaped is this item's failure, not ours
            result.transition.abort.CopyFrom(
                work_item_pb2.NodeError(
                    kind=work_item_pb2.ERROR_KIND_GENERIC, message=f"{type(exc).__name__}: {exc}"
                )
            )
        result.finished_at.GetCurrentTime()
        self._report(held, result)

    def _serves(self, item: work_item_pb2.WorkItem) -> Workflow:
        """The workflow of an item this worker serves: code it imported, never the wire's.

        Raises:
            AttemptFailed: the assignment names a definition or node it does not serve.
        """
        workflow = self._by_hash.get(item.definition_hash)
        if (
            workflow is None
            or item.node not in workflow.nodes
            or not self._runs(workflow, item.node)
        ):
            raise AttemptFailed(
                work_item_pb2.NodeError(
                    kind=work_item_pb2.ERROR_KIND_GENERIC,
                    message=f"this worker does not serve node {item.node!r} of definition "
                    f"{item.definition_hash!r}: refused, not run",
                )
            )
        return workflow

    def _report(self, held: _Held, result: worker_service_pb2.StepResult) -> None:
        del self._held[held.assignment.claim_token]
        reported = self._unacked[result.claim_token] = _Reported(result, held.session_id)
        stream = self._stream
        if stream is None:
            return  # sent when a stream is back, whose hello counts the slot free
        reported.stream = stream
        # An item of this session returns its slot with its acknowledgement. One of an earlier
        # session was running when this stream's hello was sent, which counted its slot busy;
        # that slot is free now: grant it, once (the server returns none for such a result).
        credit = 0 if held.session_id == stream.session_id or self._draining.is_set() else 1
        stream.outbox.put_nowait(ConnectRequest(results=[result], credit=credit))
