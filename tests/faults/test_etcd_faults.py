"""etcd itself failing under a running system: restarted mid-run, every run still completes once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import SessionConfig
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Workflow, node
from floxide_grpc.client import OrchestratorClient

pytestmark = pytest.mark.timeout(180)


@node
async def slow_add(x: int) -> int:
    await asyncio.sleep(0.05)
    return x + 1


@node
def double(x: int) -> int:
    return x * 2


FLOW = Workflow("etcd_restart", start=slow_add).edge(slow_add, double)


async def test_runs_complete_once_across_an_etcd_restart(own_etcd: EmbeddedEtcd) -> None:
    etcd = own_etcd
    kv = EtcdKV([etcd.endpoint], timeout=2.0, retry_for=30.0)
    sessions = SessionConfig(
        lease_ttl=timedelta(seconds=5), heartbeat_interval=timedelta(seconds=1)
    )
    server = Server(kv, ServerConfig(port=0, sessions=sessions))
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    try:
        await server.start()
        target = f"127.0.0.1:{server.port}"
        async with (
            Worker([FLOW], WorkerConfig(server=target, namespace=namespace, slots=4)),
            OrchestratorClient(target, namespace=namespace, retries=20, timeout=30) as client,
        ):
            runs = [(await client.start_run("etcd_restart", n))[0] for n in range(20)]
            await asyncio.to_thread(etcd.stop, keep_data=True)  # mid-run
            etcd.launch()  # same ports, same data (from this thread: etcd dies with its launcher)
            await asyncio.to_thread(etcd.wait_healthy)
            for n, run in enumerate(runs):
                final = await client.wait_for_completion(run.run_id, timeout=120)
                assert final.output == (n + 1) * 2, (final.status, final.error)
            for run in runs:
                items = await client.work_items(run.run_id)
                assert sorted(i.node for i in items) == ["double", "slow_add"]  # no duplicate
    finally:
        await server.stop()
        await kv.close()
