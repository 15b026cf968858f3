"""How a run ends, raced: real server and worker processes, a real etcd, each bounded in time.

Each test ends a run while other items of it are held by worker processes or queued, and shows
what docs/protocol.md ("How a run ends") promises: the run ends once, every other item is
settled CANCELLED with why, nothing of the run is left in flight (no item pending, held or
waiting, no claim, no queue entry, no settle marker), the workers are told and get their slots
back. Items are held at gates (files the test writes, see tests/faults/endings.py); the test
waits on conditions with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import Keys

from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    records_pb2,
    work_item_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.errors import FailedPrecondition, FloxideError
from floxide_grpc.records import RunStatus
from tests.faults.harness import Faults
from tests.helpers import TcpProxy, eventually, stop_server
from tests.helpers.channels import authorized_channel

pytestmark = pytest.mark.timeout(120)

ENDINGS = str(Path(__file__).parent / "endings.py")
IN_FLIGHT = {
    records_pb2.ITEM_STATUS_PENDING,
    records_pb2.ITEM_STATUS_IN_PROGRESS,
    records_pb2.ITEM_STATUS_WAITING_RETRY,
}
REFUSED = "refused: FAILED_PRECONDITION"


@dataclass
class Endings:
    """The fault harness serving tests/faults/endings.py, and a direct line to its etcd."""

    faults: Faults
    kv: EtcdKV

    @property
    def keys(self) -> Keys:
        return Keys(self.faults.namespace)

    def client(self, retries: int = 10) -> OrchestratorClient:
        return OrchestratorClient(
            self.faults.target, namespace=self.faults.namespace, retries=retries
        )

    async def start(self, **slots: int) -> list[int]:
        """Start a worker process per name with its slots; their pids, once all are connected."""
        pids = [self.faults.start_worker(name, slots=n).pid for name, n in slots.items()]
        await eventually(lambda: self.faults.connected(len(slots)), within=30)
        return pids

    def holding(self, tag: str) -> list[tuple[str, int, int]]:
        """The items held at the gate ``tag``: (node, index, pid of the worker)."""
        found = []
        for path in self.faults.gate.glob(f"started-{tag}-*"):
            node, index, pid = path.name.removeprefix(f"started-{tag}-").split("-")
            found.append((node, int(index), int(pid)))
        return found

    async def held(self, tag: str, count: int) -> list[tuple[str, int, int]]:
        """Wait until ``count`` items are held at the gate ``tag``; them."""

        async def enough() -> list[tuple[str, int, int]]:
            await asyncio.sleep(0)
            found = self.holding(tag)
            return found if len(found) >= count else []

        return await eventually(enough, within=30)

    def release(self, tag: str, after: float = 0.0) -> float:
        """Let every node held at ``tag`` go on at one instant, ``after`` seconds from now."""
        at = time.time() + after
        part = self.faults.gate / f".release-{tag}"
        part.write_text(repr(at))
        os.replace(part, self.faults.gate / f"release-{tag}")  # seen whole, or not at all
        return at

    def side(self, word: str, tag: str) -> list[list[str]]:
        """The side channel's lines ``{word} {tag} ...``, split."""
        path = self.faults.tmp / "side.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line.split() for line in lines if line.startswith(f"{word} {tag} ")]

    def refused(self) -> int:
        """Results the workers saw refused with FAILED_PRECONDITION, over all their logs."""
        return sum(self.faults.log_of(name).count(REFUSED) for name in self.faults.workers)

    async def states(self, run_id: str) -> list[records_pb2.WorkItemState]:
        found, _ = await self.kv.range(self.keys.item(run_id))
        return [records_pb2.WorkItemState.FromString(kv.value) for kv in found]

    async def run_record(self, run_id: str) -> records_pb2.RunRecord:
        found = await self.kv.get(self.keys.run_info(run_id))
        assert found is not None
        return records_pb2.RunRecord.FromString(found.value)

    async def leftovers(self, run_id: str) -> dict[str, int]:
        """What of a run is still in flight in etcd: items, claims, queue entries, its marker."""
        claims, _ = await self.kv.range(self.keys.claims)
        queued, _ = await self.kv.range(self.keys.queue(run_id, ""))
        timers, _ = await self.kv.range(self.keys.timer())
        return {
            "items": sum(s.status in IN_FLIGHT for s in await self.states(run_id)),
            "claims": sum(f"/{run_id}/".encode() in kv.key for kv in claims),
            "queued": len(queued),
            "timers": sum(f"/{run_id}/".encode() in kv.key for kv in timers),
            "marker": int(await self.kv.get(self.keys.settle(run_id)) is not None),
        }

    async def settled(self, run_id: str) -> bool:
        return not any((await self.leftovers(run_id)).values())

    async def metrics(self, run_id: str) -> records_pb2.RunMetrics:
        """GetRunMetrics as the server answers it (the SDK's RunMetrics has no ``cancelled``)."""
        async with authorized_channel(self.faults.target) as channel:
            stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
            response = await stub.GetRunMetrics(
                orchestrator_service_pb2.GetRunMetricsRequest(
                    namespace=self.faults.namespace, run_id=run_id
                ),
                timeout=10,
            )
            return response.metrics


