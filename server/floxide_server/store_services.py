"""The store services: floxide's store traits over gRPC, bounded as DESIGN section 6 says.

Reads (get, list, watch) of every store; writes only where they keep the invariants (enqueue
into a running run, context operations, recording an error, checkpoints of local runs), each
through a guarded transaction. No raw dequeue, no raw status write.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from floxide_grpc import _names as names
from floxide_grpc._proto.floxide.v1 import (
    checkpoint_pb2,
    records_pb2,
    store_service_pb2_grpc,
    work_item_pb2,
)
from floxide_grpc._proto.floxide.v1 import store_service_pb2 as pb
from floxide_grpc._routing import derive_id
from floxide_grpc.context import Operation, apply
from floxide_grpc.errors import FailedPrecondition, NotFound, ResourceExhausted
from floxide_server.sessions import Sessions
from floxide_server.store import Store, contexts
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, Get, Put, Txn
from floxide_server.store.payloads import Limits, check_name, namespace_of, parse_json
from floxide_server.store.records import FINISHED, unfinished
from floxide_server.watch import RESYNC, Watches

__all__ = ["add_store_services"]

Context = grpc.aio.ServicerContext[Any, Any]


def _json(value: object) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value, separators=(",", ":")).encode()
    )


class CheckpointStoreService(store_service_pb2_grpc.CheckpointStoreServiceServicer):
    """Checkpoints of local runs, in their own keyspace."""

    def __init__(self, kv: KV, limits: Limits) -> None:
        self.kv = kv
        self.limits = limits

    async def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: Context
    ) -> pb.SaveCheckpointResponse:
        """Save, optionally only at an expected revision."""
        checkpoint = request.checkpoint
        key = Keys(namespace_of(checkpoint.namespace)).checkpoint(
            check_name("run id", checkpoint.run_id)
        )
        data = checkpoint.SerializeToString()
        if len(data) > self.limits.max_context_bytes:
            raise ResourceExhausted(f"checkpoint of {len(data)} bytes is over the limit")
        guards = []
        if request.HasField("expected_revision"):
            guards.append(Compare.modified_at(key, request.expected_revision))
        result = await self.kv.txn(Txn(guards, [Put(key, data)]))
        if not result.succeeded:
            raise FailedPrecondition(
                f"checkpoint of run {checkpoint.run_id!r} is not at revision "
                f"{request.expected_revision}"
            )
        return pb.SaveCheckpointResponse(revision=result.revision)

    async def LoadCheckpoint(
        self, request: pb.LoadCheckpointRequest, context: Context
    ) -> pb.LoadCheckpointResponse:
        """Load a checkpoint with its revision."""
        found = await self.kv.get(
            Keys(namespace_of(request.namespace)).checkpoint(check_name("run id", request.run_id))
        )
        if found is None:
            raise NotFound(f"run {request.run_id!r} has no checkpoint")
        return pb.LoadCheckpointResponse(
            checkpoint=checkpoint_pb2.Checkpoint.FromString(found.value),
            revision=found.mod_revision,
        )

    async def DeleteCheckpoint(
        self, request: pb.DeleteCheckpointRequest, context: Context
    ) -> pb.DeleteCheckpointResponse:
        """Delete a checkpoint (idempotent)."""
        key = Keys(namespace_of(request.namespace)).checkpoint(check_name("run id", request.run_id))
        txn = Txn([], [Delete(key, name="deleted")])
        deleted = txn.named(await self.kv.txn(txn)).get("deleted")
        return pb.DeleteCheckpointResponse(deleted=bool(deleted))


class ContextStoreService(store_service_pb2_grpc.ContextStoreServiceServicer):
    """Contexts of server runs."""

    def __init__(self, kv: KV, store: Store, watches: Watches, limits: Limits) -> None:
        self.kv = kv
        self.store = store
        self.watches = watches
        self.limits = limits

    async def GetContext(
        self, request: pb.GetContextRequest, context: Context
    ) -> pb.GetContextResponse:
        """A run's context now."""
        value = await self.store.reads.context(namespace_of(request.namespace), request.run_id)
        return pb.GetContextResponse(context=_json(value))

    async def ApplyContextOperations(
        self, request: pb.ApplyContextOperationsRequest, context: Context
    ) -> pb.ApplyContextOperationsResponse:
        """Apply operations to an unfinished run's context, once per request id."""
        namespace = namespace_of(request.namespace)
        keys = Keys(namespace)
        names.check_key("request_id", request.request_id)
        run = await self.store.reads.get(namespace, request.run_id)
        definition = await self.store.workflows.get(namespace, run.definition_hash)
        operations = []
        for op in request.operations:
            parse_json(op.value, self.limits.max_payload_bytes, f"context field {op.field!r}")
            operations.append(Operation.from_proto(op))
        current = await self.store.reads.context(namespace, request.run_id)
        apply(current, operations, definition.context)  # refuses bad operations, changes nothing
        item_id = "ext-" + derive_id("context", request.request_id)
        key = keys.context_ops(request.run_id, item_id)
        txn = Txn(
            [Compare.missing(key), *unfinished(keys, request.run_id)],
            [contexts.record_operations(keys, request.run_id, item_id, request.operations)],
            [Get(key, name="recorded")],
        )
        result = await self.kv.txn(txn)
        if not result.succeeded and not txn.named(result).get("recorded", True):
            raise FailedPrecondition(f"run {request.run_id!r} is finished")
        value = await self.store.reads.context(namespace, request.run_id)
        return pb.ApplyContextOperationsResponse(context=_json(value), applied=result.succeeded)

    async def WatchContext(
        self, request: pb.WatchContextRequest, context: Context
    ) -> AsyncIterator[pb.WatchContextResponse]:
        """The context now, then after every change, until the run finishes."""
        namespace = namespace_of(request.namespace)
        keys = Keys(namespace)
        updates = await self.watches.open(keys.run(check_name("run id", request.run_id)))
        try:
            run = await self.store.reads.get(namespace, request.run_id)
            last = await self.store.reads.context(namespace, request.run_id)
            yield pb.WatchContextResponse(context=_json(last))
            operations = keys.context_ops(request.run_id)
            while run.status not in FINISHED:
                event = await updates.next()
                if event is not RESYNC and event.kv.key == keys.status(request.run_id):
                    run = await self.store.reads.get(namespace, request.run_id)
                elif event is not RESYNC and not event.kv.key.startswith(operations):
                    continue  # items and groups change too: only operations change the context
                now = await self.store.reads.context(namespace, request.run_id)
                if now != last:
                    last = now
                    yield pb.WatchContextResponse(context=_json(now))
        finally:
            updates.close()


