"""Errors cross the wire intact: the server names each error's class in a google.rpc.ErrorInfo,
and the client rebuilds that exact class with its fields, as the local runner raises it."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from floxide_worker import Worker, WorkerConfig
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from floxide_grpc import (
    AlreadyCompleted,
    FloxideError,
    InvalidArgument,
    NotFound,
    NotStarted,
    ResourceExhausted,
    RetryPolicy,
    RunFailed,
    RunNotFound,
    Workflow,
    WorkflowNotFound,
    node,
)
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2 as pb
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2_grpc
from floxide_grpc._status import DOMAIN, error_from_rpc, trailing_metadata
from floxide_grpc.errors import StatusCode
from tests.conftest import Stack, run_to_completion
from tests.e2e.test_polyglot import NODE_DIR, node_binary
from tests.helpers.channels import authorized_channel

REPO = NODE_DIR.parents[1]


@node
def single(x: int) -> int:
    return x


SINGLE = Workflow("single", start=single)


@node(retry=RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=10), jitter=False))
def brittle(x: int) -> int:
    raise ValueError(f"cannot take {x}")


BRITTLE = Workflow("brittle", start=brittle)


def every_error() -> list[FloxideError]:
    """One instance of each class, its fields set."""
    special: dict[type[FloxideError], FloxideError] = {
        RunFailed: RunFailed(
            "run failed", node="n", kind="TIMEOUT", attempts=3, details="trace", run_id="r"
        )
    }
    return [
        special.get(cls) or cls(f"a {cls.__name__}", run_id="r")
        for cls in FloxideError.by_reason.values()
    ]


@pytest.mark.parametrize("error", every_error(), ids=lambda e: e.reason)
def test_each_class_and_its_fields_survive_the_trailer(error: FloxideError) -> None:
    code = grpc.StatusCode.__members__[error.code.name]
    rpc_error = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing_metadata(error)), str(error)
    )
    back = error_from_rpc(rpc_error)
    assert type(back) is type(error)
    assert (str(back), back.code, back.metadata()) == (str(error), error.code, error.metadata())


def test_reasons_are_distinct_upper_snake_names_each_listed_in_the_protocol_doc(
    repo_root: Path,
) -> None:
    doc = (repo_root / "docs" / "protocol.md").read_text()
    for reason, cls in FloxideError.by_reason.items():
        assert reason.isupper() and " " not in reason
        assert f"| `{reason}` | {cls.code.name} |" in doc, reason


def test_a_status_without_our_error_info_becomes_the_class_of_its_code() -> None:
    plain = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
    )
    error = error_from_rpc(plain)
    assert type(error) is NotFound and str(error) == "gone"
    odd = grpc.aio.AioRpcError(
        grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(), grpc.aio.Metadata(), "lost"
    )
    assert type(error_from_rpc(odd)) is FloxideError
    assert error_from_rpc(odd).code is StatusCode.DATA_LOSS


async def test_the_server_sends_reason_domain_and_fields_in_the_status_details(
    stack: Stack,
) -> None:
    async with authorized_channel(stack.target) as channel:
        stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRun(pb.GetRunRequest(namespace=stack.namespace, run_id="nothing"))
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "RUN_NOT_FOUND",
        DOMAIN,
        {"run_id": "nothing"},
    )


async def test_each_refusal_of_the_client_raises_its_exact_class(stack: Stack) -> None:
    client = stack.client
    with pytest.raises(WorkflowNotFound):
        await client.get_workflow("nowhere")
    with pytest.raises(WorkflowNotFound):
        await client.start_run("nowhere", 1)
    with pytest.raises(RunNotFound) as unknown:
        await client.get_run("nothing")
    assert unknown.value.run_id == "nothing"
    with pytest.raises(NotStarted) as unstarted:
        await client.resume_run("nothing")
    assert unstarted.value.run_id == "nothing"
    await client.register_workflow(SINGLE)
    with pytest.raises(ResourceExhausted):
        await client.start_run("single", "x" * 4096)
    with pytest.raises(InvalidArgument):
        await client.start_run("single", "not an int")
    run, _ = await client.start_run("single", 1)
    await run_to_completion(stack, run.run_id, [1])
    with pytest.raises(AlreadyCompleted, match="already completed") as completed:
        await client.resume_run(run.run_id)
    assert completed.value.run_id == run.run_id


async def test_a_remote_run_failed_names_its_node_kind_attempts_and_trace_as_the_local_one(
    stack: Stack,
) -> None:
    with pytest.raises(RunFailed) as local:
        await BRITTLE.run(7)
    config = WorkerConfig(server=stack.target, namespace=stack.namespace)
    async with Worker([BRITTLE], config):
        with pytest.raises(RunFailed) as remote:
            await stack.client.run("brittle", 7, timeout=30)
    fields = ("node", "kind", "attempts")
    assert [getattr(remote.value, f) for f in fields] == [getattr(local.value, f) for f in fields]
    assert [getattr(remote.value, f) for f in fields] == ["brittle", "GENERIC", 2]
    assert remote.value.run_id and "ValueError: cannot take 7" in remote.value.details
    assert "Traceback" in remote.value.details and "Traceback" in local.value.details
    assert str(remote.value).endswith("node 'brittle' attempt 2: ValueError: cannot take 7")
    assert str(local.value).endswith("node 'brittle' attempt 2: ValueError: cannot take 7")


async def test_a_nodejs_client_reads_the_reason_and_fields(stack: Stack) -> None:
    # A process of its own, awaited: the server serves on this test's loop.
    done = await asyncio.create_subprocess_exec(
        node_binary(),
        "tests/e2e/error_info.js",
        stack.target,
        stack.namespace,
        "nothing",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await done.communicate()
    assert done.returncode == 0, stderr.decode()
    assert json.loads(stdout) == {
        "code": grpc.StatusCode.NOT_FOUND.value[0],
        "message": f"run 'nothing' not found in namespace {stack.namespace!r}",
        "reason": "RUN_NOT_FOUND",
        "metadata": {"run_id": "nothing"},
    }
