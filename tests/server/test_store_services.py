"""The store services over a real socket, and one checkpoint-store suite for every store."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
import pytest

from floxide_grpc import (
    CheckpointStore,
    FileCheckpointStore,
    InMemoryCheckpointStore,
    Merge,
    Workflow,
    node,
)
from floxide_grpc._proto.floxide.v1 import (
    checkpoint_pb2,
    records_pb2,
    store_service_pb2,
    store_service_pb2_grpc,
    work_item_pb2,
)
from floxide_grpc._proto.floxide.v1 import store_service_pb2 as pb
from floxide_grpc.stores import RemoteCheckpointStore
from floxide_grpc.stores.checkpoint import checkpoint_of
from tests.conftest import Stack, run_to_completion
from tests.helpers import eventually
from tests.helpers.channels import authorized_channel
from tests.helpers.worker_stream import Raw, hello

Payload = work_item_pb2.Payload


def js(value: Any) -> Payload:
    return Payload(encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode())


@dataclass
class Log:
    lines: Annotated[list[str], Merge.APPEND] = field(default_factory=list)
    count: Annotated[int, Merge.ADD] = 0


@node
def first(x: int) -> int:
    return x + 1


@node
def second(x: int) -> int:
    return x * 10


FLOW = Workflow("logged", start=first, context=Log).edge(first, second)


@dataclass
class Stubs:
    channel: grpc.aio.Channel

    def __getattr__(self, name: str) -> Any:
        return getattr(store_service_pb2_grpc, f"{name}Stub")(self.channel)


@pytest.fixture
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    channel = authorized_channel(stack.target)
    yield Stubs(channel)
    await channel.close()


async def drain(call: Any) -> list[Any]:
    """Read a stream to its end (the read API, which a call must not mix with iteration)."""
    found = []
    while (message := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        found.append(message)
    return found


async def started(stack: Stack) -> str:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("logged", 1)
    return run.run_id


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_context_operations_apply_once_and_refuse_bad_ones(
    stack: Stack, stubs: Stubs
) -> None:
    run_id = await started(stack)
    ns = stack.namespace
    add = work_item_pb2.ContextOperation(
        field="count", strategy=work_item_pb2.MERGE_STRATEGY_ADD, value=js(2)
    )
    request = pb.ApplyContextOperationsRequest(
        namespace=ns, run_id=run_id, operations=[add], request_id="r1"
    )
    applied = await stubs.ContextStoreService.ApplyContextOperations(request)
    again = await stubs.ContextStoreService.ApplyContextOperations(request)
    assert applied.applied and not again.applied
    assert json.loads(again.context.data) == {"lines": [], "count": 2}
    wrong = work_item_pb2.ContextOperation(
        field="count", strategy=work_item_pb2.MERGE_STRATEGY_APPEND, value=js([1])
    )
    bad = pb.ApplyContextOperationsRequest(
        namespace=ns, run_id=run_id, operations=[wrong], request_id="r2"
    )
    assert (
        await code_of(stubs.ContextStoreService.ApplyContextOperations(bad))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    got = await stubs.ContextStoreService.GetContext(
        pb.GetContextRequest(namespace=ns, run_id=run_id)
    )
    assert json.loads(got.context.data) == {"lines": [], "count": 2}
    await stack.client.cancel_run(run_id)
    late = pb.ApplyContextOperationsRequest(
        namespace=ns, run_id=run_id, operations=[add], request_id="r3"
    )
    assert (
        await code_of(stubs.ContextStoreService.ApplyContextOperations(late))
        == grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_watch_context_follows_changes_until_the_run_ends(stack: Stack, stubs: Stubs) -> None:
    run_id = await started(stack)
    ns = stack.namespace
    call = stubs.ContextStoreService.WatchContext(
        pb.WatchContextRequest(namespace=ns, run_id=run_id)
    )
    initial = await call.read()
    assert json.loads(initial.context.data) == {"lines": [], "count": 0}
    add = work_item_pb2.ContextOperation(
        field="count", strategy=work_item_pb2.MERGE_STRATEGY_ADD, value=js(5)
    )
    await stubs.ContextStoreService.ApplyContextOperations(
        pb.ApplyContextOperationsRequest(
            namespace=ns, run_id=run_id, operations=[add], request_id="w1"
        )
    )
    changed = await asyncio.wait_for(call.read(), 10)
    assert json.loads(changed.context.data)["count"] == 5
    await stack.client.cancel_run(run_id)
    rest = await drain(call)
    assert all(json.loads(r.context.data)["count"] == 5 for r in rest)


async def test_queue_run_info_metrics_and_item_states(stack: Stack, stubs: Stubs) -> None:
    run_id = await started(stack)
    ns = stack.namespace
    enqueued = await stubs.WorkQueueService.EnqueueWorkItem(
        pb.EnqueueWorkItemRequest(
            namespace=ns, run_id=run_id, node="second", input=js(3), request_id="e1"
        )
    )
    assert enqueued.created and enqueued.item.node == "second"
    queued = await stubs.WorkQueueService.ListQueuedWorkItems(
        pb.ListQueuedWorkItemsRequest(namespace=ns, run_id=run_id)
    )
    assert sorted(i.node for i in queued.items) == ["first", "second"]
    bad = pb.EnqueueWorkItemRequest(
        namespace=ns, run_id=run_id, node="ghost", input=js(3), request_id="e2"
    )
    assert await code_of(stubs.WorkQueueService.EnqueueWorkItem(bad)) == grpc.StatusCode.NOT_FOUND
    info = await stubs.RunInfoStoreService.GetRunInfo(
        pb.GetRunInfoRequest(namespace=ns, run_id=run_id)
    )
    assert info.run.workflow == "logged"
    listed = await stubs.RunInfoStoreService.ListRunInfos(pb.ListRunInfosRequest(namespace=ns))
    assert [r.run_id for r in listed.runs] == [run_id]
    metrics = await stubs.MetricsStoreService.GetMetrics(
        pb.GetMetricsRequest(namespace=ns, run_id=run_id)
    )
    assert (metrics.metrics.total_work_items, metrics.metrics.pending) == (2, 2)
    states = await stubs.WorkItemStateStoreService.ListWorkItemStates(
        pb.ListWorkItemStatesRequest(namespace=ns, run_id=run_id)
    )
    one = states.states[0].item
    got = await stubs.WorkItemStateStoreService.GetWorkItemState(
        pb.GetWorkItemStateRequest(namespace=ns, run_id=run_id, item_id=one.item_id)
    )
    assert got.state.item.node == one.node
    missing = pb.GetWorkItemStateRequest(namespace=ns, run_id=run_id, item_id="nope")
    assert (
        await code_of(stubs.WorkItemStateStoreService.GetWorkItemState(missing))
        == grpc.StatusCode.NOT_FOUND
    )


async def test_watches_of_run_infos_and_item_states(stack: Stack, stubs: Stubs) -> None:
    await stack.client.register_workflow(FLOW)
    ns = stack.namespace
    infos = stubs.RunInfoStoreService.WatchRunInfos(
        pb.WatchRunInfosRequest(namespace=ns, workflow="logged")
    )
    await infos.initial_metadata()  # the server sends its headers once the watch is in place
    run, _ = await stack.client.start_run("logged", 1)
    seen = await asyncio.wait_for(infos.read(), 10)
    assert seen.run.run_id == run.run_id
    infos.cancel()
    states = stubs.WorkItemStateStoreService.WatchWorkItemStates(
        pb.WatchWorkItemStatesRequest(namespace=ns, run_id=run.run_id)
    )
    initial = await asyncio.wait_for(states.read(), 10)
    assert initial.state.item.node == "first"
    await run_to_completion(stack, run.run_id, [2, 20])
    nodes = [(r.state.item.node, r.state.status) for r in await drain(states)]
    assert ("second", 6) in nodes  # ITEM_STATUS_COMPLETED


async def test_errors_are_recorded_once_and_listed(stack: Stack, stubs: Stubs) -> None:
    run_id = await started(stack)
    ns = stack.namespace
    items = await stack.client.work_items(run_id)
    error = work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_GENERIC, message="checker says no"
    )
    request = pb.RecordErrorRequest(
        namespace=ns, run_id=run_id, item_id=items[0].item_id, error=error, request_id="x1"
    )
    recorded = await stubs.ErrorStoreService.RecordError(request)
    again = await stubs.ErrorStoreService.RecordError(request)
    assert recorded.created and not again.created
    listed = await stubs.ErrorStoreService.ListErrors(
        pb.ListErrorsRequest(namespace=ns, run_id=run_id)
    )
    assert [e.error.message for e in listed.errors] == ["checker says no"]
    unknown = pb.RecordErrorRequest(
        namespace=ns, run_id=run_id, item_id="ghost", error=error, request_id="x2"
    )
    assert await code_of(stubs.ErrorStoreService.RecordError(unknown)) == grpc.StatusCode.NOT_FOUND


async def test_liveness_lists_sessions(stack: Stack, stubs: Stubs) -> None:
    ns = stack.namespace
    liveness = stubs.LivenessStoreService
    listed = await liveness.ListWorkerHealth(pb.ListWorkerHealthRequest(namespace=ns))
    assert list(listed.workers) == []
    missing = pb.GetWorkerHealthRequest(namespace=ns, session_id="nope")
    assert await code_of(liveness.GetWorkerHealth(missing)) == grpc.StatusCode.NOT_FOUND
    await stack.client.register_workflow(FLOW)
    raw = Raw(stack.target)
    try:
        await raw.send(hello(ns, workflow="logged", node_name="first"))
        session_id = (await raw.read()).hello_ack.session_id
        [live] = (await liveness.ListWorkerHealth(pb.ListWorkerHealthRequest(namespace=ns))).workers
        assert (live.session_id, live.liveness) == (session_id, records_pb2.LIVENESS_STATUS_ALIVE)
    finally:
        await raw.close()  # the stream ends: so does its session

    async def ended() -> bool:
        listed = await liveness.ListWorkerHealth(pb.ListWorkerHealthRequest(namespace=ns))
        return not listed.workers

    await eventually(ended)
    with_dead = pb.ListWorkerHealthRequest(namespace=ns, include_dead=True)

    async def stamped() -> bool:
        [dead] = (await liveness.ListWorkerHealth(with_dead)).workers
        return bool(dead.HasField("ended_at"))

    await eventually(stamped)
    one = pb.GetWorkerHealthRequest(namespace=ns, session_id=session_id)
    found = (await liveness.GetWorkerHealth(one)).worker  # until retention forgets it
    assert (found.session_id, found.liveness) == (session_id, records_pb2.LIVENESS_STATUS_DEAD)


async def test_checkpoint_saves_are_conditional_on_request(stack: Stack, stubs: Stubs) -> None:
    ns = stack.namespace
    checkpoint = checkpoint_pb2.Checkpoint(namespace=ns, run_id="local-1", workflow="w", sequence=1)
    saved = await stubs.CheckpointStoreService.SaveCheckpoint(
        store_service_pb2.SaveCheckpointRequest(checkpoint=checkpoint)
    )
    stale = store_service_pb2.SaveCheckpointRequest(
        checkpoint=checkpoint, expected_revision=saved.revision - 1
    )
    assert (
        await code_of(stubs.CheckpointStoreService.SaveCheckpoint(stale))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    fresh = store_service_pb2.SaveCheckpointRequest(
        checkpoint=checkpoint, expected_revision=saved.revision
    )
    await stubs.CheckpointStoreService.SaveCheckpoint(fresh)
    deleted = await stubs.CheckpointStoreService.DeleteCheckpoint(
        pb.DeleteCheckpointRequest(namespace=ns, run_id="local-1")
    )
    again = await stubs.CheckpointStoreService.DeleteCheckpoint(
        pb.DeleteCheckpointRequest(namespace=ns, run_id="local-1")
    )
    assert deleted.deleted and not again.deleted
    gone = pb.LoadCheckpointRequest(namespace=ns, run_id="local-1")
    assert (
        await code_of(stubs.CheckpointStoreService.LoadCheckpoint(gone))
        == grpc.StatusCode.NOT_FOUND
    )


@pytest.fixture(params=["memory", "file", "remote"])
async def checkpoints(
    request: pytest.FixtureRequest, tmp_path: Path, stack: Stack
) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        yield InMemoryCheckpointStore()
    elif request.param == "file":
        yield FileCheckpointStore(tmp_path)
    else:
        store = RemoteCheckpointStore(stack.target, namespace=stack.namespace)
        yield store
        await store.close()


async def test_every_checkpoint_store_saves_loads_and_resumes(checkpoints: CheckpointStore) -> None:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    assert await checkpoints.load(run_id) is None
    assert await FLOW.run_with_checkpoint(1, checkpoints, run_id) == 20
    saved = checkpoint_of(await checkpoints.load(run_id) or b"")
    assert saved.sequence == 2 and json.loads(saved.output.data) == 20
    from floxide_grpc import AlreadyCompleted  # noqa: PLC0415

    with pytest.raises(AlreadyCompleted):
        await FLOW.resume(checkpoints, run_id)
