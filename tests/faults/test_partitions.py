"""Partitions between hosts: etcd members, replicas and workers in network namespaces of their own,
their links cut or made lossy with nftables, then healed.

Each test shows every run completed once (its output an uninterrupted run's) and every context
effect applied once (one context operation per step, read from etcd), and which attempts of the
held node ran, on which worker.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.faults.cluster import Cluster
from tests.helpers import eventually, stop_server
from tests.helpers.hosts import Hosts

pytestmark = pytest.mark.timeout(180)

EXPECTED = 25  # fault_chain on input 1: prepare 1 + 1, hold * 10, finish + 5
TTL = ("--lease-ttl", "2", "--heartbeat", "0.5")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with Hosts() as made:
        yield made


@pytest.fixture
async def one_member(tmp_path: Path, hosts: Hosts) -> AsyncIterator[Cluster]:
    cluster = Cluster.start(tmp_path, hosts)  # from the loop's thread, which outlives etcd
    try:
        yield cluster
    finally:
        cluster.stop_all()


async def start_chain(cluster: Cluster, replica: str) -> str:
    target = cluster.replicas[replica].target
    async with OrchestratorClient(target, namespace=cluster.namespace, retries=10) as client:
        run, _ = await client.start_run("fault_chain", 1)
        return run.run_id


async def completed_once(cluster: Cluster, run_id: str, replica: str) -> None:
    """The run completed with an uninterrupted run's output, each step's effect applied once."""
    target = cluster.replicas[replica].target
    async with OrchestratorClient(target, namespace=cluster.namespace, retries=30) as client:
        run = await client.wait_for_completion(run_id, timeout=90)
    assert run.status is RunStatus.COMPLETED and run.output == EXPECTED, (run.status, run.error)
    items = await cluster.items(run_id)  # asserts one item and one context operation per step
    assert all(s.status == records_pb2.ITEM_STATUS_COMPLETED for s in items.values())


async def logged(cluster: Cluster, worker: str, text: str) -> None:
    """Wait until the worker's log has ``text`` (written after what the test saw happen)."""

    def has() -> bool:
        return text in cluster.log_of(worker)

    await eventually(lambda: asyncio.to_thread(has), within=60)


def holds(cluster: Cluster) -> list[tuple[int, int]]:
    """(attempt, pid) of each execution of the held node."""
    return [(attempt, pid) for node, attempt, pid in cluster.executions() if node == "hold"]


async def held_with_a_spare(cluster: Cluster, spare_on: str) -> tuple[str, int, int]:
    """A chain whose held node w1 (on s1) is running, and a spare worker w2 (on ``spare_on``)
    connected to take it over: the run, and the pids of w1 and w2."""
    first = cluster.start_worker_on("w1", "s1").pid
    await eventually(lambda: cluster.connected(1), within=30)
    run_id = await start_chain(cluster, "s1")
    await eventually(lambda: cluster.started(1, first), within=30)
    second = cluster.start_worker_on("w2", spare_on).pid
    await eventually(lambda: cluster.connected(2), within=30)
    return run_id, first, second


async def test_a_worker_cut_from_its_server_past_its_lease_is_replaced_and_fenced(
    one_member: Cluster,
) -> None:
    cluster, hosts = one_member, one_member.hosts
    cluster.start_replica("s1", TTL)
    run_id, first, second = await held_with_a_spare(cluster, "s1")

    hosts.cut(cluster.host("w1"), cluster.host("s1"))
    await eventually(lambda: cluster.started(2, second), within=30)  # its lease expired
    cluster.release()  # both finish the step: only the second's result may count
    await completed_once(cluster, run_id, "s1")  # while w1 is still cut off
    hosts.heal()
    await eventually(lambda: cluster.connected(2), within=60)  # w1 is back, in a new session
    await logged(cluster, "w1", "refused")  # its late result
    assert holds(cluster) == [(1, first), (2, second)]
    await completed_once(cluster, run_id, "s1")  # the late result changed nothing


async def test_a_worker_cut_from_its_server_within_its_lease_loses_nothing(
    one_member: Cluster,
) -> None:
    cluster, hosts = one_member, one_member.hosts
    # A TTL well past the cut plus TCP's retransmission backoff (the next resend after a cut of
    # about 2 s comes up to 3 s later): the worker is heard again before its lease ends.
    cluster.start_replica("s1", ("--lease-ttl", "10", "--heartbeat", "0.5"))
    first = cluster.start_worker_on("w1", "s1").pid
    await eventually(lambda: cluster.connected(1), within=30)
    run_id = await start_chain(cluster, "s1")
    await eventually(lambda: cluster.started(1, first), within=30)

    hosts.cut(cluster.host("w1"), cluster.host("s1"))
    await eventually(lambda: cluster.status_of("w1", "stale"), within=30)  # unheard, not lost
    hosts.heal()
    await eventually(lambda: cluster.status_of("w1", "alive"), within=30)
    cluster.release()
    await completed_once(cluster, run_id, "s1")
    assert holds(cluster) == [(1, first)]  # the same attempt went on: nothing ran twice
    assert cluster.log_of("w1").count("open on") == 1  # one session all along


