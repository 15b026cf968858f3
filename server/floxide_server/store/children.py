"""Starting child runs: the Txn that makes a nested workflow's item ready starts its run instead.

A ``NODE_KIND_SUBWORKFLOW`` item is never queued, so no worker ever claims it. Whichever Txn
makes it ready (its predecessor's step, the run's start, a retry firing, a resume, a wide
fan-out's expansion, an enqueue) writes, in its place (:func:`readied`):

- the item IN_PROGRESS at its attempt, naming its child in ``child_run_id``, still live;
- the child's record, status and initial context, its first item made ready the same way (a
  nested workflow whose start is itself nested starts its own child in the same Txn), its run
  timeout (the node's timeout bounds the child as a whole), and ``run/{parent}/child/{child}``.

The child's id is derived from the parent's run, the item and the attempt
(:func:`floxide_grpc._children.child_run_id`), so a retry starts a new child and a step applied
twice starts none; it is pinned to the hash its parent's definition names for it; it starts
paused under a paused parent. Its context is a copy of the parent's as the Txn sees it: the
caller reads it (:func:`inherited`) and guards that no operation was added since.

Pure, like :mod:`.planning`: what is read is passed in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from floxide_grpc._children import child_run_id
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, workflow_pb2
from floxide_grpc._routing import start_item
from floxide_server.store.contexts import fold
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Op, Put, Request, Target, prefix_end
from floxide_server.store.queue import live, queue_entry
from floxide_server.store.records import PAUSED, RUNNING, fresh_state, stamp, status_name
from floxide_server.store.timers import arm_run_timeout
from floxide_server.store.workflows import Definition

__all__ = ["Inherited", "inherited", "is_nested", "readied", "size", "start", "weight"]

ITEM_OPS = 3
"""Writes that make an ordinary item ready: its state, its queue entry, its live marker."""
CHILD_OPS = 7
"""Writes that start a child besides its first item's: the item, its marker, the child's
record, status, context and link, its run timeout."""


@dataclasses.dataclass(frozen=True)
class Inherited:
    """A run's context as read to start its children, and the guard that it is still that.

    Attributes:
        context: The context (its initial value and every operation, folded).
        guard: Holds while no context operation of the run is written after the read.
    """

    context: dict[str, Any]
    guard: Compare

    @property
    def size(self) -> int:
        """The bytes the context takes as JSON (each child started copies it)."""
        return len(_json(self.context))


async def inherited(kv: KV, keys: Keys, definition: Definition, run_id: str) -> Inherited:
    """Read a run's context now, for the children a Txn is to start."""
    ops_prefix = keys.context_ops(run_id)
    init, (ops, revision) = await asyncio.gather(
        kv.get(keys.context_init(run_id)), kv.range(ops_prefix)
    )
    guard = Compare(ops_prefix, Target.MOD, Op.LESS, revision + 1, prefix_end(ops_prefix))
    return Inherited(fold(definition, init, ops), guard)


def is_nested(definition: Definition, node: str) -> bool:
    """Whether ``node`` runs a nested workflow (its items start child runs)."""
    return definition.graph.node(node).kind == workflow_pb2.NODE_KIND_SUBWORKFLOW


def weight(definition: Definition, node: str) -> int:
    """The writes that make an item of ``node`` ready (a child's first items included)."""
    if not is_nested(definition, node):
        return ITEM_OPS
    nested = definition.child(definition.graph.node(node).subworkflow)
    return CHILD_OPS + weight(nested, nested.definition.start)


def size(definition: Definition, item: work_item_pb2.WorkItem, context: int) -> int:
    """About the bytes making ``item`` ready writes (``context``: what a child run copies).

    An item's input goes into its state and, when small, its queue entry; a child's, into the
    item's state, the child's record and its first item's state, beside the context's copy
    (and again for a nested start's own child).
    """
    return _size(definition, item.node, item.input.ByteSize(), context)


def _size(definition: Definition, node: str, payload: int, context: int) -> int:
    if not is_nested(definition, node):
        return 2 * payload
    nested = definition.child(definition.graph.node(node).subworkflow)
    return 2 * payload + context + _size(nested, nested.definition.start, payload, context)


def readied(
    keys: Keys,
    definition: Definition,
    run: records_pb2.RunRecord,
    state: records_pb2.WorkItemState,
    context: Mapping[str, Any] | None,
    now: int,
    *,
    fresh: bool = False,
) -> list[Request]:
    """The writes that make an item ready (``state`` as it is to be written, updated here).

    An ordinary item: its state, queue entry and live marker (``fresh``: just made, its entry
    may carry its input). A nested workflow's item: its child run started (:func:`start`), from
    ``context``, the parent's.
    """
    if is_nested(definition, state.item.node):
        if context is None:
            raise ValueError(f"item {state.item.item_id!r} starts a child run: context needed")
        return start(keys, definition, run, state, context, now)
    item = state.item
    return [
        Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
        queue_entry(keys, item, fresh=fresh),
        live(keys, item),
    ]


def start(
    keys: Keys,
    definition: Definition,
    run: records_pb2.RunRecord,
    state: records_pb2.WorkItemState,
    context: Mapping[str, Any],
    now: int,
) -> list[Request]:
    """The writes that start the child run of ``state``'s item at its attempt.

    ``state`` is updated: IN_PROGRESS, its attempt used, its child named.
    """
    item = state.item
    node = definition.graph.node(item.node)
    nested = definition.child(node.subworkflow)
    attempt = max(item.attempt, 1)
    child_id = child_run_id(item.run_id, item.item_id, attempt)
    state.status = records_pb2.ITEM_STATUS_IN_PROGRESS
    state.attempts = item.attempt = attempt
    state.child_run_id = child_id
    for field in ("session_id", "worker_id", "retry_at"):
        state.ClearField(field)
    stamp(state, "updated_at", now)
    child = records_pb2.RunRecord(
        namespace=keys.namespace,
        run_id=child_id,
        workflow=nested.definition.name,
        definition_hash=nested.hash,
        status=PAUSED if run.status == PAUSED else RUNNING,
        input=item.input,
        parent=work_item_pb2.ItemRef(
            namespace=keys.namespace, run_id=item.run_id, item_id=item.item_id
        ),
    )
    stamp(child, "created_at", now)
    stamp(child, "updated_at", now)
    own = nested.context.inherit(context)
    writes: list[Request] = [
        Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
        live(keys, item),
        Put(keys.child(item.run_id, child_id), item.item_id.encode()),
        Put(keys.status(child_id), status_name(child.status)),
        Put(keys.context_init(child_id), _json(own)),
    ]
    if node.HasField("timeout"):  # the node's timeout bounds the child run as a whole
        child.run_timeout.CopyFrom(node.timeout)
        writes.append(arm_run_timeout(keys, child_id, node.timeout.ToMilliseconds()))
    writes.append(Put(keys.run_info(child_id), child.SerializeToString()))
    first = start_item(
        nested.definition,
        namespace=keys.namespace,
        run_id=child_id,
        definition_hash=nested.hash,
        input=item.input,
    )
    stamp(first, "created_at", now)
    writes.extend(readied(keys, nested, child, fresh_state(first), own, now, fresh=True))
    return writes


def children_of(definition: Definition, items: Sequence[work_item_pb2.WorkItem]) -> int:
    """How many of ``items`` start child runs."""
    return sum(is_nested(definition, item.node) for item in items)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
