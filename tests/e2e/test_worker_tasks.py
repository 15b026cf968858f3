"""The worker's tasks: each has an owner, and none is left behind.

An item cancelled or failing ends alone; a SIGTERM drains a worker process and it exits 0; a
server gone away does not keep it from stopping; a failure of ``run()`` ends it with exit code 1
and one line saying why. Nowhere does asyncio report a task left behind: "Task was destroyed but
it is pending!" (a task dropped unfinished) or "Task exception was never retrieved" (a failure
nobody saw), in a worker process's stderr or in this process's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    worker_service_pb2,
)
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

WORKFLOWS = str(Path(__file__).parent.parent / "faults" / "workflows.py")
LEFT_BEHIND = ("Task was destroyed but it is pending", "Task exception was never retrieved")


def assert_nothing_left_behind(text: str) -> None:
    for message in LEFT_BEHIND:
        assert message not in text, text[-4000:]


# -- in this process ------------------------------------------------------------------------------


@node
def echo(x: int) -> int:
    return x


ECHO = Workflow("echo", start=echo)

stuck_started = asyncio.Event()
never = asyncio.Event()


@node
async def stuck(x: int) -> int:
    stuck_started.set()
    await asyncio.wait_for(never.wait(), 1.0)  # fails by itself, after the worker abandoned it
    return x


STUCK = Workflow("stuck", start=stuck)


@dataclass
class Loop:
    """What the loop's exception handler was given while a test ran."""

    reported: list[str] = field(default_factory=list)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.reported.append(f"{context.get('message')} {context.get('task', '')}")


@pytest.fixture
async def loop_reports() -> AsyncIterator[Loop]:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    handler = Loop()
    loop.set_exception_handler(handler)
    try:
        yield handler
    finally:
        loop.set_exception_handler(previous)


