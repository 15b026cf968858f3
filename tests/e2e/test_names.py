"""One rule for names, one for keys: over a real socket, against a real etcd.

Names (namespaces, workflows, nodes, route labels) are 1 to 128 ASCII letters, digits, ``_``,
``.`` and ``-``; keys (idempotency keys, request ids) are 1 to 256 bytes of UTF-8 without
control characters. Anything else is INVALID_ARGUMENT naming the field and the rule, and
changes nothing. Requests are sent with the raw stubs: no client-side check stands between.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from floxide_grpc import Workflow, node
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2 as pb,
)
from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2_grpc,
    store_service_pb2,
    store_service_pb2_grpc,
    work_item_pb2,
    workflow_pb2,
)
from tests.conftest import Stack
from tests.helpers.channels import authorized_channel


@node
def single(x: int) -> int:
    return x


SINGLE = Workflow("single", start=single)
NAME_RULE = "a name is 1 to 128 ASCII letters, digits, '_', '.' and '-'"
KEY_RULE = "a key is 1 to 256 bytes of UTF-8 without control characters"


def js(value: object) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode()
    )


@pytest.fixture
async def stubs(
    stack: Stack,
) -> AsyncIterator[tuple[Any, Any]]:
    async with authorized_channel(stack.target) as channel:
        yield (
            orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel),
            store_service_pb2_grpc.WorkQueueServiceStub(channel),
        )


async def refused(call: Any, field: str, rule: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    details = raised.value.details() or ""
    assert field in details and rule in details, details


@pytest.mark.parametrize("bad", ["a:b", "a b", "ñ", "x" * 129, "a/b", "single\n"])
async def test_a_name_outside_the_rule_is_refused_naming_the_field(
    stack: Stack,
    stubs: tuple[Any, Any],
    bad: str,
) -> None:
    orchestrator, _ = stubs
    definition = SINGLE.definition()
    await refused(
        orchestrator.RegisterWorkflow(
            pb.RegisterWorkflowRequest(namespace=bad, definition=definition)
        ),
        "namespace",
        NAME_RULE,
    )
    named = workflow_pb2.WorkflowDefinition()
    named.CopyFrom(definition)
    named.name = bad
    await refused(
        orchestrator.RegisterWorkflow(
            pb.RegisterWorkflowRequest(namespace=stack.namespace, definition=named)
        ),
        "workflow name",
        NAME_RULE,
    )
    renamed = workflow_pb2.WorkflowDefinition()
    renamed.CopyFrom(definition)
    renamed.nodes[0].name = bad
    renamed.start = bad
    await refused(
        orchestrator.RegisterWorkflow(
            pb.RegisterWorkflowRequest(namespace=stack.namespace, definition=renamed)
        ),
        "node name",
        NAME_RULE,
    )
    routed = workflow_pb2.WorkflowDefinition()
    routed.CopyFrom(definition)
    routed.nodes[0].routes.append(bad)
    routed.edges.append(
        workflow_pb2.Edge(source="single", kind=workflow_pb2.EDGE_KIND_ROUTED, route=bad)
    )
    await refused(
        orchestrator.RegisterWorkflow(
            pb.RegisterWorkflowRequest(namespace=stack.namespace, definition=routed)
        ),
        "route",
        NAME_RULE,
    )
    await refused(
        orchestrator.StartRun(
            pb.StartRunRequest(namespace=stack.namespace, workflow=bad, input=js(1))
        ),
        "workflow",
        NAME_RULE,
    )
    listed = await orchestrator.ListWorkflows(pb.ListWorkflowsRequest(namespace=stack.namespace))
    assert list(listed.workflows) == []  # nothing was registered


async def test_keys_take_any_utf8_without_control_characters(
    stack: Stack, stubs: tuple[Any, Any]
) -> None:
    orchestrator, store = stubs
    await stack.client.register_workflow(SINGLE)

    def start(key: str) -> Any:
        return orchestrator.StartRun(
            pb.StartRunRequest(
                namespace=stack.namespace, workflow="single", input=js(1), idempotency_key=key
            )
        )

    for good in ("a/b c", "ñandú", "ключ:1", "x" * 256):
        first = await start(good)
        again = await start(good)
        assert first.created and not again.created and again.run.run_id == first.run.run_id
        assert first.run.idempotency_key == good
    for bad in ("line\nbreak", "tab\there", "nul\0", "x" * 257, "ñ" * 129):
        await refused(start(bad), "idempotency_key", KEY_RULE)
    run_id = (await start("a/b c")).run.run_id
    enqueue = store.EnqueueWorkItem
    for bad in ("", "new\nline", "x" * 257):
        request = store_service_pb2.EnqueueWorkItemRequest(
            namespace=stack.namespace, run_id=run_id, node="single", input=js(2), request_id=bad
        )
        await refused(enqueue(request), "request_id", KEY_RULE)
    request = store_service_pb2.EnqueueWorkItemRequest(
        namespace=stack.namespace, run_id=run_id, node="single", input=js(2), request_id="ñ / 1"
    )
    assert (await enqueue(request)).created
