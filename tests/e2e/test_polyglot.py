"""A Node.js worker and client, built from proto/ alone, in one run with a Python worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.sessions import SessionConfig
from floxide_worker import Worker, WorkerConfig
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from floxide_grpc import Workflow, node
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, finish, free_port, stop_all, stop_server

pytestmark = pytest.mark.timeout(120)

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


@node
def py_parse(text: str) -> int:
    return int(text)


@node
def js_square(x: int) -> int:  # runs on the Node.js worker; this only declares its types
    raise NotImplementedError("js_square runs on the Node.js worker")


@node
def py_format(x: int) -> str:
    return f"result: {x}"


MIXED = Workflow("mixed", start=py_parse).edge(py_parse, js_square).edge(js_square, py_format)


def node_binary() -> str:
    found = shutil.which("node")
    if found is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail(
            "Node.js and clients/node/node_modules are needed: run `npm ci` in clients/node"
        )
    return found


@dataclass
class Mixed:
    server: Server
    namespace: str
    tmp: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def node_worker(self, name: str, server: str = "", **env: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as sink:
            process = subprocess.Popen(
                [node_binary(), "examples/square_worker.js", server or self.target, self.namespace],
                cwd=NODE_DIR,
                env={**os.environ, **env},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()


@pytest.fixture
async def mixed(etcd: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[Mixed]:
    kv = EtcdKV([etcd.endpoint])
    fast = SessionConfig(
        lease_ttl=timedelta(seconds=2), heartbeat_interval=timedelta(milliseconds=500)
    )
    server = Server(kv, ServerConfig(port=0, sessions=fast, grace=timedelta(seconds=1)))
    harness = Mixed(server, f"ns-{uuid.uuid4().hex[:8]}", tmp_path)
    async with contextlib.AsyncExitStack() as undo:  # in reverse, each even if another fails
        undo.push_async_callback(kv.close)
        undo.push_async_callback(server.stop)
        undo.callback(stop_all, harness.processes)
        await server.start()
        python = Worker(
            [MIXED],
            WorkerConfig(
                server=harness.target,
                namespace=harness.namespace,
                nodes=frozenset({"py_parse", "py_format"}),
            ),
        )
        async with python:  # registers `mixed`, serves its Python nodes
            yield harness


async def workers(mixed: Mixed) -> int:
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace) as client:
        return len(await client.workers())


async def test_a_run_crosses_python_and_node_workers(mixed: Mixed) -> None:
    mixed.node_worker("node-1")
    await eventually(lambda: _at_least(mixed, 2), within=30)
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace) as client:
        assert await client.run("mixed", "7", timeout=60) == "result: 49"
        outputs = await asyncio.gather(
            *(client.run("mixed", str(n), timeout=60) for n in range(10))
        )
        assert outputs == [f"result: {n * n}" for n in range(10)]


async def test_a_node_worker_told_several_servers_moves_past_one_that_is_down(
    mixed: Mixed,
) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    mixed.node_worker("node-1", server=f"{down},{mixed.target}")
    await eventually(lambda: _at_least(mixed, 2), within=30)
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace) as client:
        assert await client.run("mixed", "3", timeout=60) == "result: 9"
    assert f"stream to {down} ended" in mixed.log("node-1")


async def test_a_node_worker_killed_mid_step_is_taken_over(mixed: Mixed) -> None:
    gate = mixed.tmp / "gate"
    gate.mkdir()
    first = mixed.node_worker("node-1", FLOXIDE_GATE=str(gate))
    await eventually(lambda: _at_least(mixed, 2), within=30)
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace, retries=5) as client:
        run, _ = await client.start_run("mixed", "6")

        async def started() -> bool:
            return (gate / f"started-{first.pid}").exists()

        await eventually(started, within=30)
        mixed.node_worker("node-2", FLOXIDE_GATE=str(gate))
        await eventually(lambda: _at_least(mixed, 3), within=30)
        stop_server(first, signal.SIGKILL)
        (gate / "release").write_text("")
        final = await client.wait_for_completion(run.run_id, timeout=60)
        assert final.status is RunStatus.COMPLETED and final.output == "result: 36"
        assert [(e.node, e.kind) for e in await client.run_errors(run.run_id)] == [
            ("js_square", "WORKER_LOST")
        ]


async def test_a_node_output_breaking_the_schema_is_refused_clearly(mixed: Mixed) -> None:
    mixed.node_worker("node-bad", FLOXIDE_BAD_OUTPUT="1")
    await eventually(lambda: _at_least(mixed, 2), within=30)
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace) as client:
        run, _ = await client.start_run("mixed", "3")
        final = await client.wait_for_completion(run.run_id, timeout=60)
        assert final.status is RunStatus.FAILED
        [error] = await client.run_errors(run.run_id)
        assert (error.node, error.kind) == ("js_square", "INVALID_OUTPUT")
        assert "'9' is not of type 'integer'" in error.message

    async def logged() -> bool:
        return "refused: 3" in mixed.log("node-bad")

    await eventually(logged, within=10)


async def test_a_node_client_registers_starts_and_waits(mixed: Mixed) -> None:
    process = await asyncio.create_subprocess_exec(
        node_binary(), "examples/client_run.js", mixed.target, mixed.namespace, '"ada"',
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await finish(process, 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == '"hello, ada"'


async def test_reflection_alone_is_enough_to_call_the_api(mixed: Mixed) -> None:
    """A generic tool: discover the API by server reflection and call it without our stubs."""
    async with OrchestratorClient(mixed.target, namespace=mixed.namespace) as client:
        run, _ = await client.start_run("mixed", "2")
    as_json = await asyncio.to_thread(
        _get_run_by_reflection, mixed.target, mixed.namespace, run.run_id
    )
    assert as_json["run"]["runId"] == run.run_id and as_json["run"]["workflow"] == "mixed"


def _get_run_by_reflection(target: str, namespace: str, run_id: str) -> dict[str, Any]:
    """What a generic tool does: no floxide code, only the server's reflection (in a thread:
    the server runs on the test's event loop)."""
    channel = grpc.insecure_channel(target)
    try:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "floxide.v1.OrchestratorService" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("floxide.v1.OrchestratorService")
        method = service.methods_by_name["GetRun"]
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request = json_format.ParseDict({"namespace": namespace, "runId": run_id}, request_class())
        token = os.environ["FLOXIDE_TOKEN"]  # what docs/protocol.md says a client sends
        metadata = (("authorization", f"Bearer {token}"),)
        return json_format.MessageToDict(call(request, timeout=10, metadata=metadata))
    finally:
        channel.close()


async def _at_least(mixed: Mixed, count: int) -> bool:
    return await workers(mixed) >= count
