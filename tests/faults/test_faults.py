"""Process faults survived: real server and worker processes, a real etcd, each bounded in time.

Each test shows the run's output equal to an uninterrupted run's (25 for input 1), each
transition's effect applied once (checked in etcd: three items, one context operation each),
the node that was interrupted run again (counted in a side channel the test owns), and the
attempt recorded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from floxide_server.embedded import EmbeddedEtcd

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.faults.harness import Faults
from tests.helpers import TcpProxy, eventually, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

EXPECTED = 25  # prepare: 1 + 1, hold: * 10, finish: + 5


@pytest.fixture
async def faults(tmp_path: Path, etcd: EmbeddedEtcd) -> AsyncIterator[Faults]:
    harness = Faults(tmp_path, etcd)
    harness.gate.mkdir()
    harness.start_server()
    try:
        yield harness
    finally:
        harness.stop_all()


async def start_run(faults: Faults) -> str:
    async with OrchestratorClient(faults.target, namespace=faults.namespace) as client:
        run, _ = await client.start_run("fault_chain", 1)
        return run.run_id


async def final(faults: Faults, run_id: str) -> object:
    async with OrchestratorClient(faults.target, namespace=faults.namespace, retries=10) as client:
        run = await client.wait_for_completion(run_id, timeout=60)
        assert run.status is RunStatus.COMPLETED, run.error
        return run.output


async def errors_of(faults: Faults, run_id: str) -> list[tuple[str, int, str]]:
    async with OrchestratorClient(faults.target, namespace=faults.namespace, retries=10) as client:
        return [(e.node, e.attempt, e.kind) for e in await client.run_errors(run_id)]


async def test_a_worker_killed_mid_step_loses_nothing(faults: Faults) -> None:
    first = faults.start_worker("first")
    await eventually(lambda: faults.connected(1), within=30)
    run_id = await start_run(faults)
    await eventually(lambda: faults.started(1, first.pid), within=30)
    faults.start_worker("second")
    await eventually(lambda: faults.connected(2), within=30)
    stop_server(first, signal.SIGKILL)
    faults.release()
    assert await final(faults, run_id) == EXPECTED
    holds = [(attempt, pid) for node, attempt, pid in faults.executions() if node == "hold"]
    assert holds[0] == (1, first.pid) and holds[1][0] == 2 and len(holds) == 2  # ran twice
    assert await errors_of(faults, run_id) == [("hold", 1, "WORKER_LOST")]
    items = await faults.items(run_id)
    assert items["hold"].status == records_pb2.ITEM_STATUS_COMPLETED and items["hold"].attempts == 2


async def test_a_frozen_worker_comes_back_to_a_refused_result(faults: Faults) -> None:
    first = faults.start_worker("first")
    await eventually(lambda: faults.connected(1), within=30)
    run_id = await start_run(faults)
    await eventually(lambda: faults.started(1, first.pid), within=30)
    second = faults.start_worker("second")
    first.send_signal(signal.SIGSTOP)  # frozen past its lease: the item goes to the second
    await eventually(lambda: faults.started(2, second.pid), within=30)
    faults.release()
    assert await final(faults, run_id) == EXPECTED
    first.send_signal(signal.SIGCONT)
    await eventually(lambda: _contains(faults, "first", "refused: FAILED_PRECONDITION"), within=30)
    assert await errors_of(faults, run_id) == [("hold", 1, "WORKER_LOST")]
    items = await faults.items(run_id)
    assert items["hold"].attempts == 2
    assert [n for n, _, _ in faults.executions()].count("hold") == 2


async def test_a_worker_sent_sigterm_finishes_what_it_holds_and_takes_nothing_new(
    faults: Faults,
) -> None:
    first = faults.start_worker("first")
    await eventually(lambda: faults.connected(1), within=30)
    run_id = await start_run(faults)
    await eventually(lambda: faults.started(1, first.pid), within=30)
    first.send_signal(signal.SIGTERM)
    await eventually(lambda: faults.status_of("first", "draining"), within=30)
    second = faults.start_worker("second")
    await eventually(lambda: faults.connected(2), within=30)
    faults.release()
    assert await final(faults, run_id) == EXPECTED
    assert first.wait(timeout=30) == 0
    by_node = {node: pid for node, _, pid in faults.executions()}
    assert by_node["hold"] == first.pid  # finished and reported by the draining worker
    assert by_node["finish"] == second.pid  # nothing new for the draining worker
    assert await errors_of(faults, run_id) == []
    assert (await faults.items(run_id))["hold"].attempts == 1


async def test_a_cut_connection_gives_a_new_session_and_a_refused_late_result(
    faults: Faults,
) -> None:
    proxy = await TcpProxy(faults.port).start()
    try:
        first = faults.start_worker("first", target=f"127.0.0.1:{proxy.port}")
        await eventually(lambda: faults.connected(1), within=30)
        run_id = await start_run(faults)
        await eventually(lambda: faults.started(1, first.pid), within=30)
        second = faults.start_worker("second")
        await eventually(lambda: faults.connected(2), within=30)
        proxy.cut()  # the first worker's stream breaks; its claim is re-queued
        await eventually(lambda: faults.started(2, second.pid), within=30)
        faults.release()
        assert await final(faults, run_id) == EXPECTED
        await eventually(
            lambda: _contains(faults, "first", "refused: FAILED_PRECONDITION"), within=30
        )
        stop_server(second, signal.SIGTERM)
        # The first worker is no zombie: on its new session it takes the next run's work.
        (faults.gate / "release").unlink()
        faults.release()
        again = await start_run(faults)
        assert await final(faults, again) == EXPECTED
        assert {pid for node, _, pid in faults.executions()[-3:]} == {first.pid}
    finally:
        await proxy.stop()


async def test_a_server_killed_while_a_worker_holds_a_claim(faults: Faults) -> None:
    first = faults.start_worker("first")
    await eventually(lambda: faults.connected(1), within=30)
    run_id = await start_run(faults)
    await eventually(lambda: faults.started(1, first.pid), within=30)
    assert faults.server is not None
    stop_server(faults.server, signal.SIGKILL)
    faults.restart_server()
    faults.release()
    assert await final(faults, run_id) == EXPECTED
    items = await faults.items(run_id)
    hold = items["hold"]
    assert hold.status == records_pb2.ITEM_STATUS_COMPLETED
    attempts = [a for n, a, _ in faults.executions() if n == "hold"]
    assert attempts in ([1], [1, 2])  # completed once: by its first claim, or re-queued once
    assert hold.attempts == attempts[-1]


async def _contains(faults: Faults, name: str, text: str) -> bool:
    await asyncio.sleep(0)
    return text in faults.log_of(name)


async def test_a_fan_out_of_100_joins_once_though_a_worker_is_killed_during_it(
    faults: Faults,
) -> None:
    first = faults.start_worker("first")
    second = faults.start_worker("second")
    await eventually(lambda: faults.connected(2), within=30)
    async with OrchestratorClient(faults.target, namespace=faults.namespace) as client:
        run, _ = await client.start_run("fault_fan_in", 100)

        async def under_way() -> bool:
            return sum(node == "work" for node, _, _ in faults.executions()) >= 20

        await eventually(under_way, within=30)
        stop_server(first, signal.SIGKILL)
        final = await client.wait_for_completion(run.run_id, timeout=90)
        assert final.status is RunStatus.COMPLETED, final.error
        assert final.output == {"count": 100, "sum": sum(x * 2 for x in range(100))}
        assert [node for node, _, _ in faults.executions()].count("collect") == 1  # once
        items = await client.work_items(run.run_id)
        assert len(items) == 102 and {i.status for i in items} == {"completed"}
        assert (await client.run_context(run.run_id))["done"] == 100  # one operation per branch
    assert second.poll() is None


async def test_one_replica_killed_mid_run_the_other_carries_on(faults: Faults) -> None:
    other, other_target = start_server(
        "--etcd", faults.etcd.endpoint, "--lease-ttl", "2", "--heartbeat", "0.5",
        ready_file=str(faults.tmp / "ready-2"),
    )  # fmt: skip
    try:
        first = faults.start_worker("first")  # on the first replica
        faults.start_worker("second", target=other_target)
        await eventually(lambda: faults.connected(2), within=30)
        run_id = await start_run(faults)
        await eventually(lambda: faults.started(1), within=30)
        holder = next(p for n, _, p in faults.executions() if n == "hold")
        assert faults.server is not None
        stop_server(faults.server, signal.SIGKILL)  # the first replica dies mid-run
        if holder == first.pid:
            stop_server(first, signal.SIGKILL)  # and its worker with it
        faults.release()
        async with OrchestratorClient(
            other_target, namespace=faults.namespace, retries=10
        ) as client:
            final = await client.wait_for_completion(run_id, timeout=60)
            assert final.status is RunStatus.COMPLETED and final.output == EXPECTED
    finally:
        stop_server(other, signal.SIGKILL)


async def test_a_server_restart_with_half_arrived_joins_joins_once(faults: Faults) -> None:
    faults.start_worker("first")
    faults.start_worker("second")
    await eventually(lambda: faults.connected(2), within=30)
    async with OrchestratorClient(faults.target, namespace=faults.namespace, retries=20) as client:
        run, _ = await client.start_run("fault_fan_in", 100)

        async def half_arrived() -> bool:
            return sum(node == "work" for node, _, _ in faults.executions()) >= 30

        await eventually(half_arrived, within=30)
        assert faults.server is not None
        stop_server(faults.server, signal.SIGKILL)
        faults.restart_server()
        final = await client.wait_for_completion(run.run_id, timeout=90)
        assert final.output == {"count": 100, "sum": sum(x * 2 for x in range(100))}
        assert [node for node, _, _ in faults.executions()].count("collect") == 1
        assert (await client.run_context(run.run_id))["done"] == 100
