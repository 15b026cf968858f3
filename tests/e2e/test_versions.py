"""Which definition is current changes only by a new hash or an explicit promote (real socket).

Registering a definition already known (a v1 worker restarted beside v2) changes nothing; a new
hash becomes current and is logged; an operator promotes an older one (the RPC, or `floxide
workflows promote`), logged. ListWorkflows shows each name's definitions, the current one, when
each was registered and which connected workers serve it; `floxide status` shows the hash a run
is pinned to and says when no connected worker serves its next node.
"""

from __future__ import annotations

import logging

import pytest
from floxide_worker import Worker, WorkerConfig

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2 as pb
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2_grpc
from floxide_grpc.errors import InvalidArgument, NotFound
from tests.conftest import Stack
from tests.e2e.test_cli import floxide
from tests.helpers.channels import authorized_channel


@node
def charge(amount: int) -> int:
    return amount


V1 = Workflow("invoices", start=charge, description="v1")
V2 = Workflow("invoices", start=charge, description="v2: the same step, another definition")
OTHER = Workflow("receipts", start=charge)


async def test_registering_a_known_definition_never_changes_which_is_current(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="floxide_server.store.workflows")
    v1 = await stack.client.register_workflow(V1)
    v2 = await stack.client.register_workflow(V2)
    assert v1 != v2
    new = [r.getMessage() for r in caplog.records if "is current" in r.getMessage()]
    assert len(new) == 2 and v2 in new[1] and v1 in new[1]  # v2 is current, was v1
    caplog.clear()
    assert await stack.client.register_workflow(V1) == v1  # a v1 worker restarted, say
    assert not [r for r in caplog.records if "is current" in r.getMessage()]
    run, _ = await stack.client.start_run("invoices", 5)
    assert run.definition_hash == v2, "the runs go on starting on v2"
    versions = {w.definition_hash: w for w in await stack.client.workflow_versions()}
    assert (versions[v1].current, versions[v2].current) == (False, True)
    assert versions[v1].registered_at and versions[v2].registered_at


async def test_an_older_definition_is_current_again_only_when_promoted(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = await stack.client.register_workflow(V1)
    v2 = await stack.client.register_workflow(V2)
    other = await stack.client.register_workflow(OTHER)
    worker = Worker([V1], WorkerConfig(server=stack.target, namespace=stack.namespace, slots=1))
    async with worker:  # serves v1 by its hash
        listed = {w.definition_hash: w for w in await stack.client.workflow_versions()}
        assert listed[v1].served_by == (worker.config.worker_id,)
        assert listed[v2].served_by == ()
        caplog.set_level(logging.INFO, logger="floxide_server.store.workflows")
        async with authorized_channel(stack.target) as channel:
            stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
            promoted = await stub.PromoteWorkflow(
                pb.PromoteWorkflowRequest(
                    namespace=stack.namespace, name="invoices", definition_hash=v1
                )
            )
        assert (promoted.workflow.definition_hash, promoted.previous_hash) == (v1, v2)
        assert promoted.workflow.current
        assert any("promoted" in r.getMessage() and v1 in r.getMessage() for r in caplog.records)
        run, _ = await stack.client.start_run("invoices", 7)
        assert run.definition_hash == v1
        done = await stack.client.wait_for_completion(run.run_id, 10)
        assert done.output == 7
    with pytest.raises(NotFound):
        await stack.client.promote_workflow("invoices", "sha256:" + "0" * 64)
    with pytest.raises(InvalidArgument, match="definition_hash is required"):
        await stack.client.promote_workflow("invoices", "")
    with pytest.raises(NotFound, match="not of workflow 'invoices'"):
        await stack.client.promote_workflow("invoices", other)
    current = {
        w.name: w.definition_hash for w in await stack.client.workflow_versions() if w.current
    }
    assert current == {"invoices": v1, "receipts": other}  # the refusals changed nothing


async def test_the_cli_lists_and_promotes_and_status_names_the_hash_and_what_waits(
    stack: Stack,
) -> None:
    v1 = await stack.client.register_workflow(V1)
    v2 = await stack.client.register_workflow(V2)
    code, out, err = await floxide(stack, "workflows", "list")
    assert code == 0, err
    assert v1 in out and v2 in out and "current" in out
    code, out, err = await floxide(stack, "workflows", "promote", "invoices", v1)
    assert code == 0 and f"invoices: {v1} is current" in out, err
    code, _, err = await floxide(stack, "workflows", "promote", "invoices", "sha256:nothing")
    assert code == 1 and "error:" in err
    run, _ = await stack.client.start_run("invoices", 1)  # no worker serves it
    code, out, err = await floxide(stack, "status", run.run_id)
    assert code == 0, err
    assert v1 in out
    assert f"waiting: node 'charge' of definition {v1} is served by no connected worker" in out
