"""The server's tasks, from outside: a failed server-wide loop ends the process non-zero, and no
task is left pending when clients end early or when the server shuts down."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from pathlib import Path

from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import NAMESPACES, Keys
from floxide_server.store.kv import Delete, Put, Txn

from floxide_grpc import PROTOCOL_VERSION, Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    records_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from floxide_grpc.client import OrchestratorClient
from tests.helpers import start_server, stop_server
from tests.helpers.channels import authorized_channel

LEFT_PENDING = (
    "Task was destroyed but it is pending",
    "Task exception was never retrieved",
    "was never awaited",
)


@node
def slow(x: int) -> int:
    return x


FLOW = Workflow("slow", start=slow)


def exit_code(process: subprocess.Popen[bytes], within: float) -> int | None:
    """The process's exit code once it exits, or ``None`` if it is still running ``within`` s."""
    deadline = time.monotonic() + within
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.poll()


async def test_a_failed_server_wide_loop_ends_the_process_with_the_error_logged(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    namespace = f"corrupt-{uuid.uuid4().hex[:8]}"
    corrupt = {
        NAMESPACES + namespace.encode(): b"",
        Keys(namespace).expansion("run", "item"): b"\xff",
    }
    process, _ = start_server("--etcd", etcd.endpoint, ready_file=str(ready))
    kv = EtcdKV([etcd.endpoint])
    try:  # an expansion no server wrote: the reconcile loop cannot parse it
        await kv.txn(Txn([], [Put(key, value) for key, value in corrupt.items()]))
        code = await asyncio.to_thread(exit_code, process, 30.0)
    finally:
        stop_server(process, signal.SIGKILL)
        await kv.txn(Txn([], [Delete(key) for key in corrupt]))  # the etcd is the session's
        await kv.close()
    log = await asyncio.to_thread(Path(f"{ready}.log").read_text)
    assert code == 1, log[-3000:]
    assert "a server-wide task failed" in log and "Error parsing message" in log
    assert "floxide-server stopped" in log
    assert not [line for line in LEFT_PENDING if line in log], log[-3000:]


async def test_no_task_is_left_pending_when_clients_end_early_or_at_shutdown(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    process, target = start_server("--grace", "2", ready_file=str(ready))
    try:
        async with OrchestratorClient(target, retries=0) as client:
            await client.register_workflow(FLOW)
            run, _ = await client.start_run("slow", 1)  # no worker: it stays running
        async with authorized_channel(target) as channel:
            # A client that stops waiting for a run after its first answer.
            wait = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel).WaitForCompletion(
                orchestrator_service_pb2.WaitForCompletionRequest(run_id=run.run_id)
            )
            answered = await wait.read()
            assert isinstance(answered, orchestrator_service_pb2.WaitForCompletionResponse)
            assert answered.run.run_id == run.run_id
            wait.cancel()
            # A worker whose stream is cut right after its hello was answered.
            stream = worker_service_pb2_grpc.WorkerServiceStub(channel).Connect()
            await stream.write(
                worker_service_pb2.ConnectRequest(
                    hello=worker_service_pb2.Hello(
                        protocol_version=PROTOCOL_VERSION,
                        worker_id="cut",
                        nodes=[records_pb2.ServedNode(workflow="slow", node="slow")],
                        credit=0,
                    )
                )
            )
            answer = await stream.read()
            assert isinstance(answer, worker_service_pb2.ConnectResponse)
            assert answer.hello_ack.session_id
            stream.cancel()
        async with authorized_channel(target) as channel:
            # A wait still open when the server shuts down.
            open_wait = orchestrator_service_pb2_grpc.OrchestratorServiceStub(
                channel
            ).WaitForCompletion(
                orchestrator_service_pb2.WaitForCompletionRequest(run_id=run.run_id)
            )
            first = await open_wait.read()
            assert isinstance(first, orchestrator_service_pb2.WaitForCompletionResponse)
            assert first.run.run_id == run.run_id
            code = await asyncio.to_thread(stop_server, process, signal.SIGTERM)
            open_wait.cancel()
    finally:
        stop_server(process, signal.SIGKILL)
    log = await asyncio.to_thread(Path(f"{ready}.log").read_text)
    assert code == 0, log[-3000:]
    assert not [line for line in LEFT_PENDING if line in log], log[-3000:]
