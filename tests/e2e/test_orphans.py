"""Claims a worker never received are caught from its side: its heartbeats list what it holds.

An orphan is a claim of a live session that its replica never learned it made (a claim applied
while its reply was lost for longer than the replica kept asking). The test makes one by
claiming an item for a raw worker's session from another process's store, as that replica
would have: the worker never gets it, never lists it, and the server releases it without using
an attempt. A claim the worker lists stays, and so does one made by a Txn whose reply is late
(the chaos soak caught it released and run twice).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection
from datetime import timedelta

import pytest
from floxide_server.app import ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import Session, SessionConfig, Sessions
from floxide_server.store import Store, queue
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, KVUnavailable, Txn, TxnResult

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import records_pb2, worker_service_pb2
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


@node
def then(x: int) -> int:
    return x


PAIR = Workflow("pair", start=echo).edge(echo, then)


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
            [assignment] = await raw.assignments()
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
            [assignment] = await raw.assignments()
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
        [assignment] = await raw.assignments()  # the stream goes on
        await raw.send(result_of(assignment, 3))
        done = await stack.client.wait_for_completion(run.run_id, 10)
        assert done.status is RunStatus.COMPLETED
    finally:
        await raw.close()


def hold_next_reply(monkeypatch: pytest.MonkeyPatch, kv: KV) -> asyncio.Event:
    """The next Txn is applied, and its reply held until the event returned is set."""
    late = asyncio.Event()
    txn = kv.txn

    async def applied_then_late(request: Txn) -> TxnResult:
        result = await txn(request)
        monkeypatch.setattr(kv, "txn", txn)  # only this one is late
        await late.wait()
        return result

    monkeypatch.setattr(kv, "txn", applied_then_late)
    return late


def count_checks(monkeypatch: pytest.MonkeyPatch, sessions: Sessions) -> Callable[[], int]:
    """Count the listing checks done from now on."""
    done = 0
    check = sessions.check_listed

    async def counted(session: Session, listed: Collection[str]) -> None:
        nonlocal done
        await check(session, listed)
        done += 1

    monkeypatch.setattr(sessions, "check_listed", counted)
    return lambda: done


async def test_a_claim_made_with_a_result_whose_reply_is_late_is_never_taken_for_unreceived(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result's Txn claims its successor for the session; until the reply comes (late: etcd
    failing over, a lossy link), the claim is in etcd and held nowhere. Heartbeats that do not
    list it meanwhile must not release it: the worker gets it with the late reply, and another
    session would run the same attempt again."""
    await stack.client.register_workflow(PAIR)
    raw = Raw(stack.target)
    try:
        opening = hello(stack.namespace, workflow="pair", credit=1)
        opening.hello.nodes.append(records_pb2.ServedNode(workflow="pair", node="then"))
        opening.hello.lists_claims = True
        await raw.send(opening)
        lease = int((await raw.read()).hello_ack.session_id, 16)
        held: list[str] = []
        async with heartbeating(raw, held):
            run, _ = await stack.client.start_run("pair", 5)
            [first] = await raw.assignments()
            held.append(first.claim_token)

            late = hold_next_reply(monkeypatch, stack.server.kv)
            checks = count_checks(monkeypatch, stack.server.sessions)
            await raw.send(result_of(first, 5))
            claims = Keys(stack.namespace).claim(lease)

            async def successor_claimed() -> bool:  # the Txn applied: the first's claim is gone
                found, _ = await stack.server.kv.range(claims)
                return len(found) == 1 and not found[0].key.endswith(b"/start")

            await eventually(successor_claimed)
            since = checks()

            async def three_checks() -> bool:  # each would have counted it missed
                return checks() >= since + 3

            await eventually(three_checks)
            late.set()
            [second] = await raw.assignments()
            assert second.item.node == "then" and second.item.attempt == 1
            found, _ = await stack.server.kv.range(claims)
            assert second.claim_token.encode() in {c.value for c in found}  # the claim stands
            assert await queue.ready(stack.server.kv, stack.namespace) == []  # not re-queued
            held[:] = [second.claim_token]
            await raw.send(result_of(second, 5))
            done = await stack.client.wait_for_completion(run.run_id, 10)
            assert done.status is RunStatus.COMPLETED and done.output == 5
            assert await stack.client.run_errors(run.run_id) == []
    finally:
        await raw.close()
