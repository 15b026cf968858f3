"""``OrchestratorService``: validate the request, delegate to the stores, build the response.

Errors are raised as :mod:`floxide_grpc.errors` and become statuses in
:class:`floxide_server.errors.ErrorInterceptor`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from floxide_grpc import _names as names
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2 as pb,
)
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2_grpc,
    records_pb2,
    work_item_pb2,
    workflow_pb2,
)
from floxide_grpc.errors import Unavailable
from floxide_server.auth import current
from floxide_server.rates import Buckets
from floxide_server.sessions import Sessions
from floxide_server.store import Store, settling
from floxide_server.store.keys import Keys
from floxide_server.store.payloads import check_name, namespace_of, page_of
from floxide_server.store.records import FINISHED
from floxide_server.tasks import first_done
from floxide_server.watch import RESYNC, Watches

__all__ = ["OrchestratorService"]

Context = grpc.aio.ServicerContext[Any, Any]


class OrchestratorService(orchestrator_service_pb2_grpc.OrchestratorServiceServicer):
    """The orchestrator API over the stores."""

    def __init__(
        self, store: Store, sessions: Sessions, watches: Watches, stopping: asyncio.Event
    ) -> None:
        self.store = store
        self.workflows = store.workflows
        self.sessions = sessions
        self.watches = watches
        self.stopping = stopping
        self.starts = Buckets(store.limits.max_starts_per_second)

    async def RegisterWorkflow(
        self, request: pb.RegisterWorkflowRequest, context: Context
    ) -> pb.RegisterWorkflowResponse:
        """Validate and store a definition."""
        definition_hash, created = await self.workflows.register(
            namespace_of(request.namespace), request.definition
        )
        return pb.RegisterWorkflowResponse(definition_hash=definition_hash, created=created)

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        """A registered definition, by name or hash."""
        record = await self.workflows.record(
            namespace_of(request.namespace), request.name, request.definition_hash
        )
        return pb.GetWorkflowResponse(workflow=record)

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Context
    ) -> pb.ListWorkflowsResponse:
        """Workflows by name: each current definition (or every one), and who serves it."""
        namespace = namespace_of(request.namespace)
        if request.all_versions:
            found, token = page_of(
                await self.workflows.versions(namespace), request.page_size, request.page_token
            )
        else:
            found, token = await self.workflows.list_workflows(
                namespace, request.page_size, request.page_token
            )
        workers = await self.sessions.list(namespace)
        for record in found:
            definition = await self.workflows.get(namespace, record.definition_hash)
            record.served_by.extend(_served_by(workers, record, definition.graph.nodes))
        return pb.ListWorkflowsResponse(workflows=found, next_page_token=token)

    async def PromoteWorkflow(
        self, request: pb.PromoteWorkflowRequest, context: Context
    ) -> pb.PromoteWorkflowResponse:
        """Make a registered definition its workflow's current one (an operator's action)."""
        record, previous = await self.workflows.promote(
            namespace_of(request.namespace), request.name, request.definition_hash
        )
        return pb.PromoteWorkflowResponse(workflow=record, previous_hash=previous)

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        """Start a run (idempotent by key)."""
        principal = current()
        if principal is not None:
            self.starts.take(principal.token_id, f"the token {principal.token_id}'s start rate")
        run, created = await self.store.lifecycle.start(
            namespace_of(request.namespace),
            names.check_name("workflow", request.workflow),
            request.definition_hash,
            request.input,
            request.idempotency_key,
            request.context if request.HasField("context") else None,
            _milliseconds(request.run_timeout) if request.HasField("run_timeout") else None,
        )
        return pb.StartRunResponse(run=run, created=created)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        """A run's record."""
        return pb.GetRunResponse(
            run=await self.store.reads.get(namespace_of(request.namespace), request.run_id)
        )

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        """Runs newest first, filtered."""
        runs, token = await self.store.reads.list_runs(
            namespace_of(request.namespace),
            list(request.statuses),
            request.workflow,
            request.page_size,
            request.page_token,
            request.parent_run_id,
            request.include_children,
        )
        return pb.ListRunsResponse(runs=runs, next_page_token=token)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: Context
    ) -> pb.CancelRunResponse:
        """Cancel a run."""
        run = await self.store.lifecycle.cancel(
            namespace_of(request.namespace), request.run_id, request.reason
        )
        return pb.CancelRunResponse(run=run)

    async def PauseRun(self, request: pb.PauseRunRequest, context: Context) -> pb.PauseRunResponse:
        """Pause a run."""
        return pb.PauseRunResponse(
            run=await self.store.lifecycle.pause(namespace_of(request.namespace), request.run_id)
        )

    async def ResumeRun(
        self, request: pb.ResumeRunRequest, context: Context
    ) -> pb.ResumeRunResponse:
        """Resume a paused or failed run."""
        return pb.ResumeRunResponse(
            run=await self.store.lifecycle.resume(namespace_of(request.namespace), request.run_id)
        )

    async def ListRunErrors(
        self, request: pb.ListRunErrorsRequest, context: Context
    ) -> pb.ListRunErrorsResponse:
        """A run's failed attempts."""
        errors, token = await self.store.reads.errors(
            namespace_of(request.namespace), request.run_id, request.page_size, request.page_token
        )
        return pb.ListRunErrorsResponse(errors=errors, next_page_token=token)

    async def GetRunMetrics(
        self, request: pb.GetRunMetricsRequest, context: Context
    ) -> pb.GetRunMetricsResponse:
        """A run's counts."""
        metrics = await self.store.reads.metrics(namespace_of(request.namespace), request.run_id)
        return pb.GetRunMetricsResponse(metrics=metrics)

    async def GetRunContext(
        self, request: pb.GetRunContextRequest, context: Context
    ) -> pb.GetRunContextResponse:
        """A run's context now."""
        value = await self.store.reads.context(namespace_of(request.namespace), request.run_id)
        return pb.GetRunContextResponse(context=_json(value))

    async def ListPendingWork(
        self, request: pb.ListPendingWorkRequest, context: Context
    ) -> pb.ListPendingWorkResponse:
        """A run's waiting items."""
        items, token = await self.store.reads.pending(
            namespace_of(request.namespace), request.run_id, request.page_size, request.page_token
        )
        return pb.ListPendingWorkResponse(items=items, next_page_token=token)

    async def ListWorkItems(
        self, request: pb.ListWorkItemsRequest, context: Context
    ) -> pb.ListWorkItemsResponse:
        """A run's items and their states."""
        items, token = await self.store.reads.items(
            namespace_of(request.namespace),
            request.run_id,
            list(request.statuses),
            request.page_size,
            request.page_token,
        )
        return pb.ListWorkItemsResponse(items=items, next_page_token=token)

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Context
    ) -> pb.ListWorkersResponse:
        """The namespace's live worker sessions (with ``include_dead``, the ended ones too)."""
        workers = await self.sessions.list(
            namespace_of(request.namespace), include_dead=request.include_dead
        )
        return pb.ListWorkersResponse(workers=workers)

    async def WaitForCompletion(
        self, request: pb.WaitForCompletionRequest, context: Context
    ) -> AsyncIterator[pb.WaitForCompletionResponse]:
        """The run now, then at every change of status, until it is finished (and settled)."""
        namespace = namespace_of(request.namespace)
        keys = Keys(namespace)
        key = keys.run_info(check_name("run id", request.run_id))
        updates = await self.watches.open(keys.run_infos, key)  # one watch per namespace, shared
        try:
            run = await self.store.reads.get(namespace, request.run_id)  # after subscribing: no gap
            yield pb.WaitForCompletionResponse(run=await self._settled(keys, run))
            last_status = run.status
            while run.status not in FINISHED:
                change = asyncio.ensure_future(updates.next())
                stop = asyncio.ensure_future(self.stopping.wait())
                if stop in await first_done([change, stop]):
                    raise Unavailable("the server is shutting down: wait again, on any replica")
                event = change.result()
                if event is RESYNC:
                    run = await self.store.reads.get(namespace, request.run_id)
                elif event.kv.key == key and not event.deleted:
                    run = records_pb2.RunRecord.FromString(event.kv.value)
                else:
                    continue
                if run.status != last_status:
                    last_status = run.status
                    yield pb.WaitForCompletionResponse(run=await self._settled(keys, run))
        finally:
            updates.close()

    async def _settled(self, keys: Keys, run: records_pb2.RunRecord) -> records_pb2.RunRecord:
        """The run, once settled if it is finished.

        Whoever learns this way that a run ended finds nothing of it in flight: this replica
        helps settle it (settling is idempotent).
        """
        if run.status in FINISHED:
            await settling.settle(self.store.kv, keys, run.run_id, self.store.limits.max_txn_ops)
        return run


def _served_by(
    workers: Sequence[records_pb2.WorkerRecord],
    record: workflow_pb2.RegisteredWorkflow,
    nodes: Collection[str],
) -> list[str]:
    """The connected workers serving a node of a definition (by its hash, or naming none)."""
    return sorted(
        {
            worker.worker_id
            for worker in workers
            for served in worker.nodes
            if served.workflow == record.name
            and served.node in nodes
            and served.definition_hash in ("", record.definition_hash)
        }
    )


def _json(value: object) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value, separators=(",", ":")).encode()
    )


def _milliseconds(duration: Duration) -> int:
    """A duration in whole milliseconds, a fraction of one rounded up (never to zero)."""
    nanos = duration.ToNanoseconds()
    return -(-nanos // 1_000_000) if nanos > 0 else nanos // 1_000_000