@pytest.fixture
async def endings(tmp_path: Path, etcd: EmbeddedEtcd) -> AsyncIterator[Endings]:
    """The harness, its server not started yet (a test may put etcd behind a proxy first)."""
    faults = Faults(tmp_path, etcd, workflows=ENDINGS)
    faults.gate.mkdir()
    kv = EtcdKV([etcd.endpoint])
    try:
        yield Endings(faults, kv)
    finally:
        try:
            faults.stop_all()
        finally:
            await kv.close()


def in_flight(metrics: records_pb2.RunMetrics) -> int:
    return metrics.pending + metrics.in_progress + metrics.waiting_retry


async def test_two_terminal_branches_finishing_at_once_on_two_workers_end_the_run_once(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    pids = await endings.start(first=1, second=1)  # a slot each: one branch on each worker
    async with endings.client() as client:
        run, _ = await client.start_run("two_ends", "race")
        held = await endings.held("race", 2)
        assert {node for node, _, _ in held} == {"left", "right"}
        assert sorted(pid for _, _, pid in held) == sorted(pids), "one branch on each worker"
        endings.release("race", after=0.5)  # both return at this instant
        final = await client.wait_for_completion(run.run_id, timeout=30)

        assert final.status is RunStatus.COMPLETED, final.error
        assert final.output in ("left", "right")
        [loser] = {"left", "right"} - {final.output}
        # The winner ran to its end; the loser too, or (on a slow machine) its worker heard of
        # the run's end first and stopped it: either way the run ended once.
        lines = await eventually(
            lambda: _both([*endings.side("released", "race"), *endings.side("cancelled", "race")]),
            within=10,
        )
        assert final.output in {line[2] for line in lines if line[0] == "released"}
        await eventually(lambda: endings.settled(run.run_id), within=10)
        items = {i.node: i for i in await client.work_items(run.run_id)}
        assert {n: i.status for n, i in items.items()} == {
            "fork": "completed",
            final.output: "completed",
            loser: "cancelled",
        }
        assert items[loser].last_error == "run completed"
        metrics = await endings.metrics(run.run_id)
        assert (metrics.total_work_items, metrics.completed, metrics.cancelled) == (3, 2, 1)
        assert in_flight(metrics) == 0 and metrics.failed == 0
        assert await client.run_errors(run.run_id) == []  # the refused result recorded nothing
        await eventually(lambda: _true(endings.refused() == 1), within=10)  # the loser's

        # Both workers are healthy: each has its slot back and holds a branch of the next run.
        assert all(p.poll() is None for p in endings.faults.workers.values())
        again, _ = await client.start_run("two_ends", "again")
        held = await endings.held("again", 2)
        assert sorted(pid for _, _, pid in held) == sorted(pids)
        endings.release("again")
        final = await client.wait_for_completion(again.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output in ("left", "right")


async def test_a_run_cancelled_while_two_workers_hold_its_fan_out_of_50_leaves_nothing(
    endings: Endings,
) -> None:
    endings.faults.start_server()
    pids = await endings.start(first=20, second=20)
    async with endings.client() as client:
        run, _ = await client.start_run("held_fan_out", {"tag": "cut", "n": 50})
        held = await endings.held("cut", 40)  # every slot of both workers; 10 queued
        assert sorted({pid for _, _, pid in held}) == sorted(pids)
        metrics = await endings.metrics(run.run_id)
        assert (metrics.in_progress, metrics.pending) == (40, 10)

        cancelled = await client.cancel_run(run.run_id, "enough")
        assert cancelled.status is RunStatus.CANCELLED
        await eventually(lambda: endings.settled(run.run_id), within=10)  # no claim, none queued
        items = await client.work_items(run.run_id)
        assert Counter((i.node, i.status) for i in items) == {
            ("spread", "completed"): 1,
            ("branch", "cancelled"): 50,
        }  # the join never ran
        assert {i.last_error for i in items if i.node == "branch"} == {"run cancelled"}
        metrics = await endings.metrics(run.run_id)
        assert (metrics.completed, metrics.cancelled, in_flight(metrics)) == (1, 50, 0)

        # The workers were told: every held node was cancelled where it waited, and its
        # result (the cancelled attempt) was refused and returned its slot.
        await eventually(lambda: _true(len(endings.side("cancelled", "cut")) == 40), within=10)
        await eventually(lambda: _true(endings.refused() == 40), within=10)
        assert await client.run_errors(run.run_id) == []
        endings.release("cut")

        # Every slot came back: the next run's 40 branches are all held at once, 20 a worker.
        again, _ = await client.start_run("held_fan_out", {"tag": "again", "n": 40})
        held = await endings.held("again", 40)
        assert sorted(pid for _, _, pid in held) == sorted(pids * 20)
        endings.release("again")
        final = await client.wait_for_completion(again.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output == sum(range(40))
        assert endings.side("released", "cut") == []  # none of the first run was left waiting
        assert len(await client.work_items(run.run_id)) == 51  # and none of it ran on
    assert all(p.poll() is None for p in endings.faults.workers.values())


async def test_a_server_killed_while_settling_a_cancelled_run_of_200_is_finished_by_the_next(
    endings: Endings,
) -> None:
    proxy = await TcpProxy(endings.faults.etcd.client_port).start()  # the server's etcd link
    try:
        # In a thread: the proxy lives in this event loop, which start_server would block.
        await asyncio.to_thread(endings.faults.start_server, etcd=f"127.0.0.1:{proxy.port}")
        await endings.start(first=20, second=20)
        async with endings.client(retries=0) as client:
            run, _ = await client.start_run("held_fan_out", {"tag": "wide", "n": 200})
            await endings.held("wide", 40)  # 40 held, 160 queued
            run_id = run.run_id
            proxy.latency = 0.1  # every etcd round trip of the server: settling takes seconds
            cancel = asyncio.ensure_future(client.cancel_run(run_id, "enough"))

            async def mid_settling() -> dict[str, int]:
                states = await endings.states(run_id)
                done = sum(s.status == records_pb2.ITEM_STATUS_CANCELLED for s in states)
                left = sum(s.status in IN_FLIGHT for s in states)
                marker = await endings.kv.get(endings.keys.settle(run_id))
                return {"done": done, "left": left} if marker and done and left else {}

            try:
                middle = await eventually(mid_settling, within=30, interval=0.005)
                assert endings.faults.server is not None
                stop_server(endings.faults.server, signal.SIGKILL)
            finally:
                with contextlib.suppress(FloxideError):  # the server died under it
                    await cancel
        after = await endings.leftovers(run_id)
        assert after["marker"] == 1 and after["items"] > 0, (middle, after)  # in the middle
        assert (await endings.run_record(run_id)).status == records_pb2.RUN_STATUS_CANCELLED
    finally:
        await proxy.stop()

    endings.faults.restart_server()  # the same etcd, directly: its reconciler finishes settling
    await eventually(lambda: endings.settled(run_id), within=20)
    states = await endings.states(run_id)
    assert {s.item.node for s in states} == {"spread", "branch"} and len(states) == 201
    branches = [s for s in states if s.item.node == "branch"]
    assert {(s.status, s.last_error.message) for s in branches} == {
        (records_pb2.ITEM_STATUS_CANCELLED, "run cancelled")
    }
    metrics = await endings.metrics(run_id)
    assert metrics.total_work_items == 201 and in_flight(metrics) == 0
    assert (metrics.completed, metrics.cancelled) == (1, 200)
    print(f"killed in the middle of settling: {middle} (items cancelled, still in flight)")

    # The workers got every slot back: the next run's 40 branches are all held at once.
    async with endings.client() as client:
        again, _ = await client.start_run("held_fan_out", {"tag": "after", "n": 40})
        await endings.held("after", 40)
        endings.release("after")
        final = await client.wait_for_completion(again.run_id, timeout=30)
        assert final.status is RunStatus.COMPLETED and final.output == sum(range(40))


async def test_a_run_whose_only_branch_ends_in_a_hold_fails_as_stuck(endings: Endings) -> None:
    endings.faults.start_server()
    await endings.start(only=1)
    async with endings.client() as client:
        run, _ = await client.start_run("stalled", 1)
        final = await client.wait_for_completion(run.run_id, timeout=30)
        assert final.status is RunStatus.FAILED
        record = await endings.run_record(run.run_id)
        assert record.error.kind == work_item_pb2.ERROR_KIND_STUCK
        assert re.search(r"branches ended without a successor at 'stall'", record.error.message)
        assert [(i.node, i.status) for i in await client.work_items(run.run_id)] == [
            ("stall", "completed")
        ]
        await eventually(lambda: endings.settled(run.run_id), within=10)
        with pytest.raises(FailedPrecondition, match="stuck"):
            await client.resume_run(run.run_id)


async def test_a_run_read_right_after_wait_for_completion_has_nothing_in_flight(
    endings: Endings,
) -> None:
    proxy = await TcpProxy(endings.faults.etcd.client_port).start()  # the server's etcd link
    try:
        await asyncio.to_thread(endings.faults.start_server, etcd=f"127.0.0.1:{proxy.port}")
        await endings.start(first=1, second=1)
        async with endings.client() as client:
            run, _ = await client.start_run("two_ends", "read")
            await endings.held("read", 2)
            proxy.latency = 0.05  # an etcd some way off: settling takes a few round trips
            endings.release("read")
            final = await client.wait_for_completion(run.run_id, timeout=30)
            assert final.status is RunStatus.COMPLETED
            metrics = await endings.metrics(run.run_id)  # "for a finished run ... at 0"
            assert (in_flight(metrics), metrics.cancelled) == (0, 1)
    finally:
        await proxy.stop()


async def _both(lines: list[list[str]]) -> list[list[str]]:
    await asyncio.sleep(0)
    return lines if {line[2] for line in lines} == {"left", "right"} else []


async def _true(value: bool) -> bool:
    await asyncio.sleep(0)
    return value
