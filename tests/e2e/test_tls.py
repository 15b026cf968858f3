"""TLS on the server's port, over real sockets, with certificates the tests make.

TLS, mTLS with a good client certificate, none, and one from another CA; a client that trusts
another CA; a certificate rotated while a worker's stream stays open; plain text refused off
loopback unless asked for; the Node.js client and worker over mTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from floxide_server.app import ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.tls import ServerTls, is_loopback
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Unavailable, Workflow, node
from floxide_grpc._certs import Authority, Issued, make_authority
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from floxide_grpc.tls import ENV, Tls
from tests.e2e.test_polyglot import NODE_DIR, node_binary
from tests.helpers import eventually, serving

pytestmark = pytest.mark.timeout(120)


@node
def double(x: int) -> int:
    return x * 2


FLOW = Workflow("tls_double", start=double)


@dataclass
class Pki:
    """A CA with a server and a client certificate, and another CA with its own client's."""

    ca: Authority
    server: Issued
    client: Issued
    other: Authority
    stranger: Issued

    def tls(self, *, client: Issued | None = None, ca: Authority | None = None) -> Tls:
        chosen = client
        return Tls(
            ca=(ca or self.ca).cert,
            cert=chosen.cert if chosen else None,
            key=chosen.key if chosen else None,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = make_authority(root / "ca")
    other = make_authority(root / "other", "another CA")
    return Pki(
        ca,
        ca.issue("server", hosts=["localhost", "127.0.0.1"]),
        ca.issue("client", client=True),
        other,
        other.issue("stranger", client=True),
    )


@contextlib.asynccontextmanager
async def _serve(etcd: EmbeddedEtcd, tls: ServerTls) -> AsyncIterator[str]:
    async with serving([etcd.endpoint], ServerConfig(port=0, tls=tls)) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture
async def tls_server(etcd: EmbeddedEtcd, pki: Pki) -> AsyncIterator[str]:
    async with _serve(etcd, ServerTls(pki.server.cert, pki.server.key)) as target:
        yield target


@pytest.fixture
async def mtls_server(etcd: EmbeddedEtcd, pki: Pki) -> AsyncIterator[str]:
    async with _serve(etcd, ServerTls(pki.server.cert, pki.server.key, pki.ca.cert)) as target:
        yield target


async def _runs(target: str, tls: Tls, worker_tls: Tls | None = None) -> None:
    """A worker and a client over ``tls``: a run completes."""
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(server=target, namespace=namespace, slots=2, tls=worker_tls or tls)
    async with (
        Worker([FLOW], config),
        OrchestratorClient(target, namespace=namespace, tls=tls, retries=20) as client,
    ):
        run, _ = await client.start_run("tls_double", 21)
        final = await client.wait_for_completion(run.run_id, timeout=60)
    assert (final.status, final.output) == (RunStatus.COMPLETED, 42)


async def _refused(target: str, tls: Tls | None) -> Unavailable:
    async with OrchestratorClient(target, tls=tls, retries=0, timeout=5) as client:
        with pytest.raises(Unavailable) as caught:
            await client.workers()
    return caught.value


async def test_over_tls_a_worker_and_a_client_run_a_workflow(tls_server: str, pki: Pki) -> None:
    await _runs(tls_server, pki.tls())


async def test_a_client_that_trusts_another_ca_is_refused_with_a_clear_message(
    tls_server: str, pki: Pki
) -> None:
    error = await _refused(tls_server, pki.tls(ca=pki.other))
    assert "TLS" in str(error) and "--tls-ca" in str(error), str(error)


async def test_a_plain_text_client_of_a_tls_port_is_refused(tls_server: str) -> None:
    await _refused(tls_server, None)


async def test_mtls_with_a_good_client_certificate_runs_a_workflow(
    mtls_server: str, pki: Pki
) -> None:
    await _runs(mtls_server, pki.tls(client=pki.client))


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_mtls_refuses_a_client_without_a_certificate_of_its_ca(
    mtls_server: str, pki: Pki, who: str
) -> None:
    client = pki.stranger if who == "another CA's certificate" else None
    error = await _refused(mtls_server, pki.tls(client=client))
    assert "TLS" in str(error), str(error)


def _served_serial(target: str, ca: Path) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial(issued: Issued) -> int:
    return x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number


async def test_a_rotated_certificate_is_served_to_new_connections_and_open_streams_stay(
    etcd: EmbeddedEtcd, pki: Pki, tmp_path: Path
) -> None:
    rotating = Authority(tmp_path)  # the server's files, in a folder of this test's
    rotating.cert.write_bytes(pki.ca.cert.read_bytes())
    rotating.key.write_bytes(pki.ca.key.read_bytes())
    first = rotating.issue("server", hosts=["127.0.0.1"])
    first_serial = _serial(first)
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    async with _serve(etcd, ServerTls(first.cert, first.key)) as target:
        config = WorkerConfig(server=target, namespace=namespace, slots=2, tls=pki.tls())
        async with (
            Worker([FLOW], config),
            OrchestratorClient(target, namespace=namespace, tls=pki.tls(), retries=20) as client,
        ):
            [session] = await eventually(client.workers)
            assert await asyncio.to_thread(_served_serial, target, pki.ca.cert) == first_serial
            second = _serial(rotating.issue("server", hosts=["127.0.0.1"]))  # the same files
            assert second != first_serial
            assert await asyncio.to_thread(_served_serial, target, pki.ca.cert) == second
            run, _ = await client.start_run("tls_double", 5)
            final = await client.wait_for_completion(run.run_id, timeout=60)
            assert (final.status, final.output) == (RunStatus.COMPLETED, 10)
            [still] = await client.workers()
            assert (still.session_id, still.liveness) == (session.session_id, "alive")


def _server_says(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "floxide-server"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_plain_text_off_loopback_is_refused_unless_asked_for() -> None:
    refused = _server_says("--host", "0.0.0.0", "--port", "0", "--etcd", "127.0.0.1:1")
    assert refused.returncode == 2
    assert "--insecure" in refused.stderr and "plain text" in refused.stderr


def test_a_certificate_without_its_key_is_refused(pki: Pki) -> None:
    refused = _server_says("--tls-cert", str(pki.server.cert), "--etcd", "127.0.0.1:1")
    assert refused.returncode == 2
    assert "--tls-key" in refused.stderr


async def test_the_nodejs_client_and_worker_run_over_mtls(mtls_server: str, pki: Pki) -> None:
    env = {
        **os.environ,
        ENV["ca"]: str(pki.ca.cert),
        ENV["cert"]: str(pki.client.cert),
        ENV["key"]: str(pki.client.key),
    }
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    command = [node_binary(), "examples/client_run.js", mtls_server, namespace, '"tls"']
    done = await asyncio.to_thread(
        subprocess.run, command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '"hello, tls"'


def _floxide(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "floxide"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_floxide_certs_makes_a_ca_a_server_and_a_client_certificate(tmp_path: Path) -> None:
    made = _floxide("certs", str(tmp_path), "--host", "10.1.2.3", "--host", "floxide.internal")
    assert made.returncode == 0, made.stderr
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
        "10.1.2.3",
        "127.0.0.1",
    }
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "floxide.internal"}
    client = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o077 == 0  # the CA's key: its owner's


async def test_the_cli_reaches_a_tls_server_with_its_ca_and_says_what_is_missing_without(
    tls_server: str, pki: Pki
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOXIDE_TLS")}
    plain = await asyncio.to_thread(_floxide, "--server", tls_server, "workers", env=env)
    assert plain.returncode == 1 and "--tls-ca" in plain.stderr, plain.stderr
    with_ca = {**env, ENV["ca"]: str(pki.ca.cert)}
    done = await asyncio.to_thread(_floxide, "--server", tls_server, "workers", env=with_ca)
    assert done.returncode == 0, done.stderr


def test_a_certificate_and_a_key_that_do_not_match_are_refused_at_start(pki: Pki) -> None:
    refused = _server_says(
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key),
        "--etcd", "127.0.0.1:1",
    )  # fmt: skip
    assert refused.returncode == 2
    assert "TLS files do not load" in refused.stderr


async def test_a_server_name_the_certificate_does_not_carry_says_which_option(
    tls_server: str, pki: Pki
) -> None:
    wrong = Tls(ca=pki.ca.cert, server_name="not-in-the-certificate.example")
    error = await _refused(tls_server, wrong)
    assert "--tls-server-name" in str(error), str(error)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("[::]", False),
     ("LOCALHOST", False), ("example.com", False), ("10.0.0.5", False)],
)  # fmt: skip
def test_plain_text_is_the_default_only_on_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_a_client_whose_files_rotate_keeps_its_open_watch(
    tls_server: str, pki: Pki, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.cert.read_bytes())
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    async with OrchestratorClient(
        tls_server, namespace=namespace, tls=Tls(ca=ca), retries=5
    ) as client:
        await client.register_workflow(FLOW)
        run, _ = await client.start_run("tls_double", 4)
        watch = client.watch_run(run.run_id)
        first = await anext(watch)  # the watch is open, on the first channel
        assert first.status is RunStatus.RUNNING
        os.utime(ca, (ca.stat().st_atime, ca.stat().st_mtime + 10))  # rotated (same CA)
        client._reconnect_if_rotated()  # what a call that met UNAVAILABLE does
        assert len(client._retired) == 1
        config = WorkerConfig(server=tls_server, namespace=namespace, tls=pki.tls())
        async with Worker([FLOW], config):
            final = [update async for update in watch][-1]  # the old channel saw the end
        assert final.output == 8
        assert await client.workers() == []  # the new channel serves calls


def test_floxide_certs_keeps_its_ca_unless_asked_for_a_new_one(tmp_path: Path) -> None:
    assert _floxide("certs", str(tmp_path)).returncode == 0
    first = (tmp_path / "ca.pem").read_bytes()
    assert _floxide("certs", str(tmp_path), "--host", "10.9.9.9").returncode == 0
    assert (tmp_path / "ca.pem").read_bytes() == first  # the same CA signed the new ones
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(first))
    assert _floxide("certs", str(tmp_path), "--new-ca").returncode == 0
    assert (tmp_path / "ca.pem").read_bytes() != first
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