@pytest.fixture
def server_process(
    tmp_path: Path, etcd: EmbeddedEtcd
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    process, target = start_server(
        "--etcd", etcd.endpoint, "--lease-ttl", "2", "--heartbeat", "0.5",
        ready_file=str(tmp_path / "ready"),
    )  # fmt: skip
    try:
        yield process, target
    finally:
        stop_server(process, signal.SIGKILL)


async def no_task_but_this_one() -> bool:
    """Whether this task is the only one left on the loop."""
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_worker_entered_left_and_losing_its_server_leaves_no_task_behind(
    server_process: tuple[subprocess.Popen[bytes], str],
    loop_reports: Loop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck_started.clear()
    server, target = server_process
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    config = WorkerConfig(
        server=target, namespace=namespace, slots=2, drain_grace=timedelta(milliseconds=300)
    )
    async with OrchestratorClient(target, namespace=namespace) as client:
        async with Worker([ECHO, STUCK], config):
            assert await client.run("echo", 1, timeout=30) == 1
        await eventually(no_task_but_this_one, within=5)
        async with Worker([ECHO, STUCK], config):
            assert await client.run("echo", 2, timeout=30) == 2
            await client.start_run("stuck", 3)
            await asyncio.wait_for(stuck_started.wait(), 30)
            stop_server(server, signal.SIGKILL)  # abrupt: the stream breaks, nothing drains

            async def reconnecting() -> bool:
                return "reconnecting" in caplog.text

            await eventually(reconnecting, within=30)
        # Leaving drained for the grace period, then abandoned the stuck item, node and all.
        await eventually(no_task_but_this_one, within=5)
    await asyncio.sleep(1.2)  # past the stuck node's own timeout: had it been left running
    gc.collect()  # ... its failure would be reported by now, or its task when collected
    await asyncio.sleep(0)
    assert_nothing_left_behind("\n".join(loop_reports.reported) + caplog.text)
    assert "abandoning 1 held item(s)" in caplog.text


waiting: list[str] = []
released = asyncio.Event()


@node
async def wait_for_release(name: str) -> str:
    waiting.append(name)
    await asyncio.wait_for(released.wait(), 30)  # a Cancel from the server cancels this wait
    return name


class NotAnException(BaseException):
    """Escapes ``except Exception``: a worker must still make it the item's failed result."""


@node
def escapes(x: int) -> int:
    raise NotAnException(f"escaped with {x}")


WAITING = Workflow("waiting", start=wait_for_release)
ESCAPES = Workflow("escapes", start=escapes)


async def test_an_item_cancelled_or_failing_ends_alone(
    server_process: tuple[subprocess.Popen[bytes], str],
    loop_reports: Loop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    waiting.clear()
    released.clear()
    _, target = server_process
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    config = WorkerConfig(server=target, namespace=namespace, slots=3)
    async with (
        OrchestratorClient(target, namespace=namespace) as client,
        Worker([WAITING, ESCAPES, ECHO], config) as worker,
    ):
        first, _ = await client.start_run("waiting", "first")
        second, _ = await client.start_run("waiting", "second")

        async def both_held() -> bool:
            return sorted(waiting) == ["first", "second"]

        await eventually(both_held, within=30)
        await client.cancel_run(first.run_id, "only this one")
        assert (await client.wait_for_completion(first.run_id, 30)).status is RunStatus.CANCELLED

        async def one_held() -> bool:
            return len(worker._held) == 1

        await eventually(one_held, within=30)  # the first item ended on its Cancel, alone
        failed, _ = await client.start_run("escapes", 4)
        done = await client.wait_for_completion(failed.run_id, 30)
        assert done.status is RunStatus.FAILED
        assert [e.message for e in await client.run_errors(failed.run_id)] == [
            "NotAnException: escaped with 4"
        ]
        released.set()  # the second item ran on through both, and the worker still serves
        assert (await client.wait_for_completion(second.run_id, 30)).output == "second"
        assert await client.run("echo", 5, timeout=30) == 5
        assert worker.executions == 4
    await eventually(no_task_but_this_one, within=5)
    assert_nothing_left_behind("\n".join(loop_reports.reported) + caplog.text)


# -- worker processes -----------------------------------------------------------------------------


@dataclass
class Harness:
    tmp: Path
    target: str
    namespace: str = field(default_factory=lambda: f"wp-{uuid.uuid4().hex[:8]}")
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def gate(self) -> Path:
        return self.tmp / "gate"

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "FLOXIDE_FAULT_LOG": str(self.tmp / "side.log"),
            "FLOXIDE_FAULT_GATE": str(self.gate),
        }
        with (self.tmp / "worker.err").open("ab") as err:
            process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "floxide-worker"), WORKFLOWS,
                    "--server", self.target, "--namespace", self.namespace,
                    "--worker-id", "proc", *args,
                ],
                env=env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self.workers.append(process)
        return process

    @property
    def stderr(self) -> str:
        path = self.tmp / "worker.err"
        return path.read_text() if path.exists() else ""

    def client(self) -> OrchestratorClient:
        return OrchestratorClient(self.target, namespace=self.namespace, retries=3)

    async def workers_with(self, status: str) -> bool:
        async with self.client() as client:
            return any(w.status == status for w in await client.workers())

    async def held(self) -> bool:
        return any(p.name.startswith("started-") for p in self.gate.iterdir())

    async def says(self, text: str, times: int = 1) -> bool:
        return self.stderr.count(text) >= times


@pytest.fixture
def harness(
    tmp_path: Path, server_process: tuple[subprocess.Popen[bytes], str]
) -> Iterator[Harness]:
    made = Harness(tmp_path, server_process[1])
    made.gate.mkdir()
    try:
        yield made
    finally:
        for process in made.workers:
            if process.poll() is None:
                stop_server(process, signal.SIGKILL)


async def test_sigterm_drains_a_worker_process_and_it_exits_0_leaving_no_task_behind(
    harness: Harness,
) -> None:
    worker = harness.start_worker("--slots", "4")
    await eventually(lambda: harness.workers_with("idle"), within=30)
    async with harness.client() as client:
        output = await client.run("fault_fan_in", 12, timeout=60)  # many items come and go
        assert output == {"count": 12, "sum": 132}
        run, _ = await client.start_run("fault_chain", 1)
        await eventually(harness.held, within=30)  # it holds "hold", which waits on the gate
        worker.send_signal(signal.SIGTERM)
        await eventually(lambda: harness.workers_with("draining"), within=30)
        (harness.gate / "release").write_text("")
        assert worker.wait(timeout=60) == 0
        items = {i.node: i.status for i in await client.work_items(run.run_id)}
        assert items["hold"] == "completed"  # drained: finished and reported before exiting
    assert "Traceback" not in harness.stderr, harness.stderr[-4000:]
    assert_nothing_left_behind(harness.stderr)


