"""Every orchestrator RPC over a real socket, against a real etcd."""

from __future__ import annotations

import asyncio
import types
import typing
import uuid
from dataclasses import dataclass
from typing import Annotated

import grpc
import pytest
from floxide_server.app import SERVICE_NAMES
from floxide_server.dispatch import Dispatcher
from floxide_server.sessions import Sessions
from floxide_server.store.claims import Claims, ClaimToken
from floxide_server.watch import Watches
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from floxide_grpc import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Merge,
    NotFound,
    ResourceExhausted,
    Workflow,
    node,
)
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2 as pb
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2_grpc,
    work_item_pb2,
    worker_service_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.conftest import Stack, run_to_completion
from tests.helpers.channels import authorized_channel, register_definition


@dataclass
class Totals:
    seen: Annotated[int, Merge.ADD] = 0


@node
def double(x: int) -> int:
    return x * 2


@node
def show(x: int) -> str:
    return str(x)


FLOW = Workflow("doubler", start=double, context=Totals).edge(double, show)


async def test_register_get_and_list_workflows(stack: Stack) -> None:
    definition_hash = await stack.client.register_workflow(FLOW)
    assert await stack.client.register_workflow(FLOW) == definition_hash
    registered = await stack.client.get_workflow("doubler")
    assert registered.definition_hash == definition_hash and registered.name == "doubler"
    assert registered.definition == json_format.MessageToDict(
        FLOW.definition(), preserving_proto_field_name=True
    )
    assert await stack.client.list_workflows() == [("doubler", definition_hash)]
    with pytest.raises(NotFound, match="workflow 'nope' is not registered"):
        await stack.client.get_workflow("nope")


async def test_an_invalid_definition_is_invalid_argument_naming_the_node(stack: Stack) -> None:
    definition = FLOW.definition()
    definition.edges[0].targets[0] = "ghost"
    with pytest.raises(InvalidArgument, match="edge from 'double' to unknown node 'ghost'"):
        await register_definition(stack.target, stack.namespace, definition)
    assert await stack.client.list_workflows() == []


