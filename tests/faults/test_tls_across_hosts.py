"""A server and a worker on two hosts (network namespaces joined by a bridge), over mTLS.

The worker reaches the server by its non-loopback address, which the server's certificate
carries as an IP subject alternative name; the test's client does too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from floxide_grpc._certs import make_authority
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from floxide_grpc.tls import ENV, Tls
from tests.faults.cluster import SERVER_PORT, Cluster
from tests.helpers import eventually
from tests.helpers.hosts import Hosts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with Hosts() as made:
        yield made


async def test_a_worker_on_another_host_reaches_the_server_over_mtls_by_its_address(
    tmp_path: Path, hosts: Hosts
) -> None:
    cluster = Cluster.start(tmp_path, hosts)  # from the loop's thread, which outlives etcd
    try:
        address = hosts.host("s1").address
        ca = make_authority(tmp_path / "pki")
        server = ca.issue("s1", hosts=[address])
        client = ca.issue("w1", client=True)
        cluster.start_replica(
            "s1",
            ("--tls-cert", str(server.cert), "--tls-key", str(server.key),
             "--tls-client-ca", str(ca.cert)),
        )  # fmt: skip
        target = f"{address}:{SERVER_PORT}"
        env = {ENV["ca"]: str(ca.cert), ENV["cert"]: str(client.cert), ENV["key"]: str(client.key)}
        cluster.start_worker("w1", target, env=env, on=hosts.host("w1"))
        cluster.release()  # the chain's held step goes straight on
        tls = Tls(ca=ca.cert, cert=client.cert, key=client.key)
        async with OrchestratorClient(
            target, namespace=cluster.namespace, tls=tls, retries=20
        ) as orchestrator:
            [worker] = await eventually(orchestrator.workers, within=30)  # it registered too
            run, _ = await orchestrator.start_run("fault_chain", 1)
            final = await orchestrator.wait_for_completion(run.run_id, timeout=60)
        assert (final.status, final.output) == (RunStatus.COMPLETED, 25), final.error
        assert worker.worker_id == "w1"
        replica_log = (tmp_path / "ready-s1.log").read_text()
        assert "TLS, client certificates required" in replica_log
    finally:
        cluster.stop_all()
