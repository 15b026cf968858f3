"""A cluster across hosts: etcd members, server replicas and worker processes, each in a network
namespace of its own (tests.helpers.hosts), reaching each other by their addresses there.

The fault harness's side channel and gates work unchanged: namespaces separate networks, not
files. The test process reaches every host from its own namespace (``Hosts.local``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from floxide_server.embedded import EmbeddedEtcd

from tests.faults.harness import FLAGS, Faults
from tests.helpers import start_server, stop_server
from tests.helpers.etcd import crash_safe_etcd, diverged
from tests.helpers.hosts import Host, Hosts

__all__ = ["Cluster", "Replica", "is_leader"]

SERVER_PORT = 50051
"""Every replica's port: each host has ports of its own."""


@dataclass
class Replica:
    """A ``floxide-server`` process on a host of its own."""

    name: str
    host: Host
    flags: Sequence[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.host.address}:{SERVER_PORT}"


def is_leader(member: EmbeddedEtcd) -> bool:
    """Whether ``member`` says it leads its cluster (False if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{member.endpoint}/metrics", timeout=2) as response:
            return b"etcd_server_is_leader 1" in response.read()
    except OSError:
        return False


@dataclass(kw_only=True)
class Cluster(Faults):
    """etcd members, replicas and workers, each on its own host; start with :meth:`start`."""

    hosts: Hosts
    members: dict[str, EmbeddedEtcd]
    replicas: dict[str, Replica] = field(default_factory=dict)

    @classmethod
    def start(cls, tmp: Path, hosts: Hosts, *, members: int = 1) -> Cluster:
        """etcd members ``e1``… on hosts of their own, healthy, and no replica yet.

        Call it from a thread that outlives the members, the event loop's say: etcd gets its
        parent-death signal when the thread that launched it ends.
        """
        binary = crash_safe_etcd()
        placed = {f"e{n}": hosts.add(f"e{n}") for n in range(1, members + 1)}
        cluster = ",".join(f"{name}=http://{host.address}:2380" for name, host in placed.items())
        made = {
            name: EmbeddedEtcd(
                data_dir=tmp / name,
                name=name,
                client_port=2379,
                peer_port=2380,
                cluster=cluster,
                host=host.address,
                prefix=tuple(host.command([])),
                binary=binary,
            )
            for name, host in placed.items()
        }
        try:
            for member in made.values():
                member.launch()
            for member in made.values():
                member.wait_healthy(60)
        except BaseException:
            with contextlib.ExitStack() as stack:
                for member in made.values():
                    stack.callback(member.stop)
            raise
        first = next(iter(made.values()))
        (tmp / "gate").mkdir(exist_ok=True)
        return cls(tmp, first, hosts=hosts, members=made)

    async def diverged(self) -> dict[str, int]:
        """The members' hashes if they differ (:func:`diverged`)."""
        return await diverged(self.members)

    @property
    def etcd_endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members.values()]

    @property
    def target(self) -> str:
        """The first replica's address: the one clients of the harness's helpers use."""
        return next(iter(self.replicas.values())).target

    def host(self, name: str) -> Host:
        """The host an etcd member, a replica or a worker of that name runs on."""
        return self.hosts.host(name)

    def start_replica(
        self, name: str, flags: Sequence[str] = FLAGS, *, first: str | None = None
    ) -> Replica:
        """Start a replica on a host of its own (its own again, if it ran before), talking to
        the member ``first`` first, if given."""
        replica = self.replicas.get(name) or Replica(name, self.hosts.host(name), flags)
        self.replicas[name] = replica
        order = sorted(self.members, key=lambda member: member != first)
        endpoints = ",".join(self.members[member].endpoint for member in order)
        replica.process, _ = start_server(
            "--etcd", endpoints, "--host", replica.host.address, "--port", str(SERVER_PORT),
            "--server-id", name, "--insecure", *flags,  # plain text, between hosts of its own
            ready_file=str(self.tmp / f"ready-{name}"), prefix=replica.host.command([]),
        )  # fmt: skip
        return replica

    def stop_replica(self, name: str, sig: int = signal.SIGKILL) -> None:
        replica = self.replicas[name]
        if replica.process is not None:
            stop_server(replica.process, sig)
            replica.process = None

    def start_worker_on(self, name: str, *replicas: str, slots: int = 1) -> subprocess.Popen[bytes]:
        """A worker on a host of its own, connected to ``replicas`` (the first it reaches)."""
        targets = ",".join(self.replicas[r].target for r in replicas)
        return self.start_worker(name, f"ipv4:{targets}", slots=slots, on=self.hosts.host(name))

    def leader(self) -> str:
        """The name of the member that leads now (there must be one)."""
        [name] = [n for n, m in self.members.items() if is_leader(m)]
        return name

    def stop_all(self) -> None:
        """Stop every worker and replica, then every member (each even if another fails)."""
        with contextlib.ExitStack() as stack:
            for member in self.members.values():
                stack.callback(member.stop, kill=True)
            stack.callback(super().stop_all)
            for replica in self.replicas.values():
                if replica.process is not None:
                    stack.callback(stop_server, replica.process, signal.SIGKILL)
