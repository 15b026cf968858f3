"""Claims a worker never received are caught from its side: its heartbeats list what it holds.

An orphan is a claim of a live session that its replica never learned it made (a claim applied
while its reply was lost for longer than the replica kept asking). The test makes one by
claiming an item for a raw worker's session from another process's store, as that replica
would have: the worker never gets it, never lists it, and the server releases it without using
an attempt. A claim the worker lists stays.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from floxide_server.app import ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import SessionConfig
from floxide_server.store import Store, queue
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KVUnavailable

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import worker_service_pb2
from floxide_grpc.records import RunStatus
from tests.conftest import Stack, stack_on
from tests.helpers import eventually
from tests.helpers.worker_stream import Raw, hello, result_of

HEARTBEAT = 0.3
SESSIONS = SessionConfig(
    lease_ttl=timedelta(seconds=5), heartbeat_interval=timedelta(seconds=HEARTBEAT)
)


@node
def echo(x: int) -> int:
    return x


ECHO = Workflow("echo", start=echo)


@pytest.fixture
async def stack(etcd: EmbeddedEtcd) -> AsyncIterator[Stack]:
    config = ServerConfig(port=0, sessions=SESSIONS, grace=timedelta(seconds=2))
    async with stack_on(etcd, config) as stack:
        yield stack


@pytest.fixture
async def other(etcd: EmbeddedEtcd) -> AsyncIterator[Store]:
    """Another replica's store, on the same etcd."""
    kv = EtcdKV([etcd.endpoint])
    try:
        yield Store.open(kv, ServerConfig().limits)
    finally:
        await kv.close()


@contextlib.asynccontextmanager
async def heartbeating(raw: Raw, held: list[str]) -> AsyncIterator[None]:
    """Heartbeat as a worker that lists the claims it holds (``held``, as it changes)."""
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            heartbeat = worker_service_pb2.Heartbeat(held_claim_tokens=held)
            await raw.send(worker_service_pb2.ConnectRequest(heartbeat=heartbeat))
            await asyncio.sleep(HEARTBEAT)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(beat())
        try:
            yield
        finally:
            stop.set()


async def test_a_claim_its_worker_never_lists_is_released_without_using_an_attempt(
    stack: Stack, other: Store
) -> None:
    await stack.client.register_workflow(ECHO)
    raw = Raw(stack.target)
    try:
        opening = hello(stack.namespace, credit=0)  # nothing is dispatched to it yet
        opening.hello.lists_claims = True
        await raw.send(opening)
        lease = int((await raw.read()).hello_ack.session_id, 16)
        run, _ = await stack.client.start_run("echo", 5)
        [item] = await eventually(lambda: queue.ready(stack.server.kv, stack.namespace))
        orphan = await other.claims.claim(stack.namespace, lease, run.run_id, item.item_id)
        assert orphan is not None  # made for the session; its replica never learned of it
        async with heartbeating(raw, []):

            async def requeued() -> bool:
                claims, _ = await stack.server.kv.range(Keys(stack.namespace).claim(lease))
                return not claims and bool(await queue.ready(stack.server.kv, stack.namespace))

            await eventually(requeued, within=10)
            [pending] = await stack.client.work_items(run.run_id)
            assert (pending.status, pending.attempts) == ("pending", 1)  # no attempt used
            assert await stack.client.run_errors(run.run_id) == []  # and none recorded
            await raw.send(worker_service_pb2.ConnectRequest(credit=1))
            while not (frame := await raw.read()).assignments:
                pass
            [assignment] = frame.assignments
            assert assignment.item.attempt == 1
            await raw.send(result_of(assignment, 5))
            done = await stack.client.wait_for_completion(run.run_id, 10)
            assert done.status is RunStatus.COMPLETED and done.output == 5
    finally:
        await raw.close()


async def test_a_claim_its_worker_lists_stays_held(stack: Stack) -> None:
    await stack.client.register_workflow(ECHO)
    raw = Raw(stack.target)
    held: list[str] = []
    try:
        opening = hello(stack.namespace, credit=1)
        opening.hello.lists_claims = True
        await raw.send(opening)
        await raw.read()
        async with heartbeating(raw, held):
            run, _ = await stack.client.start_run("echo", 7)
            while not (frame := await raw.read()).assignments:
                pass
            [assignment] = frame.assignments
            held.append(assignment.claim_token)  # listed from the next heartbeat on
            await asyncio.sleep(10 * HEARTBEAT)  # many heartbeats: each lists it
            [session] = stack.server.sessions.live.values()
            assert assignment.claim_token in session.held
            await raw.send(result_of(assignment, 7))
            done = await stack.client.wait_for_completion(run.run_id, 10)
        assert done.status is RunStatus.COMPLETED and done.output == 7
        assert await stack.client.run_errors(run.run_id) == []
    finally:
        await raw.close()


async def test_a_check_etcd_does_not_answer_leaves_the_stream_alone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stack.client.register_workflow(ECHO)
    raw = Raw(stack.target)
    try:
        opening = hello(stack.namespace, credit=1)
        opening.hello.lists_claims = True
        await raw.send(opening)
        await raw.read()
        [session] = stack.server.sessions.live.values()

        async def silent(*_: object, **__: object) -> None:
            raise KVUnavailable("etcd unreachable")

        monkeypatch.setattr(stack.server.kv, "range", silent)
        await stack.server.sessions.check_listed(session, [])  # no error: checked next time
        assert not session.checking
        monkeypatch.undo()
        run, _ = await stack.client.start_run("echo", 3)
        while not (frame := await raw.read()).assignments:  # the stream goes on
            pass
        await raw.send(result_of(frame.assignments[0], 3))
        done = await stack.client.wait_for_completion(run.run_id, 10)
        assert done.status is RunStatus.COMPLETED
    finally:
        await raw.close()
