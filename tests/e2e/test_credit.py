"""A worker never holds more items than its slots: across cut streams, reconnects and resent
results (docs/protocol.md, "A worker's duties" 5-6 and "Reconnecting").

A one-slot worker (Python in this process, or Node.js in its own) talks to a real server (on the
real etcd) through a TCP proxy that cuts its stream while it runs a step. Each cut leaves the
step's slot in one of the states a reconnect must count right: the step finishes while no stream
is open, finishes after the new session opened, or finished and was applied but its
acknowledgement was lost (so its result is sent again on the new session). The node counts how
many of its executions run at once, and the server's view of each session of the worker (the
credit granted to it) is read as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.sessions import Session, SessionConfig
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Backoff, NodeContext, RetryPolicy, Workflow, node
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.conftest import Runner
from tests.helpers import TcpProxy, eventually, serving, stop_all

pytestmark = pytest.mark.timeout(120)

FAST = SessionConfig(
    lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(milliseconds=500), max_credit=16
)
RETRIES = RetryPolicy(
    max_attempts=50, initial_backoff=timedelta(milliseconds=10), backoff=Backoff.FIXED, jitter=False
)
ROUNDS = 12
RUNS = 16
NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


class Steps(Protocol):
    """The executions of a one-slot worker's node, each waiting at a gate for the test."""

    async def next(self) -> tuple[str, Callable[[], None]]:
        """The next execution to start: its run, and what releases it."""
        ...

    def running(self) -> int:
        """How many executions run now."""
        ...

    def peak(self) -> int:
        """The most executions that ran at once."""
        ...

    def free(self) -> None:
        """Release every execution, and let those to come run through."""
        ...


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


def within_slots(steps: Steps, watched: Watched) -> None:
    """One item at a time on the worker; no session of it granted more than its one slot."""
    watched.sample()
    assert steps.peak() == 1, f"{steps.peak()} items ran at once on a one-slot worker"
    granted = watched.granted
    assert max(granted.values(), default=0) <= 1, f"credit granted to each session: {granted}"
    assert watched.peak_held <= 1


async def cut_rounds(
    steps: Steps, watched: Watched, proxy: TcpProxy, client: OrchestratorClient
) -> None:
    """Cut the worker's stream while it runs a step, ``ROUNDS`` times, checking as it goes."""
    for round_ in range(ROUNDS):
        run_id, release = await steps.next()
        within_slots(steps, watched)  # what the cuts so far did
        before = watched.live()
        if round_ % 3 == 0:  # the step finishes while no stream is open
            proxy.cut()
            release()

            async def finished() -> bool:
                return steps.running() == 0

            await eventually(finished, within=10, interval=0.005)
            assert not watched.live() - before, "it finished after a reconnect"
        elif round_ % 3 == 1:  # the step finishes once the new session is open
            proxy.cut()

            async def reconnected(before: set[int] = before) -> bool:
                return bool(watched.live() - before)

            await eventually(reconnected, within=30)
            release()
        else:  # the step's result is applied, its ack lost: sent again after the cut
            proxy.blackhole = True
            release()

            async def applied(run_id: str = run_id) -> bool:
                return (await client.get_run(run_id)).status is RunStatus.COMPLETED

            await eventually(applied, within=30)
            await asyncio.sleep(0.1)  # whatever follows it is held by the old session
            proxy.cut()
            proxy.blackhole = False
    steps.free()


async def all_completed(client: OrchestratorClient, runs: list[str]) -> None:
    for run_id in runs:
        final = await client.wait_for_completion(run_id, timeout=60)
        assert final.status is RunStatus.COMPLETED, final.error


@pytest.fixture
async def server(etcd: EmbeddedEtcd) -> AsyncIterator[Server]:
    config = ServerConfig(port=0, sessions=FAST, grace=timedelta(seconds=2))
    async with serving([etcd.endpoint], config) as running:
        yield running


@contextlib.asynccontextmanager
async def proxied(server: Server, worker_id: str) -> AsyncIterator[tuple[TcpProxy, Watched]]:
    """A proxy to the server, and the worker's sessions watched while the block runs."""
    proxy = await TcpProxy(server.port).start()
    watched = Watched(server, worker_id)
    sampler = asyncio.create_task(watched.run())
    try:
        yield proxy, watched
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await proxy.stop()


# -- the Python worker ----------------------------------------------------------------------------


@dataclass
class PythonSteps:
    """The executions of ``slot`` in this process."""

    now: int = 0
    most: int = 0
    released: bool = False
    starts: asyncio.Queue[tuple[str, asyncio.Event]] = field(default_factory=asyncio.Queue)

    async def next(self) -> tuple[str, Callable[[], None]]:
        run_id, gate = await asyncio.wait_for(self.starts.get(), 30)
        return run_id, gate.set

    def running(self) -> int:
        return self.now

    def peak(self) -> int:
        return self.most

    def free(self) -> None:
        self.released = True
        while not self.starts.empty():
            self.starts.get_nowait()[1].set()


python_steps = PythonSteps()


