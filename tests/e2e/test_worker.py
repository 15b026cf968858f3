"""Workers over a real stream: runs end to end, and every bad input of the stream refused."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.sessions import SessionConfig
from floxide_server.store.completion import MAX_CHAIN
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import (
    AlreadyExists,
    Backoff,
    ClaimLost,
    Merge,
    Next,
    NextAll,
    NodeContext,
    ResourceExhausted,
    RetryPolicy,
    Workflow,
    node,
)
from floxide_grpc._proto.floxide.v1 import (
    records_pb2,
    work_item_pb2,
    worker_service_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, serving
from tests.helpers.channels import authorized_channel
from tests.helpers.worker_stream import Raw, hello, result_of


def js(value: object) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode()
    )


FAST = SessionConfig(
    lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(milliseconds=500), max_credit=16
)


@dataclass
class Tally:
    seen: Annotated[int, Merge.ADD] = 0
    log: Annotated[list[str], Merge.APPEND] = field(default_factory=list)


@node
def fan(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
async def square(ctx: NodeContext, x: int) -> int:
    ctx.add("seen", 1)
    return x * x


@node(join=True)
def total(values: list[int]) -> int:
    return sum(values)


FANOUT = Workflow("squares", start=fan, context=Tally).edge(fan, square).edge(square, total)

flaky_calls: list[int] = []


@node(
    retry=RetryPolicy(
        max_attempts=3,
        initial_backoff=timedelta(milliseconds=50),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
def flaky(ctx: NodeContext, x: int) -> int:
    flaky_calls.append(ctx.attempt)
    if ctx.attempt < 3:
        raise ConnectionError("not yet")
    return x


FLAKY = Workflow("flaky", start=flaky)


@node
def echo(x: int) -> int:
    return x


ECHO = Workflow("echo", start=echo)


@dataclass
class Cluster:
    server: Server
    namespace: str
    client: OrchestratorClient

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def worker(self, *workflows: Workflow, slots: int = 2) -> Worker:
        return Worker(
            list(workflows), WorkerConfig(server=self.target, namespace=self.namespace, slots=slots)
        )


@pytest.fixture
async def cluster(etcd: EmbeddedEtcd) -> AsyncIterator[Cluster]:
    config = ServerConfig(port=0, sessions=FAST, grace=timedelta(seconds=2))
    async with serving([etcd.endpoint], config) as server:
        namespace = f"ns-{uuid.uuid4().hex[:10]}"
        client = OrchestratorClient(f"127.0.0.1:{server.port}", namespace=namespace, retries=0)
        async with client:
            yield Cluster(server, namespace, client)


async def test_a_fan_out_runs_on_two_workers_and_joins_once(cluster: Cluster) -> None:
    async with cluster.worker(FANOUT) as first, cluster.worker(FANOUT) as second:
        output = await cluster.client.run("squares", 20, timeout=60)
        assert output == sum(x * x for x in range(20))
        run = (await cluster.client.list_runs())[0][0]
        assert await cluster.client.run_context(run.run_id) == {"seen": 20, "log": []}
        assert first.executions + second.executions == 22  # fan, 20 squares, total


async def test_a_wide_fan_out_on_many_slots_joins_once(cluster: Cluster) -> None:
    """16 branches of one group complete at once: none is dropped for contention."""
    async with cluster.worker(FANOUT, slots=16) as worker:
        output = await cluster.client.run("squares", 96, timeout=30)
        assert output == sum(x * x for x in range(96))
        assert worker.executions == 98


async def test_a_worker_with_more_slots_than_the_server_allows_stops_with_the_reason(
    cluster: Cluster,
) -> None:
    worker = cluster.worker(ECHO, slots=FAST.max_credit + 1)
    with pytest.raises(ResourceExhausted) as refused:  # the SDK's error, as the status says
        await asyncio.wait_for(worker.run(), 30)
    assert f"over the limit of {FAST.max_credit}" in str(refused.value)


async def test_a_retry_waits_on_a_durable_timer_and_succeeds(cluster: Cluster) -> None:
    flaky_calls.clear()
    async with cluster.worker(FLAKY):
        assert await cluster.client.run("flaky", 7, timeout=60) == 7
    assert flaky_calls == [1, 2, 3]
    run = (await cluster.client.list_runs())[0][0]
    errors = await cluster.client.run_errors(run.run_id)
    assert [(e.attempt, e.kind) for e in errors] == [(1, "GENERIC"), (2, "GENERIC")]


async def test_many_runs_complete_with_limited_credit(cluster: Cluster) -> None:
    async with cluster.worker(ECHO, slots=1):
        outputs = await asyncio.gather(
            *(cluster.client.run("echo", n, timeout=60) for n in range(30))
        )
    assert outputs == list(range(30))


async def test_drain_finishes_and_closes(cluster: Cluster) -> None:
    worker = cluster.worker(ECHO)
    async with worker:
        assert await cluster.client.run("echo", 1, timeout=60) == 1
    assert worker._stopped.is_set()
    workers = await cluster.client.workers()
    assert workers == []  # the session ended with the stream


# -- the raw stream ------------------------------------------------------------------------------


@pytest.fixture
async def raw(cluster: Cluster) -> AsyncIterator[Raw]:
    await cluster.client.register_workflow(ECHO)
    stream = Raw(cluster.target)
    yield stream
    await stream.close()


async def test_results_are_fenced_in_band(cluster: Cluster, raw: Raw) -> None:
    await raw.send(hello(cluster.namespace))
    ack = await raw.read()
    assert ack.hello_ack.session_id and ack.hello_ack.lease_ttl.ToTimedelta() == timedelta(
        seconds=2
    )
    run, _ = await cluster.client.start_run("echo", 5)
    [assignment] = (await raw.read()).assignments
    assert json.loads(assignment.item.input.data) == 5
    # A result for an item this worker does not hold.
    forged = worker_service_pb2.Assignment()
    forged.CopyFrom(assignment)
    forged.claim_token = "ffff:1:1:" + assignment.item.run_id + ":" + assignment.item.item_id
    await raw.send(result_of(forged, 5))
    [refused] = await raw.acks()
    assert (refused.code, refused.reason) == (ClaimLost.code, "CLAIM_LOST")
    await raw.send(result_of(assignment, 5))
    [applied] = await raw.acks()
    assert (applied.code, applied.reason) == (0, "")
    await raw.send(result_of(assignment, 5))
    [again] = await raw.acks()
    assert (again.code, again.reason) == (AlreadyExists.code, "ALREADY_EXISTS")
    done = await cluster.client.wait_for_completion(run.run_id, 10)
    assert done.status is RunStatus.COMPLETED and done.output == 5


async def test_a_result_whose_token_or_fields_are_not_its_claims_is_refused_and_records_nothing(
    cluster: Cluster, raw: Raw
) -> None:
    """Every field of a token and of the result must match the claim (the token is compared
    whole in the completing Txn): anything else is FAILED_PRECONDITION, and nothing changes."""
    await raw.send(hello(cluster.namespace))
    session = (await raw.read()).hello_ack.session_id
    run, _ = await cluster.client.start_run("echo", 5)
    [assignment] = (await raw.read()).assignments
    item = assignment.item
    lease, nonce, attempt, run_id, item_id = assignment.claim_token.split(":")
    assert (lease, attempt, run_id, item_id) == (session, "1", item.run_id, item.item_id)

    def forged(token: str, **fields: object) -> worker_service_pb2.ConnectRequest:
        request = result_of(assignment, 666)
        request.results[0].claim_token = token
        for name, value in fields.items():
            setattr(request.results[0], name, value)
        return request

    attempts = [
        forged(f"{lease}:{nonce}:2:{run_id}:{item_id}", attempt=2),  # its attempt changed
        forged(f"{lease}:{'0' * 16}:1:{run_id}:{item_id}"),  # another claim's nonce
        forged(assignment.claim_token, attempt=2),  # the result says another attempt
        forged(assignment.claim_token, item_id="elsewhere"),  # ... another item
        forged(assignment.claim_token, run_id=str(uuid.uuid4())),  # ... another run
        forged(f"{lease}:{nonce}:1:{run_id}:nothing", item_id="nothing"),  # names no item
        forged(f"{lease}:{nonce}:1:{uuid.uuid4()}:{item_id}", run_id="x"),  # names no run
        forged(f"ffff:{nonce}:1:{run_id}:{item_id}"),  # another session's
        forged(f"0x{lease}:{nonce}:1:{run_id}:{item_id}"),  # its own, spelt otherwise
        forged(f"{lease.upper()}:{nonce}:01:{run_id}:{item_id}"),
        forged("not-a-token"),
        forged(""),
    ]
    for request in attempts:
        await raw.send(request)
        [refused] = await raw.acks()
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], request
    [state] = await cluster.client.work_items(run.run_id)
    assert (state.status, state.attempts) == ("in_progress", 1)
    assert await cluster.client.run_errors(run.run_id) == []
    await raw.send(result_of(assignment, 5))  # the holder's own result is still applied
    [applied] = await raw.acks()
    assert applied.code == 0
    done = await cluster.client.wait_for_completion(run.run_id, 10)
    assert done.status is RunStatus.COMPLETED and done.output == 5


async def test_applying_acks_before_assignments_never_holds_more_than_the_credit(
    cluster: Cluster, raw: Raw
) -> None:
    """A worker applying each frame's result_acks before its assignments (the documented order)
    never holds more than it granted: an assignment in a slot a result returned never comes
    before that result's acknowledgement. Three fan-outs of 8 and their joins, through one
    stream of credit 2: sticky successors and dispatched items alike."""
    await cluster.client.register_workflow(FANOUT)
    credit = 2
    opening = hello(cluster.namespace, "squares", "fan", credit=credit)
    opening.hello.nodes.extend(
        records_pb2.ServedNode(workflow="squares", node=name) for name in ("square", "total")
    )
    await raw.send(opening)
    assert (await raw.read()).hello_ack.session_id
    runs = [(await cluster.client.start_run("squares", 8))[0] for _ in range(3)]
    held: set[str] = set()
    finished = 0
    most = 0
    over_in_field_order = 0  # frames that field order would have counted over the credit
    while finished < 3:
        frame = await raw.read()
        over_in_field_order += len(held) + len(frame.assignments) > credit
        for ack in frame.result_acks:  # first, as the protocol says
            assert ack.code == 0, ack.message
            held.discard(ack.claim_token)
        for assignment in frame.assignments:
            held.add(assignment.claim_token)
        most = max(most, len(held))
        assert len(held) <= credit, f"holding {len(held)} with credit {credit}"
        for assignment in frame.assignments:
            value = json.loads(assignment.item.input.data)
            node_name = assignment.item.node
            if node_name == "fan":
                request = result_of(assignment, None)
                outputs = [js(i) for i in range(value)]
                request.results[0].transition.CopyFrom(
                    work_item_pb2.Transition(
                        next_all=work_item_pb2.Transition.NextAll(outputs=outputs)
                    )
                )
            else:
                request = result_of(
                    assignment, value * value if node_name == "square" else sum(value)
                )
                finished += node_name == "total"
            await raw.send(request)
    assert most == credit  # the test held as much as it could
    assert over_in_field_order  # sticky successors ride with their acks: the order matters
    for run in runs:
        done = await cluster.client.wait_for_completion(run.run_id, 10)
        assert done.status is RunStatus.COMPLETED and done.output == sum(i * i for i in range(8))


async def test_a_result_repeated_in_one_frame_is_applied_once_and_returns_one_slot(
    cluster: Cluster, raw: Raw
) -> None:
    await raw.send(hello(cluster.namespace, credit=1))
    await raw.read()
    await cluster.client.start_run("echo", 5)
    [assignment] = (await raw.read()).assignments
    twice = result_of(assignment, 5)
    twice.results.append(twice.results[0])
    await raw.send(twice)
    acks = await raw.acks()
    assert [a.code for a in acks] == [0, grpc.StatusCode.ALREADY_EXISTS.value[0]]
    [session] = cluster.server.sessions.live.values()
    assert session.credit.available == 1 and not session.held  # its one slot back, not two


def test_a_worker_sends_what_waits_together_in_one_frame() -> None:
    from floxide_worker.worker import _Stream  # noqa: PLC0415

    async def go() -> list[worker_service_pb2.ConnectRequest]:
        stream = _Stream()
        first = worker_service_pb2.StepResult(claim_token="a")
        second = worker_service_pb2.StepResult(claim_token="b")
        stream.outbox.put_nowait(worker_service_pb2.ConnectRequest(results=[first], credit=1))
        stream.outbox.put_nowait(worker_service_pb2.ConnectRequest(results=[second], credit=2))
        stream.outbox.put_nowait(None)
        return [request async for request in stream.requests()]

    [frame] = asyncio.run(go())
    assert [r.claim_token for r in frame.results] == ["a", "b"] and frame.credit == 3


async def test_an_output_breaking_the_schema_is_a_failed_attempt(
    cluster: Cluster, raw: Raw
) -> None:
    await raw.send(hello(cluster.namespace))
    await raw.read()
    run, _ = await cluster.client.start_run("echo", 5)
    [assignment] = (await raw.read()).assignments
    await raw.send(result_of(assignment, "five"))
    [ack] = await raw.acks()
    assert (
        ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        and "not of type 'integer'" in ack.message
    )
    errors = await cluster.client.run_errors(run.run_id)
    assert [(e.node, e.kind) for e in errors] == [("echo", "INVALID_OUTPUT")]


async def test_a_hello_for_a_node_no_workflow_has_is_not_found(cluster: Cluster, raw: Raw) -> None:
    await raw.send(hello(cluster.namespace, node_name="ghost"))
    assert await raw.status() == grpc.StatusCode.NOT_FOUND
    assert await cluster.client.workers() == []


async def test_a_first_message_without_hello_is_invalid(cluster: Cluster, raw: Raw) -> None:
    await raw.send(worker_service_pb2.ConnectRequest(credit=1))
    assert await raw.status() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_unsupported_protocol_version_is_refused(cluster: Cluster, raw: Raw) -> None:
    message = hello(cluster.namespace)
    message.hello.protocol_version = 99
    await raw.send(message)
    assert await raw.status() == grpc.StatusCode.FAILED_PRECONDITION


async def test_credit_beyond_the_limit_ends_the_stream(cluster: Cluster, raw: Raw) -> None:
    await raw.send(hello(cluster.namespace))
    await raw.read()
    await raw.send(worker_service_pb2.ConnectRequest(credit=100))
    assert await raw.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await cluster.client.workers() == []


async def test_garbage_ends_its_stream_only_and_changes_nothing(cluster: Cluster) -> None:
    """A fault of one stream ends that stream with its status: the server and the other
    streams go on (each stream's tasks are in a task group of its own)."""
    await cluster.client.register_workflow(ECHO)
    async with cluster.worker(ECHO) as worker:  # a stream open before the fault, and after
        channel = authorized_channel(cluster.target)
        call = channel.stream_stream(
            "/floxide.v1.WorkerService/Connect",
            request_serializer=lambda raw_bytes: raw_bytes,
            response_deserializer=worker_service_pb2.ConnectResponse.FromString,
        )()
        await call.write(hello(cluster.namespace).SerializeToString())
        first = await call.read()
        assert isinstance(first, worker_service_pb2.ConnectResponse) and first.hello_ack.session_id
        await call.write(b"\xff\xff\xff\xff garbage")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await asyncio.wait_for(call.read(), 10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await channel.close()
        assert await cluster.client.run("echo", 7, timeout=30) == 7
        assert worker.executions == 1 and len(cluster.server.sessions.live) == 1
    assert not cluster.server.stopping.is_set()


async def test_a_busy_run_does_not_starve_another(cluster: Cluster) -> None:
    async with cluster.worker(FANOUT, ECHO, slots=1):
        busy, _ = await cluster.client.start_run("squares", 60)

        async def fanned_out() -> bool:
            return len(await cluster.client.work_items(busy.run_id)) > 10

        await eventually(fanned_out, within=30)
        quick, _ = await cluster.client.start_run("echo", 1)
        done = await cluster.client.wait_for_completion(quick.run_id, timeout=60)
        busy_now = await cluster.client.get_run(busy.run_id)
        assert done.status is RunStatus.COMPLETED
        assert busy_now.status is RunStatus.RUNNING  # the quick run did not wait for the busy one
        assert (await cluster.client.wait_for_completion(busy.run_id, timeout=60)).output == sum(
            x * x for x in range(60)
        )


laps: list[str] = []
lapping = asyncio.Event()
LAPS = 6 * MAX_CHAIN


@node
async def lap(x: int) -> Next[int]:
    laps.append("lap")
    lapping.set()
    return Next(x + 1, route="again" if x + 1 < LAPS else "done")


@node
def once(x: int) -> int:
    laps.append("once")
    return x


LOOP = Workflow("loop", start=lap, allow_cycles=True).route(lap, {"again": lap, "done": None})
ONCE = Workflow("once", start=once)


async def test_a_chain_kept_on_its_worker_yields_the_slot_to_other_runs(cluster: Cluster) -> None:
    """Each result of a chain claims its successor for the same slot (sticky), but only
    MAX_CHAIN times in a row: then the slot goes back to dispatch, which serves the run that
    waited.
    """
    laps.clear()
    lapping.clear()
    async with cluster.worker(LOOP, ONCE, slots=1):
        long, _ = await cluster.client.start_run("loop", 0)
        await asyncio.wait_for(lapping.wait(), 30)
        before = len(laps)
        short, _ = await cluster.client.start_run("once", 7)
        assert (await cluster.client.wait_for_completion(short.run_id, timeout=60)).output == 7
        assert (await cluster.client.wait_for_completion(long.run_id, timeout=60)).output == LAPS
    waited = laps.index("once") - before
    assert laps.count("lap") == LAPS
    assert waited <= 3 * MAX_CHAIN  # without the cap it waits for all the laps left


cancelled_seen: list[bool] = []
waiting_started = asyncio.Event()


@node
async def wait_for_cancel(ctx: NodeContext, x: int) -> int:
    waiting_started.set()
    try:
        await asyncio.wait_for(ctx.wait_cancelled(), 30)
    finally:
        cancelled_seen.append(ctx.cancelled)
    return x


WAITER = Workflow("waiter", start=wait_for_cancel)


async def test_cancel_reaches_the_node_on_its_worker(cluster: Cluster) -> None:
    cancelled_seen.clear()
    waiting_started.clear()
    async with cluster.worker(WAITER, ECHO, slots=1) as worker:
        run, _ = await cluster.client.start_run("waiter", 1)
        await asyncio.wait_for(waiting_started.wait(), 30)
        await cluster.client.cancel_run(run.run_id, "stop it")
        assert (
            await cluster.client.wait_for_completion(run.run_id, 30)
        ).status is RunStatus.CANCELLED

        async def saw_it() -> bool:
            return cancelled_seen == [True]

        await eventually(saw_it, within=30)
        # The slot came back: the worker takes the next run.
        assert await cluster.client.run("echo", 3, timeout=30) == 3
        assert worker.executions == 2


gate = asyncio.Event()
gate_reached = asyncio.Event()


@node
async def gated(x: int) -> int:
    gate_reached.set()
    await asyncio.wait_for(gate.wait(), 30)
    return x + 1


@node
def after_gate(x: int) -> int:
    return x * 100


GATED = Workflow("gated", start=gated).edge(gated, after_gate)


async def test_pause_racing_an_in_flight_step_keeps_its_result_and_holds_the_rest(
    cluster: Cluster,
) -> None:
    gate.clear()
    gate_reached.clear()
    async with cluster.worker(GATED, slots=2) as worker:
        run, _ = await cluster.client.start_run("gated", 1)
        await asyncio.wait_for(gate_reached.wait(), 30)
        await cluster.client.pause_run(run.run_id)
        gate.set()  # the held item finishes while the run is paused

        async def recorded() -> bool:
            items = {i.node: i.status for i in await cluster.client.work_items(run.run_id)}
            return items == {"gated": "completed", "after_gate": "pending"}

        await eventually(recorded, within=30)
        assert worker.executions == 1  # nothing dispatched while paused
        assert (await cluster.client.get_run(run.run_id)).status is RunStatus.PAUSED
        await cluster.client.resume_run(run.run_id)
        done = await cluster.client.wait_for_completion(run.run_id, 30)
        assert done.output == 200 and worker.executions == 2