class WorkQueueService(store_service_pb2_grpc.WorkQueueServiceServicer):
    """Enqueue into running runs; list what waits."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def EnqueueWorkItem(
        self, request: pb.EnqueueWorkItemRequest, context: Context
    ) -> pb.EnqueueWorkItemResponse:
        """Add an item to a running run (idempotent by request id)."""
        item, created = await self.store.lifecycle.enqueue(
            namespace_of(request.namespace),
            request.run_id,
            request.node,
            request.input,
            request.request_id,
        )
        return pb.EnqueueWorkItemResponse(item=item, created=created)

    async def ListQueuedWorkItems(
        self, request: pb.ListQueuedWorkItemsRequest, context: Context
    ) -> pb.ListQueuedWorkItemsResponse:
        """Items waiting for dispatch or a retry timer."""
        items, token = await self.store.reads.pending(
            namespace_of(request.namespace), request.run_id, request.page_size, request.page_token
        )
        return pb.ListQueuedWorkItemsResponse(items=items, next_page_token=token)


class RunInfoStoreService(store_service_pb2_grpc.RunInfoStoreServiceServicer):
    """Run records, read-only."""

    def __init__(self, store: Store, watches: Watches) -> None:
        self.store = store
        self.watches = watches

    async def GetRunInfo(
        self, request: pb.GetRunInfoRequest, context: Context
    ) -> pb.GetRunInfoResponse:
        """A run's record."""
        return pb.GetRunInfoResponse(
            run=await self.store.reads.get(namespace_of(request.namespace), request.run_id)
        )

    async def ListRunInfos(
        self, request: pb.ListRunInfosRequest, context: Context
    ) -> pb.ListRunInfosResponse:
        """Run records newest first."""
        runs, token = await self.store.reads.list_runs(
            namespace_of(request.namespace),
            list(request.statuses),
            "",
            request.page_size,
            request.page_token,
        )
        return pb.ListRunInfosResponse(runs=runs, next_page_token=token)

    async def WatchRunInfos(
        self, request: pb.WatchRunInfosRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunInfosResponse]:
        """Run records as they change."""
        updates = await self.watches.open(Keys(namespace_of(request.namespace)).run_infos)
        await context.send_initial_metadata(())  # tells the caller the watch is in place
        try:
            while True:
                event = await updates.next()
                if event is RESYNC or event.deleted:
                    continue
                run = records_pb2.RunRecord.FromString(event.kv.value)
                if not request.workflow or run.workflow == request.workflow:
                    yield pb.WatchRunInfosResponse(run=run)
        finally:
            updates.close()


