"""A run's context in the store: its initial value and each step's operations, folded in order.

No key is rewritten by every step (DESIGN section 5): a step's operations go under a key of its
own, written in its completing Txn, and the context is their fold, in commit order, over the
initial value. This module owns how operations are stored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc.context import Operation, apply
from floxide_server._proto.floxide.storage.v1 import storage_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KeyValue, Put
from floxide_server.store.workflows import Definition

__all__ = ["fold", "payload", "record_operations"]


def record_operations(
    keys: Keys,
    run_id: str,
    item_id: str,
    operations: Sequence[work_item_pb2.ContextOperation],
    attempt: int = 0,
) -> Put:
    """The write that records a step's context operations (or a client's, under ``ext-…``).

    Written once, with the step's completion (or guarded by its absence): folded in order.
    """
    stored = storage_pb2.ContextOperationsRecord(
        run_id=run_id, item_id=item_id, attempt=attempt, operations=operations
    )
    return Put(keys.context_ops(run_id, item_id), stored.SerializeToString())


def fold(definition: Definition, init: KeyValue | None, ops: Sequence[KeyValue]) -> dict[str, Any]:
    """A run's context: its initial value and every item's operations, in commit order."""
    context: dict[str, Any] = json.loads(init.value) if init is not None else {}
    for kv in sorted(ops, key=lambda kv: kv.mod_revision):
        stored = storage_pb2.ContextOperationsRecord.FromString(kv.value)
        apply(
            context,
            [Operation.from_proto(op) for op in stored.operations],
            definition.context,
        )
    return context


def payload(context: dict[str, Any]) -> work_item_pb2.Payload:
    """A context as the JSON payload an assignment carries."""
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON,
        data=json.dumps(context, separators=(",", ":")).encode(),
    )
