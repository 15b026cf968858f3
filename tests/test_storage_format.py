"""The storage messages of format 1 read what the server stored before them, byte for byte."""

from __future__ import annotations

from floxide_server._proto.floxide.storage.v1 import storage_pb2

from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, work_item_pb2, worker_service_pb2


def _operation() -> work_item_pb2.ContextOperation:
    return work_item_pb2.ContextOperation(
        field="seen",
        strategy=work_item_pb2.MERGE_STRATEGY_EVENT_LOG,
        value=work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"1"),
        event_id="e1",
    )


def test_context_operations_records_read_as_step_results_stored_them() -> None:
    for before, now in [
        (  # a step's operations
            worker_service_pb2.StepResult(
                run_id="r", item_id="i", attempt=3, context_operations=[_operation()]
            ),
            storage_pb2.ContextOperationsRecord(
                run_id="r", item_id="i", attempt=3, operations=[_operation()]
            ),
        ),
        (  # operations applied through the store services
            worker_service_pb2.StepResult(run_id="r", context_operations=[_operation()]),
            storage_pb2.ContextOperationsRecord(run_id="r", operations=[_operation()]),
        ),
    ]:
        assert before.SerializeToString() == now.SerializeToString()
        assert storage_pb2.ContextOperationsRecord.FromString(before.SerializeToString()) == now


def test_expansion_records_read_as_checkpoints_stored_them() -> None:
    items = [
        work_item_pb2.WorkItem(namespace="default", run_id="r", item_id=f"i{n}", node="branch")
        for n in range(3)
    ]
    before = checkpoint_pb2.Checkpoint(namespace="default", run_id="r", pending=items)
    now = storage_pb2.ExpansionRecord(namespace="default", run_id="r", items=items)
    assert before.SerializeToString() == now.SerializeToString()
    assert storage_pb2.ExpansionRecord.FromString(before.SerializeToString()) == now
