"""Deadlines are the server's, and run timeouts end runs: over a real stream, on real etcd.

A hand-driven worker (``Raw``) that never answers stands for a worker in any language that
ignores its deadline, or is stuck inside a node while it still heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from floxide_server.app import ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.sessions import SessionConfig
from floxide_server.store.keys import Keys
from floxide_server.store.payloads import Limits
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Backoff, NextAll, RetryPolicy, Workflow, node
from floxide_grpc._proto.floxide.v1 import worker_service_pb2
from floxide_grpc.errors import AlreadyExists, InvalidArgument
from floxide_grpc.records import RunStatus
from tests.conftest import Stack, stack_on
from tests.helpers.worker_stream import Raw, hello, result_of

GRACE = timedelta(milliseconds=200)
SESSIONS = SessionConfig(
    lease_ttl=timedelta(seconds=2),
    heartbeat_interval=timedelta(milliseconds=500),
    max_credit=16,
    deadline_grace=GRACE,
)
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@node(
    timeout=timedelta(seconds=1),
    retry=RetryPolicy(
        max_attempts=2,
        initial_backoff=timedelta(milliseconds=100),
        backoff=Backoff.FIXED,
        jitter=False,
    ),
)
def bounded(x: int) -> int:
    return x


@node(timeout=timedelta(milliseconds=300))
def tight(x: int) -> int:
    return x


BOUNDED = Workflow("bounded", start=bounded)
TIGHT = Workflow("tight", start=tight)


@pytest.fixture
async def stack(etcd: EmbeddedEtcd) -> AsyncIterator[Stack]:
    config = ServerConfig(port=0, sessions=SESSIONS, grace=timedelta(seconds=2))
    async with stack_on(etcd, config) as stack:
        yield stack


@pytest.fixture
async def raw(stack: Stack) -> AsyncIterator[Raw]:
    stream = Raw(stack.target)
    yield stream
    await stream.close()


async def next_with(raw: Raw, field: str) -> worker_service_pb2.ConnectResponse:
    """The next frame that has ``field`` set (heartbeat-free frames of other kinds skipped)."""
    while not getattr(response := await raw.read(), field):
        pass
    return response


async def test_a_worker_that_never_answers_times_out_its_attempt_and_the_retry_runs(
    stack: Stack, raw: Raw
) -> None:
    await stack.client.register_workflow(BOUNDED)
    await raw.send(hello(stack.namespace, "bounded", "bounded", credit=2))
    await raw.read()
    run, _ = await stack.client.start_run("bounded", 7)
    [first] = (await next_with(raw, "assignments")).assignments
    sent = time.monotonic()
    assert first.timeout.ToTimedelta() == timedelta(seconds=1) and not first.HasField("deadline")
    frame = await next_with(raw, "cancels")  # the worker says nothing: the server acts
    waited = time.monotonic() - sent
    [cancel] = frame.cancels
    assert cancel.claim_token == first.claim_token
    assert cancel.reason == worker_service_pb2.CANCEL_REASON_TIMEOUT
    assert waited >= 1.0 + GRACE.total_seconds()  # never before the timeout and its grace
    [error] = await stack.client.run_errors(run.run_id)
    assert (error.attempt, error.kind) == (1, "TIMEOUT")
    assert error.message.startswith("node 'bounded' timed out after 1s:")
    retry = frame.assignments[0] if frame.assignments else None
    if retry is None:
        [retry] = (await next_with(raw, "assignments")).assignments
    assert retry.item.attempt == 2
    [session] = stack.server.sessions.live.values()
    assert first.claim_token in session.held  # its slot stays taken until the worker reports
    await raw.send(result_of(first, 7))  # late: refused, and its slot comes back
    [late] = await raw.acks()
    assert late.code == FAILED_PRECONDITION
    assert first.claim_token not in session.held and session.credit.available == 1
    await raw.send(result_of(retry, 8))
    [applied] = await raw.acks()
    assert applied.code == 0
    done = await stack.client.wait_for_completion(run.run_id, 10)
    assert done.status is RunStatus.COMPLETED and done.output == 8


@node
def unbounded(x: int) -> int:
    return x


async def test_the_default_node_timeout_covers_a_node_without_one(etcd: EmbeddedEtcd) -> None:
    limits = Limits(default_node_timeout_ms=300)
    config = ServerConfig(port=0, sessions=SESSIONS, limits=limits, grace=timedelta(seconds=2))
    async with stack_on(etcd, config) as stack:
        client = stack.client
        await client.register_workflow(Workflow("unbounded", start=unbounded))
        raw = Raw(stack.target)
        try:
            await raw.send(hello(stack.namespace, "unbounded", "unbounded", credit=1))
            await raw.read()
            run, _ = await client.start_run("unbounded", 1)
            [held] = (await next_with(raw, "assignments")).assignments
            assert held.timeout.ToTimedelta() == timedelta(milliseconds=300)
            [cancel] = (await next_with(raw, "cancels")).cancels
            assert cancel.claim_token == held.claim_token  # timed out; its run failed too
            assert cancel.reason in (
                worker_service_pb2.CANCEL_REASON_TIMEOUT,
                worker_service_pb2.CANCEL_REASON_RUN_FINISHED,
            )
        finally:
            await raw.close()
        final = await client.wait_for_completion(run.run_id, 10)
        assert final.status is RunStatus.FAILED
        [error] = await client.run_errors(run.run_id)
        assert error.kind == "TIMEOUT" and "timed out after 0.3s" in error.message


async def test_a_result_in_flight_at_its_deadline_is_applied_or_times_out_never_both(
    stack: Stack, raw: Raw
) -> None:
    """Results sent about when the server's deadline passes: exactly one of the two wins.

    The first is sent at once (it must be applied) and the last once the timeout is recorded
    (it must be refused), so both outcomes are checked whatever the machine's speed; those
    between race the deadline itself.
    """
    await stack.client.register_workflow(TIGHT)
    await raw.send(hello(stack.namespace, "tight", "tight", credit=1))
    await raw.read()
    deadline = 0.3 + GRACE.total_seconds()
    waits: list[float | None] = [0.0, *(deadline - 0.02 + 0.01 * n for n in range(5)), None]
    outcomes = []
    for n, wait in enumerate(waits):
        run, _ = await stack.client.start_run("tight", n)
        [assignment] = (await next_with(raw, "assignments")).assignments
        if wait is None:
            await next_with(raw, "cancels")  # the server timed it out: now the result
        else:
            await asyncio.sleep(wait)  # the race itself
        await raw.send(result_of(assignment, n))
        [ack] = await raw.acks()
        final = await stack.client.wait_for_completion(run.run_id, 10)
        errors = await stack.client.run_errors(run.run_id)
        if ack.code == 0:
            assert final.status is RunStatus.COMPLETED and final.output == n and errors == []
        else:
            assert ack.code == FAILED_PRECONDITION
            assert final.status is RunStatus.FAILED
            assert [(e.attempt, e.kind) for e in errors] == [(1, "TIMEOUT")]
        outcomes.append(ack.code)
    assert outcomes[0] == 0 and outcomes[-1] == FAILED_PRECONDITION


@node
def fan(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
async def branch(x: int) -> int:
    await asyncio.sleep(0.05 * x)
    return x


@node(join=True)
def total(xs: list[int]) -> int:
    return sum(xs)


JOINED = Workflow("joined", start=fan).edge(fan, branch).edge(branch, total)


async def test_a_run_timeout_racing_its_join_ends_it_once_and_settled(stack: Stack) -> None:
    """Run timeouts about when the join is claimed: each run completes or times out, settled."""
    worker = Worker([JOINED], WorkerConfig(server=stack.target, namespace=stack.namespace, slots=4))
    async with worker:
        began = time.monotonic()
        assert await stack.client.run("joined", 4, timeout=30) == 6
        took = time.monotonic() - began  # timeouts around it: some runs end as the join runs
        # The first surely times out, the last surely completes; those between race the join.
        timeouts = [0.001, *(took * (0.5 + 0.1 * n) for n in range(10)), 60.0]
        finals = []
        for seconds in timeouts:
            started, _ = await stack.client.start_run(
                "joined", 4, run_timeout=timedelta(seconds=seconds)
            )
            finals.append(await stack.client.wait_for_completion(started.run_id, 30))
    assert finals[0].status is RunStatus.TIMED_OUT and finals[-1].status is RunStatus.COMPLETED
    assert {f.status for f in finals} <= {RunStatus.COMPLETED, RunStatus.TIMED_OUT}
    for final in finals:
        items = await stack.client.work_items(final.run_id)

        in_flight = [i for i in items if i.status in ("pending", "in_progress", "waiting_retry")]
        assert in_flight == [], final
        if final.status is RunStatus.COMPLETED:
            assert final.output == 6
        else:
            assert final.error and "run timeout of" in final.error
            assert (await stack.client.get_run(final.run_id)).status is RunStatus.TIMED_OUT


async def test_a_run_timeout_tells_the_worker_holding_its_item_to_stop(
    stack: Stack, raw: Raw
) -> None:
    await stack.client.register_workflow(BOUNDED)
    await raw.send(hello(stack.namespace, "bounded", "bounded", credit=1))
    await raw.read()
    run, _ = await stack.client.start_run("bounded", 1, run_timeout=timedelta(milliseconds=300))
    [held] = (await next_with(raw, "assignments")).assignments
    [cancel] = (await next_with(raw, "cancels")).cancels  # before the node's own 1 s timeout
    assert cancel.claim_token == held.claim_token
    assert cancel.reason == worker_service_pb2.CANCEL_REASON_RUN_TIMED_OUT
    await raw.send(result_of(held, 1))
    [refused] = await raw.acks()
    assert refused.code == FAILED_PRECONDITION and "timed out" in refused.message
    final = await stack.client.get_run(run.run_id)
    assert final.status is RunStatus.TIMED_OUT
    assert await stack.client.run_errors(run.run_id) == []  # no attempt failed: the run ended


async def test_run_timeout_and_its_errors_over_the_wire(stack: Stack) -> None:
    await stack.client.register_workflow(BOUNDED)
    for bad in (timedelta(0), timedelta(seconds=-1), timedelta(days=366)):
        with pytest.raises(InvalidArgument, match="run_timeout must be more than 0"):
            await stack.client.start_run("bounded", 1, run_timeout=bad)
    assert (await stack.client.list_runs())[0] == []
    started, _ = await stack.client.start_run(
        "bounded", 1, idempotency_key="k", run_timeout=timedelta(milliseconds=300)
    )
    assert started.run_timeout == timedelta(milliseconds=300)
    with pytest.raises(AlreadyExists):
        await stack.client.start_run("bounded", 1, idempotency_key="k", run_timeout=1.0)
    final = await stack.client.wait_for_completion(started.run_id, 10)  # no worker: it times out
    assert final.status is RunStatus.TIMED_OUT
    assert final.error == "the run passed its run timeout of 0.3s"
    timers, _ = await stack.server.kv.range(Keys(stack.namespace).timer(started.run_id))
    assert timers == []  # fired, and gone
