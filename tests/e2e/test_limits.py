"""Limits on every input, each refused before anything is written, naming the limit and value.

One server with small limits (as ``--limit NAME=VALUE`` would set them) and real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Put, Txn
from floxide_server.store.lifecycle import prune_counted
from floxide_server.store.payloads import Limits
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import FloxideError, NextAll, ResourceExhausted, Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    work_item_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, serving
from tests.helpers.channels import register_definition

pytestmark = pytest.mark.timeout(120)

SMALL = Limits(
    max_definition_nodes=3,
    max_definition_edges=2,
    max_schema_bytes=2000,
    max_fanout=5,
    max_runs_in_flight=2,
    max_streams_per_token=1,
    max_starts_per_second=0,  # none here: tests/e2e/test_limits.py's rate test sets its own
)


@node
def spread(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
def one(x: int) -> int:
    return x


@node(join=True)
def gather(values: list[int]) -> int:
    return sum(values)


@node
def tail(x: int) -> int:
    return x


FAN = Workflow("limit_fan", start=spread).edge(spread, one).edge(one, gather)


@node
def held(x: int) -> int:
    return x


HELD = Workflow("limit_held", start=held)  # nobody serves it: its runs stay in flight


@pytest.fixture
async def small(etcd: EmbeddedEtcd) -> AsyncIterator[tuple[Server, OrchestratorClient]]:
    async with _small(etcd, SMALL) as made:
        yield made


@pytest.fixture
async def slow_starts(etcd: EmbeddedEtcd) -> AsyncIterator[tuple[Server, OrchestratorClient]]:
    async with _small(etcd, dataclasses.replace(SMALL, max_starts_per_second=3)) as made:
        yield made


@contextlib.asynccontextmanager
async def _small(
    etcd: EmbeddedEtcd, limits: Limits
) -> AsyncIterator[tuple[Server, OrchestratorClient]]:
    async with serving([etcd.endpoint], ServerConfig(port=0, limits=limits)) as server:
        namespace = f"lim-{uuid.uuid4().hex[:8]}"
        async with OrchestratorClient(
            f"127.0.0.1:{server.port}", namespace=namespace, retries=0
        ) as client:
            yield server, client


async def test_limit_on_a_definitions_nodes_edges_and_schemas(
    small: tuple[Server, OrchestratorClient],
) -> None:
    _, client = small
    wide = Workflow("limit_wide", start=spread).edge(spread, one).edge(one, gather)
    wide = wide.edge(gather, tail)  # 4 nodes
    with pytest.raises(ResourceExhausted, match=r"over the limit of 3"):
        await client.register_workflow(wide)
    definition = FAN.definition()
    definition.nodes[0].input_schema = '{"type": "integer", "description": "' + "x" * 3000 + '"}'
    with pytest.raises(
        ResourceExhausted, match=r"input schema of \d+ bytes is over the limit of 2000"
    ):
        await register_definition(client.target, client.namespace, definition)
    assert await client.list_workflows() == []  # nothing was written


async def test_limit_on_a_fan_out_fails_the_attempt_naming_it(
    small: tuple[Server, OrchestratorClient],
) -> None:
    server, client = small
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", namespace=client.namespace)
    async with Worker([FAN], config):
        fine, _ = await client.start_run("limit_fan", 5)
        assert (await client.wait_for_completion(fine.run_id, timeout=30)).output == 10
        wide, _ = await client.start_run("limit_fan", 6)
        final = await client.wait_for_completion(wide.run_id, timeout=30)
    assert final.status is RunStatus.FAILED
    assert "fan-out of 6 branches is over the limit of 5" in str(final.error)
    assert len(await client.work_items(wide.run_id)) == 1  # no branch was made


async def test_limit_on_runs_in_flight_per_namespace(
    small: tuple[Server, OrchestratorClient],
) -> None:
    _, client = small
    await client.register_workflow(HELD)
    first, _ = await client.start_run("limit_held", 1, idempotency_key="first")
    await client.start_run("limit_held", 2)
    with pytest.raises(ResourceExhausted, match=r"2 runs in flight, its quota"):
        await client.start_run("limit_held", 3)
    again, created = await client.start_run("limit_held", 1, idempotency_key="first")
    assert again.run_id == first.run_id and not created  # a retried start starts nothing
    await client.cancel_run(first.run_id)  # one ends: room for one more
    await client.start_run("limit_held", 3)
    runs, _ = await client.list_runs()
    assert len(runs) == 3


async def test_limit_on_starts_per_second_of_a_token(
    slow_starts: tuple[Server, OrchestratorClient],
) -> None:
    server, client = slow_starts
    await client.register_workflow(FAN)
    token, _ = await client.create_token("eager", "client", [client.namespace])
    async with OrchestratorClient(
        f"127.0.0.1:{server.port}", namespace=client.namespace, token=token, retries=0
    ) as eager:
        outcomes = await asyncio.gather(
            *(eager.start_run("limit_fan", 1) for _ in range(5)), return_exceptions=True
        )
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    assert 1 <= len(refused) <= 2 and "limit of 3 per second" in str(refused[0])


async def test_limit_on_worker_streams_of_a_token(
    small: tuple[Server, OrchestratorClient],
) -> None:
    server, client = small
    token, _ = await client.create_token("workers", "worker", [client.namespace])
    config = WorkerConfig(
        server=f"127.0.0.1:{server.port}", namespace=client.namespace, token=token
    )
    async with Worker([FAN], config):
        await eventually(client.workers)
        with pytest.raises(FloxideError) as refused:
            await asyncio.wait_for(Worker([FAN], config).run(), 30)
    assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    assert "worker streams has 1 open, its limit" in str(refused.value)


class _Fake(
    orchestrator_service_pb2_grpc.OrchestratorServiceServicer,
    worker_service_pb2_grpc.WorkerServiceServicer,
):
    """A server of our own: takes the registration, then assigns a node no worker imported."""

    def __init__(self) -> None:
        self.result: asyncio.Future[worker_service_pb2.StepResult] = asyncio.Future()

    async def RegisterWorkflow(self, request, context):  # type: ignore[no-untyped-def]
        return orchestrator_service_pb2.RegisterWorkflowResponse(definition_hash="h1")

    async def Connect(self, requests, context):  # type: ignore[no-untyped-def]
        await anext(requests)  # the hello
        ack = worker_service_pb2.HelloAck(session_id="s1", protocol_version=1, max_credit=8)
        ack.lease_ttl.FromSeconds(30)
        ack.heartbeat_interval.FromSeconds(10)
        yield worker_service_pb2.ConnectResponse(hello_ack=ack)
        item = work_item_pb2.WorkItem(
            namespace="default", run_id="r", item_id="i", node="os_system", attempt=1,
            definition_hash="h1", input=work_item_pb2.Payload(data=b'"rm -rf /"'),
        )  # fmt: skip
        yield worker_service_pb2.ConnectResponse(
            assignments=[worker_service_pb2.Assignment(item=item, claim_token="t1")]
        )
        async for request in requests:
            if request.results and not self.result.done():
                self.result.set_result(request.results[0])


async def test_limit_no_code_from_the_wire_an_unknown_node_is_refused_not_run() -> None:
    fake = _Fake()  # type: ignore[abstract]
    server = grpc.aio.server()
    orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(fake, server)
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker = Worker([FAN], WorkerConfig(server=f"127.0.0.1:{port}", token=""))
    try:
        serving_ = asyncio.create_task(worker.run())
        try:
            result = await asyncio.wait_for(fake.result, 30)
        finally:
            serving_.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # what cancelling it raises
                await serving_
    finally:
        await server.stop(0)
    assert result.transition.WhichOneof("outcome") == "abort"
    assert "does not serve node 'os_system'" in result.transition.abort.message
    assert worker.executions == 0  # refused before anything ran


async def test_limit_quota_index_drops_runs_an_older_replica_ended(
    small: tuple[Server, OrchestratorClient],
) -> None:
    server, client = small
    await client.register_workflow(HELD)
    kept, _ = await client.start_run("limit_held", 1)
    ended, _ = await client.start_run("limit_held", 2)
    keys = Keys(client.namespace)
    # As a replica of an older version ends a run: its status moves, its index entry stays.
    await server.kv.txn(Txn([], [Put(keys.status(ended.run_id), b"COMPLETED")]))
    await server.kv.txn(Txn([], [Put(keys.running("gone-run"), b"")]))  # a run removed since
    assert await server.kv.count(keys.running()) == 3
    assert await prune_counted(server.kv, keys) == b""  # one page: back to the start next
    found, _ = await server.kv.range(keys.running())
    assert [kv.key for kv in found] == [keys.running(kept.run_id)]
