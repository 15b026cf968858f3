"""Tokens, roles and namespaces: who may do what, on every RPC group and on the worker stream.

Each role is tried against each group of RPCs, its expected answers written out here from the
table in docs/protocol.md (not read from the server's own table). A call that a role may make
may still fail for its own reasons (an unknown run: NOT_FOUND); what is asserted is whether it
got past the door (PERMISSION_DENIED or not).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import (
    FloxideError,
    NodeContext,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Workflow,
    node,
)
from floxide_grpc._proto.floxide.v1 import store_service_pb2 as store_pb
from floxide_grpc._proto.floxide.v1 import store_service_pb2_grpc
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.records import RunStatus
from tests.conftest import Stack
from tests.e2e.test_polyglot import NODE_DIR, node_binary
from tests.helpers import ADMIN_TOKEN, eventually, start_server, stop_server
from tests.helpers.channels import authorized_channel

pytestmark = pytest.mark.timeout(120)

SEEN: list[str] = []


@node
def note(ctx: NodeContext, x: int) -> int:
    SEEN.append(ctx.run_id)
    return x + 1


FLOW = Workflow("auth_note", start=note)
UNKNOWN_RUN = "01a213b2-0000-7000-8000-000000000000"

# The groups of RPCs, and which roles may call each (docs/protocol.md, "Tokens and roles").
EXPECTED = {
    "read": {"reader", "client", "operator", "admin"},
    "read workflows": {"reader", "client", "operator", "worker", "admin"},
    "start": {"client", "operator", "admin"},
    "operate": {"operator", "admin"},
    "store write": {"operator", "admin"},
    "store read": {"reader", "client", "operator", "admin"},
    "register": {"worker", "admin"},
    "promote": {"admin"},
    "tokens": {"admin"},
}


def _groups(
    client: OrchestratorClient, target: str, token: str
) -> dict[str, Callable[[], Awaitable[object]]]:
    namespace = client.namespace

    async def store_call(write: bool) -> object:
        async with authorized_channel(target, token) as channel:
            queue = store_service_pb2_grpc.WorkQueueServiceStub(channel)
            if write:
                request = store_pb.EnqueueWorkItemRequest(namespace=namespace)
                return await queue.EnqueueWorkItem(request, timeout=10)
            listing = store_pb.ListQueuedWorkItemsRequest(namespace=namespace)
            return await queue.ListQueuedWorkItems(listing, timeout=10)

    return {
        "read": lambda: client.get_run(UNKNOWN_RUN),
        "read workflows": client.list_workflows,
        "start": lambda: client.start_run("auth_note", 1),
        "operate": lambda: client.cancel_run(UNKNOWN_RUN),
        "store write": lambda: store_call(write=True),
        "store read": lambda: store_call(write=False),
        "register": lambda: client.register_workflow(FLOW),
        "promote": lambda: client.promote_workflow("auth_note", "0" * 16),
        "tokens": client.tokens,
    }


async def _admitted(call: Callable[[], Awaitable[object]]) -> bool:
    """Whether the call got past the door: anything but PERMISSION_DENIED."""
    try:
        await call()
    except PermissionDenied:
        return False
    except Unauthenticated:
        raise  # the token itself was refused: not what this asks
    except grpc.aio.AioRpcError as exc:  # a raw stub's call
        assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, exc
        return exc.code() != grpc.StatusCode.PERMISSION_DENIED
    except FloxideError:
        pass  # its own answer: NOT_FOUND, INVALID_ARGUMENT, ...
    return True


@pytest.mark.parametrize("role", ["reader", "client", "operator", "worker", "admin"])
async def test_auth_each_role_against_every_rpc_group(stack: Stack, role: str) -> None:
    await stack.client.register_workflow(FLOW)
    allow = [] if role == "admin" else [stack.namespace]
    token, info = await stack.client.create_token(f"{role} of tests", role, allow)
    assert info.role.value == role and token not in repr(info)
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as client:
        groups = _groups(client, stack.target, token)
        admitted = {name: await _admitted(call) for name, call in groups.items()}
    assert {g for g, ok in admitted.items() if ok} == {
        g for g, roles in EXPECTED.items() if role in roles
    }


async def test_auth_a_request_naming_another_namespace_is_permission_denied(
    stack: Stack,
) -> None:
    token, _ = await stack.client.create_token("client of A", "client", [stack.namespace])
    async with OrchestratorClient(
        stack.target, namespace=f"other-{uuid.uuid4().hex[:6]}", token=token, retries=0
    ) as elsewhere:
        with pytest.raises(PermissionDenied, match="may not act in namespace"):
            await elsewhere.list_runs()


async def test_auth_a_guessed_run_id_of_another_namespace_is_not_found(stack: Stack) -> None:
    other = f"other-{uuid.uuid4().hex[:6]}"
    async with OrchestratorClient(stack.target, namespace=other, retries=0) as admin_of_b:
        await admin_of_b.register_workflow(FLOW)
        theirs, _ = await admin_of_b.start_run("auth_note", 1)
    token, _ = await stack.client.create_token("reader of A", "reader", [stack.namespace])
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as reader:
        with pytest.raises(NotFound):
            await reader.get_run(theirs.run_id)  # exists, in B: not found in A
        with pytest.raises(NotFound):
            await reader.get_run(UNKNOWN_RUN)  # the same answer as for no run at all


@pytest.mark.parametrize("token", ["", "fxt_not-a-token", "Bearer"])
async def test_auth_a_missing_or_wrong_token_is_unauthenticated(stack: Stack, token: str) -> None:
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as client:
        with pytest.raises(Unauthenticated):
            await client.list_runs()


async def test_auth_an_expired_token_is_unauthenticated(stack: Stack) -> None:
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=4)
    token, info = await stack.client.create_token(
        "short", "reader", [stack.namespace], expires_at=expires
    )
    assert info.expires_at is not None
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as client:
        await client.list_runs()  # in force now

        async def refused() -> bool:
            try:
                await client.list_runs()
            except Unauthenticated as exc:
                return "expired" in str(exc)
            return False

        assert await eventually(refused, within=20)


async def test_auth_a_worker_token_of_one_namespace_cannot_serve_another(stack: Stack) -> None:
    token, _ = await stack.client.create_token("worker of A", "worker", [stack.namespace])
    elsewhere = f"other-{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(server=stack.target, namespace=elsewhere, token=token)
    with pytest.raises(FloxideError) as refused:
        await asyncio.wait_for(Worker([FLOW], config).run(), 30)
    assert refused.value.code.name == "PERMISSION_DENIED"


async def test_auth_a_worker_of_namespace_a_never_gets_bs_items(stack: Stack) -> None:
    other = f"other-{uuid.uuid4().hex[:6]}"
    worker_a, _ = await stack.client.create_token("worker of A", "worker", [stack.namespace])
    SEEN.clear()
    async with OrchestratorClient(stack.target, namespace=other, retries=0) as admin_of_b:
        await admin_of_b.register_workflow(FLOW)
        await stack.client.register_workflow(FLOW)
        theirs = [(await admin_of_b.start_run("auth_note", n))[0].run_id for n in range(5)]
        config = WorkerConfig(server=stack.target, namespace=stack.namespace, token=worker_a)
        async with Worker([FLOW], config):
            ours = [(await stack.client.start_run("auth_note", n))[0].run_id for n in range(5)]
            for run_id in ours:
                final = await stack.client.wait_for_completion(run_id, timeout=30)
                assert final.status is RunStatus.COMPLETED
        assert set(SEEN) == set(ours) and not set(SEEN) & set(theirs)
        statuses = [(await admin_of_b.get_run(r)).status for r in theirs]
        assert statuses == [RunStatus.RUNNING] * len(theirs)  # B's: never run by A's worker


async def test_auth_revoking_a_token_ends_its_open_worker_stream_within_5_s(
    stack: Stack,
) -> None:
    token, info = await stack.client.create_token("worker", "worker", [stack.namespace])
    worker = Worker(
        [FLOW], WorkerConfig(server=stack.target, namespace=stack.namespace, token=token)
    )
    serving = asyncio.create_task(worker.run())
    try:
        await eventually(stack.client.workers, within=30)
        assert await stack.client.revoke_token(info.id)
        with pytest.raises(FloxideError) as ended:
            await asyncio.wait_for(asyncio.shield(serving), 5)
        assert ended.value.code.name == "UNAUTHENTICATED"
        assert not await stack.client.revoke_token(info.id)  # gone: found=False
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_auth_every_write_has_an_audit_line_naming_the_token_not_its_secret(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="floxide_server.audit")
    token, info = await stack.client.create_token("auditor", "client", [stack.namespace])
    await stack.client.register_workflow(FLOW)
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as client:
        await client.start_run("auth_note", 1)
        with pytest.raises(PermissionDenied):
            await client.cancel_run(UNKNOWN_RUN)
        await client.list_runs()
    lines = [r.getMessage() for r in caplog.records if r.name == "floxide_server.audit"]
    assert any(
        f"token={info.id}" in line and "method=StartRun" in line and "outcome=OK" in line
        for line in lines
    ), lines
    assert any(f"token={info.id}" in line and "outcome=PERMISSION_DENIED" in line for line in lines)
    assert any("CreateToken" in line for line in lines)
    assert not any(token in line or ADMIN_TOKEN in line for line in lines)
    assert not any("method=ListRuns" in line for line in lines)  # reads are not audited


async def test_auth_two_replicas_on_an_empty_store_make_one_first_admin_token(
    own_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    starts = [
        asyncio.to_thread(
            start_server,
            "--etcd",
            own_etcd.endpoint,
            "--server-id",
            f"r{n}",
            ready_file=str(tmp_path / f"ready-{n}"),
            unset=("FLOXIDE_ADMIN_TOKEN",),  # none given: the first start makes one
        )
        for n in (1, 2)
    ]
    started = await asyncio.gather(*starts)
    try:
        logs = [(tmp_path / f"ready-{n}.log").read_text() for n in (1, 2)]
        printed = [
            line for log in logs for line in log.splitlines() if "export FLOXIDE_TOKEN=" in line
        ]
        assert len(printed) == 1, logs
        token = printed[0].split("export FLOXIDE_TOKEN=", 1)[1].strip()
        async with OrchestratorClient(started[1][1], token=token, retries=5) as admin:
            [only] = await admin.tokens()
        assert only.role.value == "admin"
        assert "".join(logs).count(token) == 2  # the two lines that show it, and nowhere else
    finally:
        for process, _ in started:
            stop_server(process, 15)


def test_auth_off_is_refused_off_loopback() -> None:
    command = [
        str(Path(sys.executable).parent / "floxide-server"),
        *("--host", "0.0.0.0", "--insecure", "--auth", "off", "--etcd", "127.0.0.1:1"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "loopback only" in done.stderr


async def test_auth_the_nodejs_client_and_worker_call_with_a_token(stack: Stack) -> None:
    async def node_run(token: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLOXIDE_TOKEN": token}
        command = [node_binary(), "examples/client_run.js", stack.target, stack.namespace, '"t"']
        return await asyncio.to_thread(
            subprocess.run, command, cwd=NODE_DIR, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    token, _ = await stack.client.create_token("node", "admin")
    done = await node_run(token)
    assert done.returncode == 0 and done.stdout.strip() == '"hello, t"', done.stderr
    refused = await node_run("fxt_wrong")
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr.upper()


async def test_auth_an_empty_namespace_is_the_default_namespace(stack: Stack) -> None:
    token, _ = await stack.client.create_token("default reader", "reader", ["default"])
    async with OrchestratorClient(stack.target, namespace="", token=token, retries=0) as client:
        await client.list_runs()  # "" names "default", as everywhere else


async def test_auth_a_checkpoint_names_its_namespace_inside_and_is_checked_there(
    stack: Stack,
) -> None:
    """Found by the fuzzer: SaveCheckpoint names its namespace in the checkpoint itself."""
    from floxide_grpc._proto.floxide.v1 import checkpoint_pb2  # noqa: PLC0415

    token, _ = await stack.client.create_token("operator of A", "operator", [stack.namespace])
    elsewhere = f"other-{uuid.uuid4().hex[:6]}"
    checkpoint = checkpoint_pb2.Checkpoint(namespace=elsewhere, run_id=UNKNOWN_RUN)
    async with authorized_channel(stack.target, token) as channel:
        stub = store_service_pb2_grpc.CheckpointStoreServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SaveCheckpoint(store_pb.SaveCheckpointRequest(checkpoint=checkpoint))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_auth_revoking_a_token_ends_its_open_watch(stack: Stack) -> None:
    await stack.client.register_workflow(FLOW)
    run, _ = await stack.client.start_run("auth_note", 1)  # nobody serves it: it stays running
    token, info = await stack.client.create_token("watcher", "reader", [stack.namespace])
    async with OrchestratorClient(
        stack.target, namespace=stack.namespace, token=token, retries=0
    ) as reader:
        watch = reader.watch_run(run.run_id)
        assert (await anext(watch)).status is RunStatus.RUNNING  # the watch is open
        assert await stack.client.revoke_token(info.id)
        with pytest.raises(Unauthenticated, match="revoked"):
            await asyncio.wait_for(anext(watch), 5)


async def test_auth_an_audit_line_cannot_be_forged_through_a_namespace(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="floxide_server.audit")
    forged = "x\nfloxide_server.audit: audit token=0000 role=admin method=CreateToken outcome=OK"
    async with OrchestratorClient(stack.target, namespace=forged, token="", retries=0) as nobody:
        with pytest.raises(Unauthenticated):
            await nobody.start_run("auth_note", 1)
    [line] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "floxide_server.audit" and "method=StartRun" in r.getMessage()
    ]
    assert "\n" not in line and "namespace=(invalid)" in line and "outcome=UNAUTHENTICATED" in line