async def test_a_worker_process_whose_server_went_away_still_stops_at_sigterm(
    harness: Harness, server_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    worker = harness.start_worker("--slots", "2")
    await eventually(lambda: harness.workers_with("idle"), within=30)
    stop_server(server_process[0], signal.SIGKILL)  # abrupt: the stream breaks, nothing drains
    # A while without a server (three failed reconnects, past a heartbeat), then the signal.
    await eventually(lambda: harness.says("reconnecting", times=3), within=30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert "Traceback" not in harness.stderr, harness.stderr[-4000:]
    assert_nothing_left_behind(harness.stderr)


async def test_a_refused_worker_process_exits_1_with_one_line_saying_why(
    harness: Harness,
) -> None:
    worker = harness.start_worker("--slots", "100000")  # over the server's credit limit
    assert worker.wait(timeout=60) == 1
    stderr = harness.stderr
    assert "Traceback" not in stderr, stderr[-4000:]
    assert stderr.splitlines()[-1] == (
        "error: the server refused this worker: credit 100000 is over the limit of 1024"
    )
    assert_nothing_left_behind(stderr)


async def register_any(
    request: orchestrator_service_pb2.RegisterWorkflowRequest, context: Any
) -> orchestrator_service_pb2.RegisterWorkflowResponse:
    return orchestrator_service_pb2.RegisterWorkflowResponse(definition_hash="h")


def hangs_up(*, refuse: bool = False) -> tuple[grpc.aio.Server, list[int]]:
    """A server that registers any workflow, then ends each worker stream before its hello:
    with OK (the stream closed), or ``refuse``-ing it with PERMISSION_DENIED. Also the count of
    streams it ended."""
    ended: list[int] = []

    async def hang_up(
        requests: AsyncIterator[worker_service_pb2.ConnectRequest], context: Any
    ) -> AsyncIterator[worker_service_pb2.ConnectResponse]:
        ended.append(1)
        if refuse:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no such token here")
        return
        yield

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "floxide.v1.OrchestratorService",
                {
                    "RegisterWorkflow": grpc.unary_unary_rpc_method_handler(
                        register_any,
                        request_deserializer=orchestrator_service_pb2.RegisterWorkflowRequest.FromString,
                        response_serializer=orchestrator_service_pb2.RegisterWorkflowResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "floxide.v1.WorkerService",
                {
                    "Connect": grpc.stream_stream_rpc_method_handler(
                        hang_up,
                        request_deserializer=worker_service_pb2.ConnectRequest.FromString,
                        response_serializer=worker_service_pb2.ConnectResponse.SerializeToString,
                    )
                },
            ),
        ]
    )
    return server, ended


async def test_a_worker_reconnects_when_a_stream_closes_before_its_hello_is_acknowledged() -> None:
    server, ended = hangs_up()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fast = timedelta(milliseconds=10)
    worker = Worker([ECHO], WorkerConfig(server=f"127.0.0.1:{port}", reconnect_backoff=fast))
    try:
        running = asyncio.create_task(worker.run())

        async def reconnected() -> bool:
            assert not running.done(), running
            return len(ended) >= 3

        await eventually(reconnected, within=30)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.stop(None)


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_a_worker_process_whose_run_fails_exits_1_with_one_line_unless_debugging(
    tmp_path: Path, level: str
) -> None:
    server, _ = hangs_up(refuse=True)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        harness = Harness(tmp_path, f"127.0.0.1:{port}")
        harness.gate.mkdir()
        worker = harness.start_worker("--log-level", level)

        async def exited() -> bool:
            return worker.poll() is not None

        await eventually(exited, within=60)
    finally:
        await server.stop(None)
    assert worker.returncode == 1
    stderr = harness.stderr
    assert stderr.splitlines()[-1] == ("error: the server refused this worker: no such token here")
    assert ("Traceback" in stderr) is (level == "debug"), stderr[-4000:]
    assert_nothing_left_behind(stderr)