async def test_start_get_list_and_idempotency(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, created = await stack.client.start_run("doubler", 21, idempotency_key="k1")
    again, created_again = await stack.client.start_run("doubler", 21, idempotency_key="k1")
    assert created and not created_again and again.run_id == run.run_id
    assert run.status is RunStatus.RUNNING and run.input == 21
    with pytest.raises(AlreadyExists, match="idempotency key 'k1'"):
        await stack.client.start_run("doubler", 22, idempotency_key="k1")
    other, _ = await stack.client.start_run("doubler", 5)
    listed, token = await stack.client.list_runs()
    assert [r.run_id for r in listed] == [other.run_id, run.run_id] and token == ""
    page, token = await stack.client.list_runs(page_size=1)
    assert [r.run_id for r in page] == [other.run_id] and token
    assert (await stack.client.get_run(run.run_id)).workflow == "doubler"


async def test_bad_starts_get_clear_statuses_and_change_nothing(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    with pytest.raises(NotFound, match="workflow 'missing' is not registered"):
        await stack.client.start_run("missing", 1)
    with pytest.raises(InvalidArgument, match="'one' is not of type 'integer'"):
        await stack.client.start_run("doubler", "one")
    with pytest.raises(ResourceExhausted, match="over the limit of 2048"):
        await stack.client.start_run("doubler", "x" * 3000)
    with pytest.raises(InvalidArgument, match="context field 'nope' is not declared"):
        await stack.client.start_run("doubler", 1, context={"nope": 1})
    with pytest.raises(NotFound, match=r"run .* not found"):
        await stack.client.get_run(str(uuid.uuid4()))
    assert (await stack.client.list_runs())[0] == []


async def test_an_oversized_grpc_message_is_refused(stack: Stack) -> None:
    channel = authorized_channel(stack.target)
    stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
    huge = work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=b'"' + b"x" * 100_000 + b'"'
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartRun(
            pb.StartRunRequest(namespace=stack.namespace, workflow="doubler", input=huge)
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await channel.close()
    assert (await stack.client.list_runs())[0] == []


async def test_a_run_completes_and_its_records_are_readable(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("doubler", 21)
    waiting = asyncio.create_task(stack.client.wait_for_completion(run.run_id, timeout=30))
    await run_to_completion(stack, run.run_id, [42, "42"])
    done = await waiting
    assert done.status is RunStatus.COMPLETED and done.output == "42"
    metrics = await stack.client.run_metrics(run.run_id)
    assert (metrics.total_work_items, metrics.completed) == (2, 2)
    assert await stack.client.run_context(run.run_id) == {"seen": 0}
    items = await stack.client.work_items(run.run_id)
    assert sorted((i.node, i.status, i.attempts) for i in items) == [
        ("double", "completed", 1),
        ("show", "completed", 1),
    ]
    assert await stack.client.work_items(run.run_id, pending_only=True) == []
    assert await stack.client.run_errors(run.run_id) == []
    [worker] = await stack.client.workers()
    assert (worker.worker_id, worker.liveness, worker.slots) == ("test-worker", "alive", 1)


async def test_wait_streams_each_status_until_final(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("doubler", 1)
    seen: list[RunStatus] = []

    async def follow() -> None:
        async for update in stack.client.watch_run(run.run_id):
            seen.append(update.status)
            if update.status is RunStatus.RUNNING and len(seen) == 1:
                await stack.client.pause_run(run.run_id)
            elif update.status is RunStatus.PAUSED:
                await stack.client.cancel_run(run.run_id, "enough")

    await asyncio.wait_for(follow(), 30)
    assert seen == [RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.CANCELLED]


async def test_control_of_runs_and_its_preconditions(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("doubler", 1)
    with pytest.raises(FailedPrecondition, match=r"cannot resume run .* it is running"):
        await stack.client.resume_run(run.run_id)
    assert (await stack.client.pause_run(run.run_id)).status is RunStatus.PAUSED
    assert (await stack.client.resume_run(run.run_id)).status is RunStatus.RUNNING
    pending = await stack.client.work_items(run.run_id, pending_only=True)
    assert [i.node for i in pending] == ["double"]
    cancelled = await stack.client.cancel_run(run.run_id, "no longer needed")
    assert cancelled.status is RunStatus.CANCELLED and cancelled.error == "no longer needed"
    with pytest.raises(FailedPrecondition, match=r"cannot cancel run .* it is cancelled"):
        await stack.client.cancel_run(run.run_id)
    with pytest.raises(NotFound):
        await stack.client.pause_run(str(uuid.uuid4()))


async def test_malformed_requests_are_invalid_argument(stack: Stack) -> None:
    with pytest.raises(InvalidArgument, match="run id '' is missing or malformed"):
        await stack.client.get_run("")
    with pytest.raises(InvalidArgument, match="page_token"):
        await stack.client.list_runs(page_token="%%%")
    bad = OrchestratorClient(stack.target, namespace="bad namespace!", retries=0)
    with pytest.raises(InvalidArgument, match="namespace 'bad namespace!'"):
        await bad.list_workflows()
    await bad.close()


async def test_health_is_serving_and_reflection_lists_the_services(stack: Stack) -> None:
    channel = authorized_channel(stack.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICE_NAMES):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {
        "floxide.v1.OrchestratorService",
        "floxide.v1.WorkerService",
        "grpc.health.v1.Health",
    } <= names
    await channel.close()


async def test_shutdown_ends_waits_with_unavailable(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("doubler", 1)
    channel = authorized_channel(stack.target)
    stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
    call = stub.WaitForCompletion(
        pb.WaitForCompletionRequest(namespace=stack.namespace, run_id=run.run_id)
    )
    first = await call.read()
    assert isinstance(first, pb.WaitForCompletionResponse) and first.run.run_id == run.run_id
    await stack.server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()


async def test_pending_work_and_errors_of_a_failed_attempt(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("doubler", 1)
    channel = authorized_channel(stack.target)
    stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
    pending = await stub.ListPendingWork(
        pb.ListPendingWorkRequest(namespace=stack.namespace, run_id=run.run_id)
    )
    assert [i.node for i in pending.items] == ["double"]
    await run_to_completion(stack, run.run_id, ["not a number"])  # breaks double's output schema
    errors = await stack.client.run_errors(run.run_id)
    assert [(e.node, e.attempt, e.kind) for e in errors] == [("double", 1, "INVALID_OUTPUT")]
    assert "is not of type 'integer'" in errors[0].message
    assert (await stack.client.get_run(run.run_id)).status is RunStatus.FAILED
    pending = await stub.ListPendingWork(
        pb.ListPendingWorkRequest(namespace=stack.namespace, run_id=run.run_id)
    )
    assert list(pending.items) == []
    await channel.close()


def test_a_claim_handed_over_as_its_run_ends_is_cancelled_with_its_assignment() -> None:
    """A completion hands its successor over only once its Txn returns: a run seen ending in
    between must still be cancelled for it (the stream sends the Cancel after the assignment)."""
    sessions = typing.cast(Sessions, types.SimpleNamespace(live={}))
    dispatcher = Dispatcher(typing.cast(Claims, None), typing.cast(Watches, None), sessions)
    token = str(ClaimToken.new(0x1F, 1, "run-a", "item-b"))
    assert dispatcher.cancel_if_ended("ns", token, 42) is None
    dispatcher.run_ended("ns", "run-a", worker_service_pb2.CANCEL_REASON_RUN_FINISHED, 50)
    cancel = dispatcher.cancel_if_ended("ns", token, 42)
    assert cancel is not None and (cancel.claim_token, cancel.item_id) == (token, "item-b")
    assert cancel.reason == worker_service_pb2.CANCEL_REASON_RUN_FINISHED
    assert dispatcher.cancel_if_ended("other-ns", token, 42) is None
    resumed = str(ClaimToken.new(0x1F, 2, "run-a", "item-b"))  # claimed after it ended: resumed
    assert dispatcher.cancel_if_ended("ns", resumed, 60) is None
