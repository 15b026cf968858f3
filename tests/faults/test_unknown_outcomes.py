"""etcd silent for longer than any retry window: outcomes stay unknown until known.

A ``floxide-server`` process reaches etcd only through a TCP proxy that, when told, forwards
requests and swallows every reply: etcd applies what it receives and the server hears nothing,
for several times its retry window (``--etcd-retry``). Meanwhile worker processes run chains,
fan-outs with joins, and retried steps, so that the silences fall on claims, completions
claiming their successors, group-commit batches of several transactions and timers firing. Each
step adds 1 to its run's context, exactly once with its step, so a run's count shows any step
applied twice or lost. Real etcd, real processes, every wait bounded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import Keys

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.faults.harness import Faults
from tests.helpers import TcpProxy, eventually, stop_server

SILENT = str(Path(__file__).parent / "silent.py")
RETRY = 0.5
"""The server's ``--etcd-retry``: each silence lasts several of them."""
SILENCE = 3.0
FLAGS = ("--lease-ttl", "10", "--heartbeat", "1", "--etcd-retry", str(RETRY))
"""Sessions outlive each silence: what is held stays held."""


@pytest.fixture
async def silent(tmp_path: Path, etcd: EmbeddedEtcd) -> AsyncIterator[tuple[Faults, TcpProxy]]:
    harness = Faults(tmp_path, etcd, workflows=SILENT)
    harness.gate.mkdir()
    proxy = await TcpProxy(etcd.client_port).start()
    # In a thread: the proxy runs in this loop, and the server's start waits on it.
    await asyncio.to_thread(harness.start_server, f"127.0.0.1:{proxy.port}", FLAGS)
    try:
        yield harness, proxy
    finally:
        harness.stop_all()
        await proxy.stop()


async def start_runs(client: OrchestratorClient, until: asyncio.Event) -> dict[str, int]:
    """Runs of each workflow, started one after another until ``until``; the steps of each."""
    runs: dict[str, int] = {}
    n = 0
    while not until.is_set():
        workflow, steps = [("silent_chain", 3), ("silent_fan", 6), ("silent_retry", 1)][n % 3]
        # The client calls again with the same key after a deadline a silence outlasted.
        run, _ = await client.start_run(workflow, 4 if steps == 6 else n)
        runs[run.run_id] = steps
        n += 1
        await asyncio.sleep(0.1)
    return runs


async def settled(faults: Faults, client: OrchestratorClient, runs: dict[str, int]) -> None:
    """Every run completed once, each step applied once, no claim or queue entry left."""
    for run_id, steps in runs.items():
        try:
            final = await client.wait_for_completion(run_id, timeout=60)
        except TimeoutError:
            items = await client.work_items(run_id)
            raise AssertionError(f"run {run_id} did not end: {items}") from None
        assert final.status is RunStatus.COMPLETED, (run_id, final.error)
        assert await client.run_context(run_id) == {"done": steps}, run_id
    kv = EtcdKV([faults.etcd.endpoint])
    keys = Keys(faults.namespace)
    try:

        async def nothing_held() -> bool:
            claims, _ = await kv.range(keys.claims)
            queued, _ = await kv.range(keys.queue())
            return not claims and not queued

        await eventually(nothing_held, within=30)
    finally:
        await kv.close()


async def test_silences_longer_than_any_retry_leave_every_run_completed_once(
    silent: tuple[Faults, TcpProxy],
) -> None:
    faults, proxy = silent
    for name in ("one", "two"):
        faults.start_worker(name, slots=4)
    async with OrchestratorClient(faults.target, namespace=faults.namespace, retries=30) as client:
        await eventually(lambda: faults.connected(2), within=30)
        done = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            starting = tasks.create_task(start_runs(client, done))
            for _ in range(3):  # silences fall on whatever is in flight: claims, steps, timers
                await asyncio.sleep(2.0)  # and between them, the leases are renewed
                proxy.blackhole = True
                await asyncio.sleep(SILENCE)
                proxy.blackhole = False
            done.set()
        runs = starting.result()
        await settled(faults, client, runs)
        for run_id in runs:  # the sessions outlived the silences: nothing was lost with one
            kinds = {e.kind for e in await client.run_errors(run_id)}
            assert kinds <= {"GENERIC"}, (run_id, kinds)  # the retried node's first attempt
    assert "unknown outcome" in (faults.tmp / "ready.log").read_text()  # it did happen


async def test_claims_applied_while_their_replies_were_lost_and_their_replica_killed(
    silent: tuple[Faults, TcpProxy],
) -> None:
    """The replica dies during a silence, before it hears what etcd applied (claims among it):
    their sessions' leases end, the claims are released, another replica finishes every run
    once."""
    faults, proxy = silent
    assert faults.server is not None
    faults.start_worker("one", slots=4)
    async with OrchestratorClient(faults.target, namespace=faults.namespace, retries=30) as client:
        await eventually(lambda: faults.connected(1), within=30)
        runs = {(await client.start_run("silent_chain", n))[0].run_id: 3 for n in range(30)}

        async def going() -> bool:  # claims and steps in full flow: the silence falls on them
            return bool((await client.list_runs(statuses=(RunStatus.COMPLETED,)))[0])

        await eventually(going, within=30)
        proxy.blackhole = True
        await asyncio.sleep(1.0)
        stop_server(faults.server, signal.SIGKILL)
        proxy.blackhole = False
        await asyncio.to_thread(faults.restart_server, f"127.0.0.1:{proxy.port}")
        await settled(faults, client, runs)
