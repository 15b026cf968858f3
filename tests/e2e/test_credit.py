"""A worker never holds more items than its slots: across cut streams, reconnects and resent
results (docs/protocol.md, "A worker's duties" 5-6 and "Reconnecting").

A one-slot worker talks to a real server (on the real etcd) through a TCP proxy that cuts its
stream while it runs a step. Each cut leaves the step's slot in one of the states a reconnect
must count right: the step finishes while no stream is open, finishes after the new session
opened, or finished and was applied but its acknowledgement was lost (so its result is sent
again on the new session). The node counts how many of its executions run at once, and the
server's view of each session of the worker (the credit granted to it) is read as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.sessions import Session, SessionConfig
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Backoff, NodeContext, RetryPolicy, Workflow, node
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import TcpProxy, eventually, serving

pytestmark = pytest.mark.timeout(120)

FAST = SessionConfig(
    lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(milliseconds=500), max_credit=16
)


@dataclass
class Gauge:
    """How many executions of ``slot`` run at once; each waits for the test's gate."""

    running: int = 0
    peak: int = 0
    free: bool = False  # once set, executions no longer wait
    starts: asyncio.Queue[tuple[str, asyncio.Event]] = field(default_factory=asyncio.Queue)

    def reset(self) -> None:
        self.running, self.peak, self.free, self.starts = 0, 0, False, asyncio.Queue()


gauge = Gauge()


@node(
    retry=RetryPolicy(
        max_attempts=50,
        initial_backoff=timedelta(milliseconds=10),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
async def slot(ctx: NodeContext, x: int) -> int:
    gauge.running += 1
    gauge.peak = max(gauge.peak, gauge.running)
    try:
        if not gauge.free:
            gate = asyncio.Event()
            gauge.starts.put_nowait((ctx.run_id, gate))
            await gate.wait()
    finally:
        gauge.running -= 1
    return x


SLOT = Workflow("slot", start=slot)


@dataclass
class Watched:
    """Every session of one worker the server opened, sampled as it goes."""

    server: Server
    worker_id: str
    sessions: dict[int, Session] = field(default_factory=dict)
    peak_held: int = 0  # the most slots a session had free and held at once

    def sample(self) -> None:
        for session in list(self.server.sessions.live.values()):
            if session.record.worker_id == self.worker_id:
                self.sessions[session.lease] = session
                self.peak_held = max(self.peak_held, session.credit.available + len(session.held))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.005)

    def live(self) -> set[int]:
        return {
            s.lease
            for s in self.server.sessions.live.values()
            if s.record.worker_id == self.worker_id
        }

    @property
    def granted(self) -> dict[int, int]:
        """The credit each session was granted in all: its hello's and every ``credit`` since."""
        return {lease: s.record.slots for lease, s in self.sessions.items()}


@pytest.fixture
async def server(etcd: EmbeddedEtcd) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, sessions=FAST, grace=timedelta(seconds=2))
    async with serving([etcd.endpoint], config) as running:
        yield running


async def test_a_one_slot_python_worker_never_runs_two_items_across_cuts_and_resends(
    server: Server,
) -> None:
    gauge.reset()
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    direct = f"127.0.0.1:{server.port}"
    proxy = await TcpProxy(server.port).start()
    watched = Watched(server, "one-slot")
    sampler = asyncio.create_task(watched.run())
    config = WorkerConfig(
        server=f"127.0.0.1:{proxy.port}",
        namespace=namespace,
        slots=1,
        worker_id="one-slot",
        reconnect_backoff=timedelta(milliseconds=600),  # waits 0.3-0.6 s before reconnecting
        max_backoff=timedelta(milliseconds=600),
        drain_grace=timedelta(seconds=2),  # a failed check leaves steps at their gates
    )
    try:
        async with (
            OrchestratorClient(direct, namespace=namespace) as client,
            Worker([SLOT], config) as worker,
        ):
            runs = [(await client.start_run("slot", n))[0].run_id for n in range(16)]
            for round_ in range(12):
                run_id, gate = await asyncio.wait_for(gauge.starts.get(), 30)
                within_slots(watched)  # what the cuts so far did
                before = watched.live()
                if round_ % 3 == 0:  # the step finishes while no stream is open
                    proxy.cut()
                    gate.set()

                    async def finished() -> bool:
                        return gauge.running == 0

                    await eventually(finished, within=10, interval=0.005)
                    assert not watched.live() - before, "it finished after a reconnect"
                elif round_ % 3 == 1:  # the step finishes once the new session is open
                    proxy.cut()

                    async def reconnected(before: set[int] = before) -> bool:
                        return bool(watched.live() - before)

                    await eventually(reconnected, within=30)
                    gate.set()
                else:  # the step's result is applied, its ack lost: sent again after the cut
                    proxy.blackhole = True
                    gate.set()

                    async def applied(run_id: str = run_id) -> bool:
                        return (await client.get_run(run_id)).status is RunStatus.COMPLETED

                    await eventually(applied, within=30)
                    await asyncio.sleep(0.1)  # whatever follows it is held by the old session
                    proxy.cut()
                    proxy.blackhole = False
            gauge.free = True
            while not gauge.starts.empty():
                gauge.starts.get_nowait()[1].set()
            for each in runs:
                final = await client.wait_for_completion(each, timeout=60)
                assert final.status is RunStatus.COMPLETED, final.error
            watched.sample()
            assert len(watched.sessions) >= 13, watched.granted  # a session per cut, and more
            assert worker.executions >= 16
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await proxy.stop()
    within_slots(watched)


def within_slots(watched: Watched) -> None:
    """One item at a time on the worker; no session of it granted more than its one slot."""
    watched.sample()
    assert gauge.peak == 1, f"{gauge.peak} items ran at once on a one-slot worker"
    granted = watched.granted
    assert max(granted.values()) <= 1, f"credit granted to each session in turn: {granted}"
    assert watched.peak_held <= 1