@node(retry=RETRIES)
async def slot(ctx: NodeContext, x: int) -> int:
    steps = python_steps
    steps.now += 1
    steps.most = max(steps.most, steps.now)
    try:
        if not steps.released:
            gate = asyncio.Event()
            steps.starts.put_nowait((ctx.run_id, gate))
            await gate.wait()
    finally:
        steps.now -= 1
    return x


SLOT = Workflow("slot", start=slot)


async def test_a_one_slot_python_worker_never_runs_two_items_across_cuts_and_resends(
    server: Server,
) -> None:
    global python_steps  # noqa: PLW0603 (the node finds this test's steps there)
    steps = python_steps = PythonSteps()
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    async with (
        proxied(server, "one-slot") as (proxy, watched),
        OrchestratorClient(f"127.0.0.1:{server.port}", namespace=namespace) as client,
    ):
        config = WorkerConfig(
            server=f"127.0.0.1:{proxy.port}",
            namespace=namespace,
            slots=1,
            worker_id="one-slot",
            reconnect_backoff=timedelta(milliseconds=600),  # waits 0.3-0.6 s to reconnect
            max_backoff=timedelta(milliseconds=600),
            drain_grace=timedelta(seconds=2),  # a failed check leaves steps at their gates
        )
        async with Worker([SLOT], config) as worker:
            runs = [(await client.start_run("slot", n))[0].run_id for n in range(RUNS)]
            await cut_rounds(steps, watched, proxy, client)
            await all_completed(client, runs)
        assert len(watched.sessions) > ROUNDS, watched.granted  # a session per cut, and more
        assert worker.executions >= RUNS
    within_slots(steps, watched)


# -- the Node.js worker ---------------------------------------------------------------------------


@node(retry=RETRIES)
def js_slot(x: int) -> int:  # runs on the Node.js worker; this only declares its types
    raise NotImplementedError("js_slot runs on the Node.js worker")


JS_SLOT = Workflow("js_slot", start=js_slot)


@dataclass
class NodeSteps:
    """The executions of ``js_slot`` in tests/e2e/one_slot_worker.js, told by files in ``dir``."""

    dir: Path
    seen: int = 0

    async def next(self) -> tuple[str, Callable[[], None]]:
        n = self.seen + 1
        started = self.dir / f"started-{n}"
        deadline = time.monotonic() + 30
        while not (started.exists() and started.read_text()):
            assert time.monotonic() < deadline, f"no execution {n} within 30 s"
            await asyncio.sleep(0.01)
        self.seen = n

        def release() -> None:
            (self.dir / f"release-{n}").write_text("")

        return started.read_text(), release

    def _log(self) -> list[list[str]]:
        path = self.dir / "log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def running(self) -> int:
        log = self._log()
        return sum(1 for e in log if e[0] == "start") - sum(1 for e in log if e[0] == "end")

    def peak(self) -> int:
        return max((int(e[2]) for e in self._log() if e[0] == "start"), default=0)

    def free(self) -> None:
        (self.dir / "free").write_text("")


def test_the_node_workers_credit_frame_by_frame(run: Runner) -> None:
    """clients/node/test/: the Node.js worker's credit on fake streams, frame by frame."""
    node_binary = shutil.which("node")
    assert node_binary is not None, "Node.js is needed"
    done = run(node_binary, "--test", "test/", cwd=NODE_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout


def start_node_worker(
    target: str, namespace: str, steps: NodeSteps, log: Path
) -> subprocess.Popen[bytes]:
    """tests/e2e/one_slot_worker.js, connecting to ``target``; its output goes to ``log``."""
    node_binary = shutil.which("node")
    if node_binary is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("Node.js and clients/node/node_modules are needed: `npm ci` in clients/node")
    with log.open("ab") as sink:
        return subprocess.Popen(
            [
                node_binary, str(Path(__file__).with_name("one_slot_worker.js")),
                target, namespace, str(steps.dir),
            ],
            env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_a_one_slot_node_worker_never_runs_two_items_across_cuts_and_resends(
    server: Server, tmp_path: Path
) -> None:
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    steps = NodeSteps(tmp_path / "steps")
    steps.dir.mkdir()
    log = tmp_path / "node.log"
    processes: list[subprocess.Popen[bytes]] = []
    async with (
        proxied(server, "node-one-slot") as (proxy, watched),
        OrchestratorClient(f"127.0.0.1:{server.port}", namespace=namespace) as client,
    ):
        try:
            await client.register_workflow(JS_SLOT)
            target = f"127.0.0.1:{proxy.port}"
            processes.append(start_node_worker(target, namespace, steps, log))
            runs = [(await client.start_run("js_slot", n))[0].run_id for n in range(RUNS)]
            await cut_rounds(steps, watched, proxy, client)
            await all_completed(client, runs)
        finally:
            steps.free()
            stop_all(processes)
        assert len(watched.sessions) > ROUNDS, watched.granted
        assert "refused: 9" in log.read_text()  # results sent again, to later sessions
    within_slots(steps, watched)
