"""Workers outlive a server that comes back on a fresh store (a restart without its data).

Its hello refused NOT_FOUND (the server knows none of the definitions it serves), a worker, in
Python as in Node.js, registers what it serves again and says hello again, and goes on serving.
Real processes: the server on an embedded etcd of its own (fresh at each start), the workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from floxide_grpc.client import OrchestratorClient
from floxide_grpc.errors import NotFound
from floxide_grpc.records import RunStatus
from tests.helpers import eventually, free_port, start_server, stop_all, stop_server

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("--lease-ttl", "2", "--heartbeat", "0.5")


async def completes(target: str, namespace: str, workflow: str, value: object) -> object:
    """Start a run as soon as the workflow is registered; its output once it completes."""
    async with OrchestratorClient(target, namespace=namespace, retries=10) as client:

        async def started() -> str:
            try:
                run, _ = await client.start_run(workflow, value)
            except NotFound:
                return ""  # not registered again yet
            return run.run_id

        run_id = await eventually(started, within=30)
        done = await client.wait_for_completion(run_id, timeout=30)
        assert done.status is RunStatus.COMPLETED, done.error
        return done.output


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A worker process, its output going to ``log``."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, cwd=ROOT, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT
        )


@pytest.mark.timeout(120)
async def test_python_and_node_workers_register_again_on_a_fresh_store(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (ROOT / "clients/node/node_modules/@grpc/grpc-js").exists():
        pytest.fail("Node.js and clients/node/node_modules are needed: `npm ci` in clients/node")
    port = free_port()
    target = f"127.0.0.1:{port}"
    namespace = "fresh"
    ready = str(tmp_path / "ready")
    server, _ = start_server(*FLAGS, "--port", str(port), ready_file=ready)
    logs = {name: tmp_path / f"{name}.log" for name in ("python", "node")}
    commands = {
        "python": [
            str(Path(sys.executable).parent / "floxide-worker"), "examples/order_chain.py",
            "--server", target, "--namespace", namespace, "--slots", "2", "--worker-id", "py",
        ],
        "node": [node, str(Path(__file__).with_name("fresh_store_worker.js")), target, namespace],
    }  # fmt: skip
    workers = [spawn(command, logs[name]) for name, command in commands.items()]
    order = {"id": 3, "amount": 9.5, "card": "visa"}
    try:
        assert await completes(target, namespace, "order_chain", order) == {
            "order_id": 3,
            "status": "shipped",
        }
        assert await completes(target, namespace, "js_greeting", "one") == "hello, one"
        stop_server(server, signal.SIGKILL)  # its embedded etcd goes with it: a fresh store next
        server, _ = start_server(*FLAGS, "--port", str(port), ready_file=ready)
        assert await completes(target, namespace, "order_chain", order) == {
            "order_id": 3,
            "status": "shipped",
        }
        assert await completes(target, namespace, "js_greeting", "two") == "hello, two"
        # Again, the server draining its streams this time (they end cleanly, not broken).
        stop_server(server, signal.SIGTERM)
        server, _ = start_server(*FLAGS, "--port", str(port), ready_file=ready)
        assert await completes(target, namespace, "js_greeting", "three") == "hello, three"
        assert await completes(target, namespace, "order_chain", order) == {
            "order_id": 3,
            "status": "shipped",
        }
        assert all(w.poll() is None for w in workers), "a worker stopped"
        assert "registering the workflows again" in logs["python"].read_text()
        assert "registering js_greeting again" in logs["node"].read_text()
    finally:
        stop_all([*workers, server])
