"""Worker liveness from etcd leases alone, as any replica lists it (real etcd, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import SessionConfig
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Delete, Put, Txn
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    records_pb2,
    work_item_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus, WorkerInfo
from tests.helpers import eventually
from tests.helpers.channels import authorized_channel
from tests.helpers.worker_stream import Raw, hello

TTL = 6.0
HEARTBEAT = 1.0
"""A TTL over four heartbeats: a silent worker is seen STALE (for 2 s) before it ends, and a live
one stays ALIVE through a stall of up to a heartbeat (renewals every heartbeat, ALIVE while
4 whole seconds are left)."""
ETCD_MARGIN = 1.5
"""What etcd and the listing may add to the bound: a revoke, a watch event, a poll."""
FAST = SessionConfig(
    lease_ttl=timedelta(seconds=TTL), heartbeat_interval=timedelta(seconds=HEARTBEAT)
)


@node
def echo(x: int) -> int:
    return x


ECHO = Workflow("echo", start=echo)

gates: list[asyncio.Event] = []


@node
async def wait_for_gate(x: int) -> int:
    await gates[-1].wait()
    return x


GATED = Workflow("gated", start=wait_for_gate)

Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def servers(etcd: EmbeddedEtcd) -> AsyncIterator[Start]:
    """Start replicas on the one etcd, with short leases (each stopped after the test)."""
    made: list[tuple[Server, EtcdKV]] = []

    async def start(retention: dict[str, timedelta] | None = None) -> Server:
        kv = EtcdKV([etcd.endpoint])
        config = ServerConfig(
            sessions=FAST, grace=timedelta(seconds=1), namespace_retention=retention or {}
        )
        server = Server(kv, config)
        made.append((server, kv))
        await server.start()
        return server

    yield start
    async with contextlib.AsyncExitStack() as stack:  # every one, even if stopping one fails
        for server, kv in made:
            stack.push_async_callback(kv.close)
            stack.push_async_callback(server.stop)


def target(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


def fresh_namespace() -> str:
    return f"ns-{uuid.uuid4().hex[:8]}"


def test_alive_means_renewed_within_two_heartbeats_in_etcds_whole_seconds() -> None:
    assert SessionConfig().alive_seconds == 4  # 10 s - 2 x 3 s: renewed within 6 s
    assert FAST.alive_seconds == 4  # 6 s - 2 x 1 s
    tiny = SessionConfig(lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(seconds=0.5))
    assert tiny.alive_seconds == 1  # 2 s - 2 x 0.5 s
    small = SessionConfig(lease_ttl=timedelta(seconds=3), heartbeat_interval=timedelta(seconds=1.2))
    assert small.alive_seconds == 1  # 0.6 s rounds down to 0: at least one whole second
    often = SessionConfig(heartbeat_interval=timedelta(milliseconds=10))
    assert often.alive_seconds == 9  # 9.98 s, in etcd's whole seconds


async def test_a_silent_worker_is_stale_then_ended_within_the_ttl_and_one_heartbeat(
    servers: Start,
) -> None:
    server = await servers()
    namespace = fresh_namespace()
    keys = Keys(namespace)
    async with OrchestratorClient(target(server), namespace=namespace) as client:
        await client.register_workflow(ECHO)
        run, _ = await client.start_run("echo", 1)
        raw = Raw(target(server))
        try:
            last_message = time.monotonic()
            await raw.send(hello(namespace))  # its first message, and its last
            session_id = (await raw.read()).hello_ack.session_id
            lease = int(session_id, 16)
            [assignment] = (await raw.read()).assignments  # it holds the item, and says nothing
            seen: list[str] = []

            async def ended() -> bool:
                mine = [w for w in await client.workers() if w.session_id == session_id]
                if mine:
                    seen.append(mine[0].liveness)
                    assert mine[0].in_flight == 1
                session = await server.kv.get(keys.session(lease))
                claims, _ = await server.kv.range(keys.claim(lease))
                return not mine and session is None and not claims

            await eventually(ended, within=TTL + HEARTBEAT + ETCD_MARGIN + 10, interval=0.05)
            silent = time.monotonic() - last_message
            assert silent <= TTL + HEARTBEAT + ETCD_MARGIN, f"ended {silent:.2f} s after hello"
            assert seen[0] == "alive" and seen[-1] == "stale", seen  # stale before it ended
            assert set(seen) == {"alive", "stale"} and seen.index("stale") > 0
            assert await raw.status() == grpc.StatusCode.ABORTED
        finally:
            await raw.close()
        errors = await client.run_errors(run.run_id)  # re-queued as a lost attempt
        assert [(e.item_id, e.attempt, e.kind) for e in errors] == [
            (assignment.item.item_id, 1, "WORKER_LOST")
        ]
        [item] = await client.work_items(run.run_id)
        assert (item.status, item.attempts) == ("pending", 1)


async def test_a_heartbeating_worker_is_alive_on_another_replica_in_every_sample(
    servers: Start,
) -> None:
    first, second = await servers(), await servers()
    namespace = fresh_namespace()
    config = WorkerConfig(server=target(first), namespace=namespace, slots=1)
    async with (
        Worker([ECHO], config),
        OrchestratorClient(target(second), namespace=namespace) as client,
    ):
        [listed] = await eventually(client.workers)
        assert first.sessions.live and not second.sessions.live  # served by the first only
        samples: list[str] = []
        until = time.monotonic() + 5 * HEARTBEAT
        while time.monotonic() < until:  # sampled over five heartbeat intervals
            samples.extend(w.liveness for w in await client.workers())
            await asyncio.sleep(0.05)
        assert len(samples) > 20 and set(samples) == {"alive"}, samples
        [again] = await client.workers()
        assert again.session_id == listed.session_id


async def test_an_ended_session_is_listed_dead_with_include_dead_until_retention(
    servers: Start,
) -> None:
    namespace = fresh_namespace()
    server = await servers(retention={namespace: timedelta(seconds=3)})
    async with OrchestratorClient(target(server), namespace=namespace) as client:
        async with Worker([ECHO], WorkerConfig(server=target(server), namespace=namespace)):
            [live] = await eventually(client.workers)
            assert await client.run("echo", 3, timeout=30) == 3
            assert live.liveness == "alive" and live.ended_at is None
        # The worker drained and closed its stream: its session ended.

        async def listed_dead() -> list[WorkerInfo]:
            return [w for w in await client.workers(include_dead=True) if w.liveness == "dead"]

        [dead] = await eventually(listed_dead, within=10)
        assert dead.session_id == live.session_id and dead.ended_at is not None
        assert dead.ended_at >= (live.last_heartbeat or dead.ended_at)  # both by that replica
        assert await client.workers() == []  # without include_dead: live sessions only
        stored = await server.kv.get(Keys(namespace).worker(int(live.session_id, 16)))
        assert stored is not None

        async def removed() -> bool:
            return not await client.workers(include_dead=True)

        await eventually(removed, within=30)  # retention: 3 s after it ended
        assert await server.kv.get(stored.key) is None


async def test_an_end_unseen_is_stamped_by_the_sweep_and_a_removed_record_stays_removed(
    servers: Start,
) -> None:
    server = await servers()
    namespace = fresh_namespace()
    keys = Keys(namespace)
    lease = await server.kv.grant(30)
    record = records_pb2.WorkerRecord(session_id=f"{lease:x}", worker_id="crashed", slots=1)
    # A replica crashed between the session's end and the stamp: a record, no session key.
    await server.kv.txn(Txn([], [Put(keys.worker(lease), record.SerializeToString())]))
    await server.kv.revoke(lease)
    request = orchestrator_service_pb2.ListWorkersRequest(namespace=namespace, include_dead=True)
    async with authorized_channel(target(server)) as channel:
        stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
        [unstamped] = (await stub.ListWorkers(request)).workers
        assert unstamped.liveness == records_pb2.LIVENESS_STATUS_DEAD
        assert not unstamped.HasField("ended_at")
        await server.sessions.release_orphans(namespace)  # the reconcile sweep
        [stamped] = (await stub.ListWorkers(request)).workers
        assert stamped.worker_id == "crashed" and stamped.HasField("ended_at")
        await server.kv.txn(Txn([], [Delete(keys.worker(lease))]))  # as retention does
        await server.sessions.release(namespace, lease)  # a late sighting of the end
        assert await server.kv.get(keys.worker(lease)) is None
        assert not (await stub.ListWorkers(request)).workers


async def test_current_items_are_the_claims_held_as_any_replica_reads_them(
    servers: Start,
) -> None:
    gates.append(asyncio.Event())
    first, second = await servers(), await servers()
    namespace = fresh_namespace()
    config = WorkerConfig(server=target(first), namespace=namespace, slots=2)
    async with (
        Worker([GATED], config),
        authorized_channel(target(first)) as one,
        authorized_channel(target(second)) as other,
        OrchestratorClient(target(second), namespace=namespace) as client,
    ):
        [listed] = await eventually(client.workers)
        assert (listed.status, listed.in_flight) == ("idle", 0)
        run, _ = await client.start_run("gated", 7)
        [item] = await client.work_items(run.run_id)
        expected = [
            work_item_pb2.ItemRef(namespace=namespace, run_id=run.run_id, item_id=item.item_id)
        ]
        request = orchestrator_service_pb2.ListWorkersRequest(namespace=namespace)

        async def holding(channel: grpc.aio.Channel) -> bool:
            stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
            [worker] = (await stub.ListWorkers(request)).workers
            return (
                list(worker.current_items) == expected
                and worker.status == records_pb2.WORKER_STATUS_BUSY
            )

        await eventually(lambda: holding(other), within=10)  # not the replica serving it
        assert await holding(one)
        [busy] = await client.workers()
        assert (busy.status, busy.in_flight) == ("busy", 1)
        gates[-1].set()
        final = await client.wait_for_completion(run.run_id, 30)
        assert final.status is RunStatus.COMPLETED and final.output == 7

        async def idle() -> bool:
            [worker] = await client.workers()
            return worker.in_flight == 0 and worker.status == "idle"

        await eventually(idle, within=10)
