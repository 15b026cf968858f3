"""The fault tests' harness: a real etcd, a ``floxide-server`` process, ``floxide-worker``
processes serving a workflows file, a side channel and gates in the test's own directory."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV
from floxide_server.store.keys import Keys

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_grpc.client import OrchestratorClient
from tests.helpers import free_port, start_server, stop_all
from tests.helpers.hosts import Host

__all__ = ["WORKFLOWS", "Faults"]

FLAGS = ("--lease-ttl", "2", "--heartbeat", "0.5")
"""The server's flags unless a test names others: sessions that end fast."""
WORKFLOWS = str(Path(__file__).parent / "workflows.py")
"""The workflows the fault tests' worker processes serve, unless a test names others."""


@dataclass
class Faults:
    tmp: Path
    etcd: EmbeddedEtcd
    namespace: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workflows: str = WORKFLOWS
    worker_env: dict[str, str] = field(default_factory=dict)
    """Added to every worker's environment."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def etcd_endpoints(self) -> list[str]:
        """Where the test reads etcd itself."""
        return [self.etcd.endpoint]

    @property
    def gate(self) -> Path:
        return self.tmp / "gate"

    def start_server(self, etcd: str | None = None, flags: Sequence[str] = FLAGS) -> None:
        """Start the server (on ``etcd``, a proxy say, instead of the test's etcd)."""
        self.server, _ = start_server(
            "--etcd", etcd or self.etcd.endpoint, *flags, ready_file=str(self.tmp / "ready"),
        )  # fmt: skip
        self.port = int(_.rsplit(":", 1)[1])

    def restart_server(self, etcd: str | None = None, flags: Sequence[str] = FLAGS) -> None:
        """Start the server again on its port (on ``etcd``, or the test's etcd)."""
        self.server, _ = start_server(
            "--etcd", etcd or self.etcd.endpoint, *flags, "--port", str(self.port),
            ready_file=str(self.tmp / "ready"),
        )  # fmt: skip

    def start_worker(
        self,
        name: str,
        target: str | None = None,
        *,
        slots: int = 1,
        env: Mapping[str, str] | None = None,
        on: Host | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a worker process serving ``self.workflows`` (on the host ``on``, if given);
        ``env`` adds to its environment."""
        environment = {
            **os.environ,
            "FLOXIDE_FAULT_LOG": str(self.tmp / "side.log"),
            "FLOXIDE_FAULT_GATE": str(self.gate),
            **self.worker_env,
            **(env or {}),
        }
        with (self.tmp / f"{name}.log").open("ab") as sink:
            command = [
                str(Path(sys.executable).parent / "floxide-worker"), self.workflows,
                "--server", target or self.target, "--namespace", self.namespace,
                "--slots", str(slots), "--worker-id", name, "--log-level", "info",
            ]  # fmt: skip
            process = subprocess.Popen(
                on.command(command) if on is not None else command,
                env=environment, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.workers[name] = process
        return process

    def log_of(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def executions(self) -> list[tuple[str, int, int]]:
        path = self.tmp / "side.log"
        lines = path.read_text().split() if path.exists() else []
        return [(lines[i], int(lines[i + 1]), int(lines[i + 2])) for i in range(0, len(lines), 3)]

    async def started(self, attempt: int, pid: int | None = None) -> bool:
        return any(
            p.name.startswith(f"started-{attempt}-") and (pid is None or p.name.endswith(f"-{pid}"))
            for p in self.gate.iterdir()
        )

    def release(self) -> None:
        (self.gate / "release").write_text("")

    async def connected(self, count: int) -> bool:
        async with OrchestratorClient(self.target, namespace=self.namespace, retries=3) as client:
            return len(await client.workers()) >= count

    async def status_of(self, worker_id: str, status: str) -> bool:
        """Whether a session of ``worker_id`` has that status (``draining``) or liveness
        (``stale``)."""
        async with OrchestratorClient(self.target, namespace=self.namespace, retries=3) as client:
            return any(
                w.worker_id == worker_id and status in (w.status, w.liveness)
                for w in await client.workers()
            )

    async def items(self, run_id: str) -> dict[str, records_pb2.WorkItemState]:
        kv = EtcdKV(self.etcd_endpoints)
        try:
            found, _ = await kv.range(Keys(self.namespace).item(run_id))
            ops, _ = await kv.range(Keys(self.namespace).context_ops(run_id))
            states = [records_pb2.WorkItemState.FromString(k.value) for k in found]
            assert len(ops) == len(states) == 3, "one item and one context operation per step"
            return {s.item.node: s for s in states}
        finally:
            await kv.close()

    def stop_all(self) -> None:
        stop_all([*self.workers.values(), *([self.server] if self.server else [])])
