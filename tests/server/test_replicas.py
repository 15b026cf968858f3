"""Several server replicas on one etcd, and state that outlives a replica."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import SessionConfig
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Delete, Put, Txn
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Backoff, NextAll, NodeContext, RetryPolicy, Workflow, node
from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.errors import NotFound
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, free_port

FAST = SessionConfig(lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(milliseconds=500))


@node
def plus(x: int) -> int:
    return x + 1


@node
def times(x: int) -> int:
    return x * 3


CHAIN = Workflow("replicated", start=plus).edge(plus, times)

attempts: list[int] = []


@node(
    retry=RetryPolicy(
        max_attempts=2, initial_backoff=timedelta(seconds=1), backoff=Backoff.FIXED, jitter=False
    )
)
def once_flaky(ctx: NodeContext, x: int) -> int:
    attempts.append(ctx.attempt)
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return x


FLAKY = Workflow("flaky_once", start=once_flaky)

Factory = Callable[..., Server]


@pytest.fixture
async def servers(etcd: EmbeddedEtcd) -> AsyncIterator[Factory]:
    made: list[tuple[Server, EtcdKV]] = []

    def make(
        port: int = 0,
        retention: dict[str, timedelta] | None = None,
        reconcile: timedelta = timedelta(seconds=30),
    ) -> Server:
        kv = EtcdKV([etcd.endpoint])
        config = ServerConfig(
            port=port,
            sessions=FAST,
            grace=timedelta(seconds=1),
            namespace_retention=retention or {},
            reconcile_interval=reconcile,
        )
        server = Server(kv, config)
        made.append((server, kv))
        return server

    yield make
    async with contextlib.AsyncExitStack() as stack:  # every one, even if stopping one fails
        for server, kv in made:
            stack.push_async_callback(kv.close)
            stack.push_async_callback(server.stop)


async def test_two_replicas_share_the_work_and_one_carries_on_alone(servers: Factory) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    first, second = servers(), servers()
    await first.start()
    await second.start()
    targets = [f"127.0.0.1:{s.port}" for s in (first, second)]
    workers = [
        Worker([CHAIN], WorkerConfig(server=t, namespace=namespace, slots=2)) for t in targets
    ]
    async with workers[0], workers[1]:
        async with OrchestratorClient(targets[0], namespace=namespace) as client:
            outputs = await asyncio.gather(
                *(client.run("replicated", n, timeout=60) for n in range(20))
            )
            assert outputs == [(n + 1) * 3 for n in range(20)]
        assert workers[0].executions > 0 and workers[1].executions > 0  # both replicas dispatched
        await first.stop()  # one replica goes away; the other serves every run
        async with OrchestratorClient(targets[1], namespace=namespace) as client:
            outputs = await asyncio.gather(
                *(client.run("replicated", n, timeout=60) for n in range(10))
            )
            assert outputs == [(n + 1) * 3 for n in range(10)]


async def test_a_retry_timer_outlives_the_server_that_set_it(servers: Factory) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    attempts.clear()
    port = free_port()
    first = servers(port)
    await first.start()
    target = f"127.0.0.1:{port}"
    worker = Worker([FLAKY], WorkerConfig(server=target, namespace=namespace, slots=1))
    async with worker, OrchestratorClient(target, namespace=namespace, retries=10) as client:
        run, _ = await client.start_run("flaky_once", 5)

        async def failed_once() -> bool:
            return len(await client.run_errors(run.run_id)) == 1

        await eventually(failed_once, within=30)
        await first.stop()  # the retry timer is due in a second; no server runs
        second = servers(port)  # a new server, same address: the worker reconnects
        await second.start()
        final = await client.wait_for_completion(run.run_id, timeout=60)
        assert final.status is RunStatus.COMPLETED and final.output == 5
    assert attempts == [1, 2]


async def test_retention_removes_finished_runs(servers: Factory) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    server = servers(retention={namespace: timedelta(seconds=1)})
    await server.start()
    target = f"127.0.0.1:{server.port}"
    async with (
        Worker([CHAIN], WorkerConfig(server=target, namespace=namespace, slots=2)),
        OrchestratorClient(target, namespace=namespace) as client,
    ):
        run, _ = await client.start_run("replicated", 1)
        assert (await client.wait_for_completion(run.run_id, 30)).status is RunStatus.COMPLETED
        await server.stop()  # (maintenance only learns new namespaces on start)
        later = servers(retention={namespace: timedelta(seconds=1)})
        await later.start()

        async def gone() -> bool:
            async with OrchestratorClient(f"127.0.0.1:{later.port}", namespace=namespace) as other:
                try:
                    await other.get_run(run.run_id)
                except NotFound:
                    return True
                return False

        await eventually(gone, within=30)


@node
def split_all(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
def halve(x: int) -> int:
    return x // 2


@node(join=True)
def summed(values: list[int]) -> int:
    return sum(values)


WIDE = Workflow("wide_join", start=split_all).edge(split_all, halve).edge(halve, summed)


async def test_two_replicas_race_for_the_same_items_and_join_once(servers: Factory) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    first, second = servers(), servers()
    await first.start()
    await second.start()
    targets = [f"127.0.0.1:{s.port}" for s in (first, second)]
    workers = [
        Worker([WIDE], WorkerConfig(server=t, namespace=namespace, slots=3)) for t in targets
    ]
    async with (
        workers[0],
        workers[1],
        OrchestratorClient(targets[0], namespace=namespace) as client,
    ):
        outputs = await asyncio.gather(
            *(client.run("wide_join", 100, timeout=120) for _ in range(3))
        )
        assert outputs == [sum(x // 2 for x in range(100))] * 3
        assert workers[0].executions + workers[1].executions == 3 * 102  # each item once, one join
        assert workers[0].executions > 0 and workers[1].executions > 0


async def test_a_worker_started_before_its_server_waits_for_it(
    servers: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    port = free_port()
    target = f"127.0.0.1:{port}"
    worker = Worker([CHAIN], WorkerConfig(server=target, namespace=namespace, slots=1))
    running = asyncio.create_task(worker.run())

    async def refused() -> bool:
        return "cannot register" in caplog.text

    await eventually(refused, within=30)  # the worker tried first, and found no server
    server = servers(port)
    await server.start()
    async with OrchestratorClient(target, namespace=namespace, retries=10) as client:

        async def registered() -> bool:
            return bool(await client.workers())

        await eventually(registered, within=30)
        assert await client.run("replicated", 2, timeout=30) == 9
    await worker.shutdown()
    await running


async def test_the_elected_replica_fails_a_run_made_stuck_behind_its_back(
    servers: Factory,
) -> None:
    """No step's Txn can see that this run has nothing left: its live markers are deleted by
    hand. The reconciler of whichever replica leads finds it within its interval."""
    first, second = servers(reconcile=timedelta(seconds=1)), servers(reconcile=timedelta(seconds=1))
    await first.start()
    await second.start()
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    async with OrchestratorClient(f"127.0.0.1:{first.port}", namespace=namespace) as client:
        await client.register_workflow(CHAIN)
        run, _ = await client.start_run("replicated", 1)
        keys = Keys(namespace)  # as if its one item had ended, in a Txn that could not tell
        found = await first.kv.get(keys.item(run.run_id, "start"))
        assert found is not None
        state = records_pb2.WorkItemState.FromString(found.value)
        state.status = records_pb2.ITEM_STATUS_COMPLETED
        await first.kv.txn(
            Txn(
                [],
                [
                    Put(found.key, state.SerializeToString()),
                    Delete(keys.queue(run.run_id, "start")),
                    Delete(keys.live(run.run_id), prefix=True),
                ],
            )
        )

        async def stuck() -> bool:
            record = await client.get_run(run.run_id)
            return record.status is RunStatus.FAILED and "no item is left" in (record.error or "")

        await eventually(stuck, within=20)
        leaders = [s for s in (first, second) if s.election.leading]
        assert len(leaders) == 1  # one replica leads, and so reconciles
