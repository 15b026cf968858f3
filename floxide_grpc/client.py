"""The orchestrator client: start, follow and control runs on a floxide-grpc server.

Every call has a deadline; calls that fail with UNAVAILABLE (the server restarting, etcd
electing a leader) are retried with backoff; ``start_run`` always sends an idempotency key (one
is made up when the caller gives none), so a retried start never starts two runs. gRPC statuses
come back as the :mod:`floxide_grpc.errors` they stand for. :class:`SyncOrchestratorClient` is a
thin blocking wrapper for scripts and shells.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc

from floxide_grpc import _codec as codec
from floxide_grpc._auth import bearer, token_from_env
from floxide_grpc._proto.floxide.v1 import (
    admin_service_pb2 as admin_pb,
)
from floxide_grpc._proto.floxide.v1 import (
    admin_service_pb2_grpc,
    orchestrator_service_pb2_grpc,
    records_pb2,
    work_item_pb2,
)
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2 as pb,
)
from floxide_grpc._status import error_from_rpc
from floxide_grpc.errors import (
    FloxideError,
    RunCancelled,
    RunFailed,
    RunTimedOut,
    Unavailable,
)
from floxide_grpc.records import (
    ErrorInfo,
    ItemInfo,
    Role,
    RunInfo,
    RunMetrics,
    RunStatus,
    TokenInfo,
    WorkerInfo,
    WorkflowInfo,
)
from floxide_grpc.tls import Tls, explain, open_channel
from floxide_grpc.workflow import Workflow

__all__ = ["OrchestratorClient", "SyncOrchestratorClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _payload(value: Any, where: str) -> work_item_pb2.Payload:
    return codec.to_payload(value, where=where)


class OrchestratorClient:
    """An async client of one server (or a load balancer in front of several).

    Args:
        target: ``host:port`` of the server.
        namespace: The namespace of every call.
        timeout: The deadline of one call, in seconds.
        retries: How many times a call failing with UNAVAILABLE is tried again.
        tls: TLS to the server; ``None``: plain text. (:meth:`Tls.of
            <floxide_grpc.tls.Tls.of>` reads the ``FLOXIDE_TLS_*`` environment.) The files are
            read again when a call finds the server unreachable after they changed.
        token: The bearer token of every call; ``None``: ``FLOXIDE_TOKEN``, and ``""``: none.
    """

    def __init__(
        self,
        target: str,
        *,
        namespace: str = "default",
        timeout: float = 10.0,
        retries: int = 5,
        tls: Tls | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._metadata = bearer(token_from_env() if token is None else token)
        self.namespace = namespace
        self.timeout = timeout
        self.retries = retries
        self.tls = tls
        self._retired: list[grpc.aio.Channel] = []
        self._connect()
        # Each call looks up the current stub: a rotated certificate makes a new channel.
        self._stub = cast(
            "orchestrator_service_pb2_grpc.OrchestratorServiceAsyncStub", _Current(self, "_current")
        )
        self._admin = cast(
            "admin_service_pb2_grpc.AdminServiceAsyncStub", _Current(self, "_admin_current")
        )

    def _connect(self) -> None:
        """A channel and its stub, with the TLS files as they are now."""
        self._stamp = self.tls.stamp() if self.tls is not None else ()
        self._channel = open_channel(
            self.target,
            self.tls,
            [
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )
        self._current = orchestrator_service_pb2_grpc.OrchestratorServiceStub(self._channel)
        self._admin_current = admin_service_pb2_grpc.AdminServiceStub(self._channel)

    def _reconnect_if_rotated(self) -> None:
        """A new channel if the TLS files changed (a channel keeps its first certificates).

        The old one is kept open for the calls still on it (a watch, another task's call),
        and closed with the client. Files caught unreadable (mid-rotation) keep it in use.
        """
        if self.tls is None or not self.tls.changed(self._stamp):
            return
        old = self._channel
        try:
            self._connect()
        except FloxideError as exc:
            log.warning("TLS files changed but cannot be read yet (%s): kept the old ones", exc)
            return
        self._retired.append(old)

    async def close(self) -> None:
        """Close the channels. Idempotent."""
        for channel in [*self._retired, self._channel]:
            await channel.close()

    async def __aenter__(self) -> OrchestratorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        idempotent: bool = False,
        retries: int | None = None,
    ) -> T:
        """Call with a deadline: again on UNAVAILABLE, and on DEADLINE_EXCEEDED if ``idempotent``.

        The same request, its idempotency key with it, cannot act twice; and a server waiting
        on an outcome that etcd has not told yet may outlast one deadline.
        """
        again = {grpc.StatusCode.UNAVAILABLE}
        if idempotent:
            again.add(grpc.StatusCode.DEADLINE_EXCEEDED)
        pause = 0.1
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return await method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in again or attempt == retries:
                    hint = explain(exc.details() or "", self.target, self.tls)
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and hint is not None:
                        raise Unavailable(hint) from exc
                    raise error_from_rpc(exc) from exc
            self._reconnect_if_rotated()
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- workflows -------------------------------------------------------------------------

    async def register_workflow(self, workflow: Workflow) -> str:
        """Register a workflow (idempotent); returns its definition hash."""
        response = await self._call(
            self._stub.RegisterWorkflow,
            pb.RegisterWorkflowRequest(namespace=self.namespace, definition=workflow.definition()),
        )
        return response.definition_hash

    async def get_workflow(self, name: str, definition_hash: str = "") -> WorkflowInfo:
        """A registered definition with its definition: the current one, or ``definition_hash``."""
        response = await self._call(
            self._stub.GetWorkflow,
            pb.GetWorkflowRequest(
                namespace=self.namespace, name=name, definition_hash=definition_hash
            ),
        )
        return WorkflowInfo.from_proto(response.workflow)

    async def list_workflows(self) -> list[tuple[str, str]]:
        """Every workflow's name and current hash."""
        found: list[tuple[str, str]] = []
        token = ""
        while True:
            response = await self._call(
                self._stub.ListWorkflows,
                pb.ListWorkflowsRequest(namespace=self.namespace, page_token=token),
            )
            found += [(w.name, w.definition_hash) for w in response.workflows]
            token = response.next_page_token
            if not token:
                return found

    async def workflow_versions(self) -> list[WorkflowInfo]:
        """Every registered definition of every workflow: which is current, who serves it."""
        found: list[WorkflowInfo] = []
        token = ""
        while True:
            response = await self._call(
                self._stub.ListWorkflows,
                pb.ListWorkflowsRequest(
                    namespace=self.namespace, page_token=token, all_versions=True
                ),
            )
            found += [WorkflowInfo.from_proto(w) for w in response.workflows]
            token = response.next_page_token
            if not token:
                return found

    async def promote_workflow(self, name: str, definition_hash: str) -> WorkflowInfo:
        """Make a registered definition its workflow's current one again."""
        response = await self._call(
            self._stub.PromoteWorkflow,
            pb.PromoteWorkflowRequest(
                namespace=self.namespace, name=name, definition_hash=definition_hash
            ),
        )
        return WorkflowInfo.from_proto(response.workflow)

    # -- runs ------------------------------------------------------------------------------

    async def start_run(
        self,
        workflow: str | Workflow,
        input: Any,
        *,
        idempotency_key: str | None = None,
        definition_hash: str = "",
        context: Mapping[str, Any] | None = None,
        run_timeout: datetime.timedelta | float | None = None,
    ) -> tuple[RunInfo, bool]:
        """Start a run; returns it and whether it was created (``False``: the key's earlier run).

        ``run_timeout`` (seconds, or a timedelta): how long the whole run may take, paused time
        included; past it the server ends it TIMED_OUT.
        """
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        request = pb.StartRunRequest(
            namespace=self.namespace,
            workflow=name,
            definition_hash=definition_hash,
            input=_payload(input, "input"),
            idempotency_key=idempotency_key or str(uuid.uuid4()),
        )
        if context is not None:
            request.context.CopyFrom(_payload(dict(context), "context"))
        if run_timeout is not None:
            if not isinstance(run_timeout, datetime.timedelta):
                run_timeout = datetime.timedelta(seconds=run_timeout)
            request.run_timeout.FromTimedelta(run_timeout)
        response = await self._call(self._stub.StartRun, request, idempotent=True)
        return RunInfo.from_proto(response.run), response.created

    async def get_run(self, run_id: str) -> RunInfo:
        """A run's record."""
        response = await self._call(
            self._stub.GetRun, pb.GetRunRequest(namespace=self.namespace, run_id=run_id)
        )
        return RunInfo.from_proto(response.run)

    async def list_runs(
        self,
        *,
        statuses: tuple[RunStatus, ...] = (),
        workflow: str = "",
        page_size: int = 0,
        page_token: str = "",
        parent_run_id: str = "",
        include_children: bool = False,
    ) -> tuple[list[RunInfo], str]:
        """One page of runs, newest first, and the token of the next page ("" on the last).

        Child runs (nested workflows') are listed with ``include_children``, or as the
        children of ``parent_run_id``.
        """
        response = await self._call(
            self._stub.ListRuns,
            pb.ListRunsRequest(
                namespace=self.namespace,
                statuses=[s.to_proto() for s in statuses],
                workflow=workflow,
                page_size=page_size,
                page_token=page_token,
                parent_run_id=parent_run_id,
                include_children=include_children,
            ),
        )
        return [RunInfo.from_proto(r) for r in response.runs], response.next_page_token

    async def cancel_run(self, run_id: str, reason: str = "") -> RunInfo:
        """Cancel a run."""
        response = await self._call(
            self._stub.CancelRun,
            pb.CancelRunRequest(namespace=self.namespace, run_id=run_id, reason=reason),
        )
        return RunInfo.from_proto(response.run)

    async def pause_run(self, run_id: str) -> RunInfo:
        """Pause a run."""
        response = await self._call(
            self._stub.PauseRun, pb.PauseRunRequest(namespace=self.namespace, run_id=run_id)
        )
        return RunInfo.from_proto(response.run)

    async def resume_run(self, run_id: str) -> RunInfo:
        """Resume a paused or failed run."""
        response = await self._call(
            self._stub.ResumeRun, pb.ResumeRunRequest(namespace=self.namespace, run_id=run_id)
        )
        return RunInfo.from_proto(response.run)

    async def run_errors(self, run_id: str) -> list[ErrorInfo]:
        """Every failed attempt of a run, oldest first."""
        found: list[ErrorInfo] = []
        token = ""
        while True:
            response = await self._call(
                self._stub.ListRunErrors,
                pb.ListRunErrorsRequest(namespace=self.namespace, run_id=run_id, page_token=token),
            )
            found += [ErrorInfo.from_proto(e) for e in response.errors]
            token = response.next_page_token
            if not token:
                return found

    async def run_metrics(self, run_id: str) -> RunMetrics:
        """A run's counts."""
        response = await self._call(
            self._stub.GetRunMetrics,
            pb.GetRunMetricsRequest(namespace=self.namespace, run_id=run_id),
        )
        return RunMetrics.from_proto(response.metrics)

    async def run_context(self, run_id: str) -> dict[str, Any]:
        """A run's context now."""
        response = await self._call(
            self._stub.GetRunContext,
            pb.GetRunContextRequest(namespace=self.namespace, run_id=run_id),
        )
        value: dict[str, Any] = json.loads(response.context.data)
        return value

    async def work_items(self, run_id: str, *, pending_only: bool = False) -> list[ItemInfo]:
        """A run's items with their states (only those waiting, with ``pending_only``)."""
        found: list[ItemInfo] = []
        token = ""
        statuses = (
            [records_pb2.ITEM_STATUS_PENDING, records_pb2.ITEM_STATUS_WAITING_RETRY]
            if pending_only
            else []
        )
        while True:
            response = await self._call(
                self._stub.ListWorkItems,
                pb.ListWorkItemsRequest(
                    namespace=self.namespace,
                    run_id=run_id,
                    statuses=statuses,
                    page_token=token,
                ),
            )
            found += [ItemInfo.from_proto(s) for s in response.items]
            token = response.next_page_token
            if not token:
                return found

    # -- tokens (an admin's) -----------------------------------------------------------------

    async def create_token(
        self,
        name: str,
        role: Role | str,
        namespaces: Sequence[str] = (),
        *,
        expires_at: datetime.datetime | None = None,
    ) -> tuple[str, TokenInfo]:
        """Make a token: the token itself (shown this once) and what the server keeps of it."""
        request = admin_pb.CreateTokenRequest(
            name=name,
            role=admin_pb.Role.ValueType(Role(role).to_proto()),
            namespaces=list(namespaces),
        )
        if expires_at is not None:
            request.expires_at.FromDatetime(expires_at)
        # Not sent again on UNAVAILABLE: a lost reply would leave a token nobody saw.
        response = await self._call(self._admin.CreateToken, request, retries=0)
        return response.token, TokenInfo.from_proto(response.info)

    async def tokens(self) -> list[TokenInfo]:
        """Every token in force, without secrets."""
        response = await self._call(self._admin.ListTokens, admin_pb.ListTokensRequest())
        return [TokenInfo.from_proto(t) for t in response.tokens]

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token by id; whether one was in force."""
        response = await self._call(
            self._admin.RevokeToken, admin_pb.RevokeTokenRequest(id=token_id)
        )
        return bool(response.found)

    async def workers(self, *, include_dead: bool = False) -> list[WorkerInfo]:
        """The namespace's live worker sessions.

        Args:
            include_dead: Also the sessions that ended within the retention period of finished
                runs (liveness ``dead``, newest first, after the live ones).
        """
        response = await self._call(
            self._stub.ListWorkers,
            pb.ListWorkersRequest(namespace=self.namespace, include_dead=include_dead),
        )
        return [WorkerInfo.from_proto(w) for w in response.workers]

    async def watch_run(self, run_id: str) -> AsyncIterator[RunInfo]:
        """The run now, then at every change of status, until it is finished.

        A stream broken by a server going away (UNAVAILABLE) is opened again, on whatever the
        target resolves to, up to ``retries`` times in a row.
        """
        failures = 0
        last: RunStatus | None = None
        while True:
            call = self._stub.WaitForCompletion(
                pb.WaitForCompletionRequest(namespace=self.namespace, run_id=run_id),
                metadata=self._metadata,
            )
            try:
                async for response in call:
                    failures = 0
                    run = RunInfo.from_proto(response.run)
                    if run.status != last:
                        last = run.status
                        yield run
                    if run.status.finished:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise error_from_rpc(exc) from exc
                failures += 1
                self._reconnect_if_rotated()
                await asyncio.sleep(0.1 * 2**failures)

    async def wait_for_completion(self, run_id: str, timeout: float | None = None) -> RunInfo:
        """Wait until a run is completed, failed, cancelled or timed out; returns its final record.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        async with asyncio.timeout(timeout):
            async for run in self.watch_run(run_id):
                if run.status.finished:
                    return run
        return await self.get_run(run_id)

    async def run(
        self,
        workflow: str | Workflow,
        input: Any,
        *,
        timeout: float | None = None,
        run_timeout: datetime.timedelta | float | None = None,
    ) -> Any:
        """Start a run, wait for it, and return its output.

        ``timeout`` bounds the wait here; ``run_timeout`` is the run's own, on the server.

        Raises:
            RunFailed: the run failed.
            RunCancelled: the run was cancelled.
            RunTimedOut: the run passed its run timeout.
            TimeoutError: ``timeout`` seconds passed first (the run goes on).
        """
        started, _ = await self.start_run(workflow, input, run_timeout=run_timeout)
        final = await self.wait_for_completion(started.run_id, timeout)
        if final.status is RunStatus.COMPLETED:
            return final.output
        run_id = final.run_id
        if final.status is RunStatus.CANCELLED:
            raise RunCancelled(f"run {run_id!r} was cancelled: {final.error}", run_id=run_id)
        if final.status is RunStatus.TIMED_OUT:
            raise RunTimedOut(f"run {run_id!r} timed out: {final.error}", run_id=run_id)
        where = f"node {final.failed_node!r} attempt {final.failed_attempts}: "
        raise RunFailed(
            f"run {run_id!r} failed: {where * bool(final.failed_node)}{final.error}",
            node=final.failed_node,
            kind=final.error_kind,
            attempts=final.failed_attempts,
            details=final.error_details,
            run_id=run_id,
        )


class SyncOrchestratorClient:
    """The same client, blocking: each method runs the async one on a private event loop."""

    def __init__(self, target: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="floxide-client", daemon=True
        )
        self._thread.start()
        self._client: OrchestratorClient = self._run(self._make(target, options))

    @staticmethod
    async def _make(target: str, options: dict[str, Any]) -> OrchestratorClient:
        return OrchestratorClient(target, **options)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))

        return call

    def close(self) -> None:
        """Close the client and stop its loop. Idempotent."""
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> SyncOrchestratorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Current:
    """A stub of the client's as of each call (its channel is replaced when certificates rotate)."""

    def __init__(self, client: OrchestratorClient, stub: str) -> None:
        self._client = client
        self._stub = stub

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(getattr(self._client, self._stub), name)(*args, **kwargs)

        return call