async def test_a_replica_cut_from_etcd_hands_its_work_over_and_comes_back(
    one_member: Cluster,
) -> None:
    cluster, hosts = one_member, one_member.hosts
    cluster.start_replica("s1", TTL)
    cluster.start_replica("s2", TTL)
    run_id, first, second = await held_with_a_spare(cluster, "s2")

    hosts.cut(cluster.host("s1"), cluster.host("e1"))  # w1 stays connected to s1
    await eventually(lambda: cluster.started(2, second), within=30)  # w1's lease expired
    cluster.release()
    await completed_once(cluster, run_id, "s2")  # while s1 is still cut off
    hosts.heal()
    await logged(cluster, "w1", "refused")
    assert holds(cluster) == [(1, first), (2, second)]

    stop_server(cluster.workers.pop("w2"), signal.SIGKILL)  # a run only s1 and w1 can do now
    again = await start_chain(cluster, "s1")
    await completed_once(cluster, again, "s1")
    await completed_once(cluster, run_id, "s1")


async def test_a_worker_told_two_replicas_leaves_one_cut_from_etcd_for_the_other(
    one_member: Cluster,
) -> None:
    cluster, hosts = one_member, one_member.hosts
    quick = (*TTL, "--etcd-retry", "2")  # s1 gives its sessions up 2 s after etcd went silent
    cluster.start_replica("s1", quick)
    cluster.start_replica("s2", quick)
    cluster.start_worker_on("w1", "s1", "s2")
    cluster.release()
    await eventually(lambda: cluster.connected(1), within=30)
    await logged(cluster, "w1", "(s1)")  # its first session is on s1

    hosts.cut(cluster.host("s1"), cluster.host("e1"))
    run_id = await start_chain(cluster, "s2")
    await completed_once(cluster, run_id, "s2")  # by w1, the only worker, while s1 is cut
    await logged(cluster, "w1", "(s2)")
    hosts.heal()


@pytest.fixture
async def three_members(tmp_path: Path, hosts: Hosts) -> AsyncIterator[Cluster]:
    cluster = Cluster.start(tmp_path, hosts, members=3)  # from the loop's thread, as above
    try:
        yield cluster
    finally:
        cluster.stop_all()


async def run_batch(cluster: Cluster, count: int) -> list[str]:
    """Start ``count`` chains on s1 and see each completed once."""
    runs = [await start_chain(cluster, "s1") for _ in range(count)]
    for run_id in runs:
        await completed_once(cluster, run_id, "s1")
    return runs


@pytest.mark.parametrize("role", ["leader", "follower"])
async def test_an_etcd_member_cut_from_the_other_two(three_members: Cluster, role: str) -> None:
    cluster, hosts = three_members, three_members.hosts
    leader = cluster.leader()
    cut = leader if role == "leader" else next(n for n in cluster.members if n != leader)
    cluster.start_replica("s1", ("--lease-ttl", "4", "--heartbeat", "0.5"), first=cut)
    cluster.start_worker_on("w1", "s1", slots=4)
    cluster.release()  # the held node goes straight on
    await eventually(lambda: cluster.connected(1), within=30)
    await run_batch(cluster, 5)

    assert cluster.leader() == leader
    others = [cluster.host(n) for n in cluster.members if n != cut]
    hosts.cut(cluster.host(cut), *others)  # the one the server talks to; it still reaches all
    await run_batch(cluster, 10)  # the cluster's majority serves, with the cut member aside
    hosts.heal()
    await run_batch(cluster, 5)


async def test_a_lossy_link_between_a_replica_and_etcd_for_a_minute(one_member: Cluster) -> None:
    cluster, hosts = one_member, one_member.hosts
    cluster.start_replica("s1", ("--lease-ttl", "4", "--heartbeat", "0.5"))
    cluster.start_worker_on("w1", "s1", slots=4)
    cluster.release()
    await eventually(lambda: cluster.connected(1), within=30)

    hosts.lose(20, cluster.host("s1"), cluster.host("e1"))
    runs: list[str] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 60
    async with OrchestratorClient(
        cluster.replicas["s1"].target, namespace=cluster.namespace, retries=30, timeout=30
    ) as client:
        while loop.time() < until:  # four runs in flight at a time, for a minute
            batch = [(await client.start_run("fault_chain", 1))[0].run_id for _ in range(4)]
            runs += batch
            for run_id in batch:
                await client.wait_for_completion(run_id, timeout=120)
    hosts.heal()
    for run_id in runs:
        await completed_once(cluster, run_id, "s1")
    assert len(runs) >= 4, f"only {len(runs)} runs in a minute of 20 % loss"