class MetricsStoreService(store_service_pb2_grpc.MetricsStoreServiceServicer):
    """Run metrics."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Context
    ) -> pb.GetMetricsResponse:
        """A run's counts."""
        return pb.GetMetricsResponse(
            metrics=await self.store.reads.metrics(namespace_of(request.namespace), request.run_id)
        )


class ErrorStoreService(store_service_pb2_grpc.ErrorStoreServiceServicer):
    """Errors of failed attempts."""

    def __init__(self, kv: KV, store: Store) -> None:
        self.kv = kv
        self.store = store

    async def RecordError(
        self, request: pb.RecordErrorRequest, context: Context
    ) -> pb.RecordErrorResponse:
        """Record an external error against an item (idempotent by request id)."""
        namespace = namespace_of(request.namespace)
        keys = Keys(namespace)
        names.check_key("request_id", request.request_id)
        found = await self.kv.get(
            keys.item(check_name("run id", request.run_id), check_name("item id", request.item_id))
        )
        if found is None:
            raise NotFound(f"item {request.item_id!r} of run {request.run_id!r} not found")
        state = records_pb2.WorkItemState.FromString(found.value)
        record = records_pb2.ErrorRecord(
            namespace=namespace,
            run_id=request.run_id,
            item_id=request.item_id,
            node=state.item.node,
            attempt=state.attempts,
            error=request.error,
            worker_id=f"external:{request.request_id}",
        )
        record.occurred_at.GetCurrentTime()
        key = (
            keys.error(request.run_id, request.item_id)
            + f"ext-{derive_id('error', request.request_id)}".encode()
        )
        result = await self.kv.txn(
            Txn([Compare.missing(key)], [Put(key, record.SerializeToString())], [Get(key)])
        )
        if not result.succeeded:
            stored = await self.kv.get(key)
            if stored is not None:
                record = records_pb2.ErrorRecord.FromString(stored.value)
        return pb.RecordErrorResponse(error=record, created=result.succeeded)

    async def ListErrors(
        self, request: pb.ListErrorsRequest, context: Context
    ) -> pb.ListErrorsResponse:
        """A run's errors, oldest first."""
        errors, token = await self.store.reads.errors(
            namespace_of(request.namespace), request.run_id, request.page_size, request.page_token
        )
        return pb.ListErrorsResponse(errors=errors, next_page_token=token)


class LivenessStoreService(store_service_pb2_grpc.LivenessStoreServiceServicer):
    """Worker sessions, read-only."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    async def GetWorkerHealth(
        self, request: pb.GetWorkerHealthRequest, context: Context
    ) -> pb.GetWorkerHealthResponse:
        """One session, live or ended (until retention removes it)."""
        namespace = namespace_of(request.namespace)
        for worker in await self.sessions.list(namespace, include_dead=True):
            if worker.session_id == request.session_id:
                return pb.GetWorkerHealthResponse(worker=worker)
        raise NotFound(f"session {request.session_id!r} not found")

    async def ListWorkerHealth(
        self, request: pb.ListWorkerHealthRequest, context: Context
    ) -> pb.ListWorkerHealthResponse:
        """The namespace's live sessions (with ``include_dead``, the ended ones too)."""
        return pb.ListWorkerHealthResponse(
            workers=await self.sessions.list(
                namespace_of(request.namespace), include_dead=request.include_dead
            )
        )


