"""A 3-member etcd cluster on loopback losing its leader, then the member the server talks to."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.sessions import SessionConfig
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Workflow, node
from floxide_grpc.client import OrchestratorClient
from tests.faults.cluster import is_leader
from tests.helpers import free_port, serving
from tests.helpers.etcd import crash_safe_etcd, diverged

pytestmark = pytest.mark.timeout(240)


@node
def inc(x: int) -> int:
    return x + 1


@node
def square(x: int) -> int:
    return x * x


FLOW = Workflow("clustered", start=inc).edge(inc, square)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedEtcd]]:
    root = tmp_path_factory.mktemp("cluster")
    names = ["m1", "m2", "m3"]
    peers = {name: free_port() for name in names}  # free_port: six distinct ports in all
    cluster = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peers.items())
    binary = crash_safe_etcd()  # its members are killed under load
    made = [
        EmbeddedEtcd(
            data_dir=root / name,
            name=name,
            client_port=free_port(),
            peer_port=peers[name],
            cluster=cluster,
            binary=binary,
        )
        for name in names
    ]
    try:
        for member in made:  # from this thread: an etcd dies with the thread that launched it
            member.launch()
        for member in made:
            member.wait_healthy(60)
        yield made
    finally:
        with contextlib.ExitStack() as stack:  # every member, even if stopping one fails
            for member in made:
                stack.callback(member.stop)


@pytest.fixture
async def stack(members: list[EmbeddedEtcd]) -> AsyncIterator[tuple[Server, str, str]]:
    sessions = SessionConfig(
        lease_ttl=timedelta(seconds=5), heartbeat_interval=timedelta(seconds=1)
    )
    config = ServerConfig(port=0, sessions=sessions)
    endpoints = [m.endpoint for m in members]
    async with serving(endpoints, config, timeout=2.0, retry_for=30.0) as server:
        yield server, f"127.0.0.1:{server.port}", f"ns-{uuid.uuid4().hex[:8]}"


async def run_batch(client: OrchestratorClient, count: int) -> None:
    runs = [(await client.start_run("clustered", n))[0] for n in range(count)]
    for n, run in enumerate(runs):
        final = await client.wait_for_completion(run.run_id, timeout=120)
        assert final.output == (n + 1) ** 2, (final.status, final.error)


async def restart(member: EmbeddedEtcd) -> None:
    member.launch()
    await asyncio.to_thread(member.wait_healthy, 60)


async def test_losing_the_leader_then_the_servers_member(
    members: list[EmbeddedEtcd], stack: tuple[Server, str, str]
) -> None:
    _, target, namespace = stack
    async with (
        Worker([FLOW], WorkerConfig(server=target, namespace=namespace, slots=4)),
        OrchestratorClient(target, namespace=namespace, retries=30, timeout=30) as client,
    ):
        await run_batch(client, 10)
        [leader] = [m for m in members if is_leader(m)]
        batch = asyncio.create_task(run_batch(client, 20))
        await asyncio.to_thread(leader.stop, kill=True, keep_data=True)  # the leader, mid-run
        await batch
        await restart(leader)
        first = members[0]  # the member the server's client talks to first
        batch = asyncio.create_task(run_batch(client, 20))
        await asyncio.to_thread(first.stop, kill=True, keep_data=True)
        await batch
        await restart(first)
        await run_batch(client, 5)
    assert not await diverged({m.name: m for m in members})  # every member applied every write


_ = Path  # (kept for type checkers of older fixtures)