class WorkItemStateStoreService(store_service_pb2_grpc.WorkItemStateStoreServiceServicer):
    """Item states, read-only."""

    def __init__(self, kv: KV, store: Store, watches: Watches) -> None:
        self.kv = kv
        self.store = store
        self.watches = watches

    async def GetWorkItemState(
        self, request: pb.GetWorkItemStateRequest, context: Context
    ) -> pb.GetWorkItemStateResponse:
        """One item's state."""
        keys = Keys(namespace_of(request.namespace))
        found = await self.kv.get(
            keys.item(check_name("run id", request.run_id), check_name("item id", request.item_id))
        )
        if found is None:
            raise NotFound(f"item {request.item_id!r} of run {request.run_id!r} not found")
        return pb.GetWorkItemStateResponse(state=records_pb2.WorkItemState.FromString(found.value))

    async def ListWorkItemStates(
        self, request: pb.ListWorkItemStatesRequest, context: Context
    ) -> pb.ListWorkItemStatesResponse:
        """A run's item states."""
        states, token = await self.store.reads.items(
            namespace_of(request.namespace),
            request.run_id,
            (),
            request.page_size,
            request.page_token,
        )
        return pb.ListWorkItemStatesResponse(states=states, next_page_token=token)

    async def WatchWorkItemStates(
        self, request: pb.WatchWorkItemStatesRequest, context: Context
    ) -> AsyncIterator[pb.WatchWorkItemStatesResponse]:
        """Every item now, then each change, until the run finishes."""
        namespace = namespace_of(request.namespace)
        keys = Keys(namespace)
        run_id = check_name("run id", request.run_id)
        updates = await self.watches.open(keys.run(run_id))
        try:
            run = await self.store.reads.get(namespace, run_id)
            found, _ = await self.kv.range(keys.item(run_id))
            for kv in found:
                yield pb.WatchWorkItemStatesResponse(
                    state=records_pb2.WorkItemState.FromString(kv.value)
                )
            item_prefix = keys.item(run_id)
            while run.status not in FINISHED:
                event = await updates.next()
                if event is RESYNC:
                    run = await self.store.reads.get(namespace, run_id)
                    continue
                if event.kv.key == keys.status(run_id):
                    run = await self.store.reads.get(namespace, run_id)
                elif event.kv.key.startswith(item_prefix) and not event.deleted:
                    yield pb.WatchWorkItemStatesResponse(
                        state=records_pb2.WorkItemState.FromString(event.kv.value)
                    )
        finally:
            updates.close()


def add_store_services(
    server: grpc.aio.Server, store: Store, sessions: Sessions, watches: Watches
) -> None:
    """Register every store service on a server."""
    kv, limits = store.kv, store.limits
    store_service_pb2_grpc.add_CheckpointStoreServiceServicer_to_server(
        CheckpointStoreService(kv, limits), server
    )
    store_service_pb2_grpc.add_ContextStoreServiceServicer_to_server(
        ContextStoreService(kv, store, watches, limits), server
    )
    store_service_pb2_grpc.add_WorkQueueServiceServicer_to_server(WorkQueueService(store), server)
    store_service_pb2_grpc.add_RunInfoStoreServiceServicer_to_server(
        RunInfoStoreService(store, watches), server
    )
    store_service_pb2_grpc.add_MetricsStoreServiceServicer_to_server(
        MetricsStoreService(store), server
    )
    store_service_pb2_grpc.add_ErrorStoreServiceServicer_to_server(
        ErrorStoreService(kv, store), server
    )
    store_service_pb2_grpc.add_LivenessStoreServiceServicer_to_server(
        LivenessStoreService(sessions), server
    )
    store_service_pb2_grpc.add_WorkItemStateStoreServiceServicer_to_server(
        WorkItemStateStoreService(kv, store, watches), server
    )
