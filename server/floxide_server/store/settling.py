"""Settling: a finished run leaves nothing in flight.

A run ends in one Txn: its first terminal output completes it (as in floxide), a failure with
no retry and no fallback fails it, a cancel cancels it. That Txn also empties the run's queue
and writes ``settle/{run}``. Then every other item is settled, in bounded Txns guarded by the
run's status and each item's revision: a pending, waiting or held item becomes CANCELLED, with
why ("run completed", "run failed", "run cancelled") as its last error, keeping its input and
attempts; its retry timer and its claim are deleted, so a late result is refused
(FAILED_PRECONDITION) and its worker's slot comes back. Workers holding such items are told to
stop by dispatch, which follows the runs' records. Last, the marker is deleted.

Settling is idempotent, so a crash in the middle loses nothing: the reconciler finishes every
run that still has its marker (:func:`settle_all`). Resuming a failed run deletes the marker
and re-queues what settling cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, KeyValue, Put, Request, Txn, prefix_end
from floxide_server.store.records import FINAL, now_ms, stamp, status_name

__all__ = [
    "IN_FLIGHT",
    "SETTLING",
    "alone",
    "batches",
    "children_ended",
    "ending",
    "holds",
    "settle",
    "settle_all",
    "settled",
]

IN_FLIGHT = (
    records_pb2.ITEM_STATUS_PENDING,
    records_pb2.ITEM_STATUS_IN_PROGRESS,
    records_pb2.ITEM_STATUS_WAITING_RETRY,
)
"""Statuses no item of a finished run keeps."""
_WHY = {
    b"COMPLETED": "run completed",
    b"FAILED": "run failed",
    b"CANCELLED": "run cancelled",
    b"TIMED_OUT": "run timed out",
}
SETTLING = "settling"
"""The name of the nested Txn of a run's ending step that marks the run for settling."""
_ATTEMPTS = 16
"""Passes over a run's items before settling gives up for now (the reconciler goes on)."""
_OPS_PER_ITEM = 3
"""Writes settling one item may take: its state, its timer, its claim."""
_CHILD_OPS = 6
"""Writes and compares that cancel the child run an item waits for (:func:`ending`'s)."""


def settled(keys: Keys, run_id: str, status: bytes) -> Put:
    """The write of a run's ending Txn that says its leftovers are to be settled."""
    return Put(keys.settle(run_id), status)


def alone(keys: Keys, run_id: str, item_id: str) -> list[Compare]:
    """Compares that hold when no item of the run is live but ``item_id``."""
    own = keys.live(run_id, item_id)
    everything = keys.live(run_id)
    return [
        Compare.none_in(everything, own),
        Compare.none_in(own + b"\0", prefix_end(everything)),
    ]


def ending(
    keys: Keys,
    run: records_pb2.RunRecord,
    status: int,
    now: int,
    error: work_item_pb2.NodeError | None = None,
    *,
    last: str = "",
    alone_known: bool = False,
) -> list[Request]:
    """The writes of a run's ending Txn (``run`` is updated to say so).

    Its record and its status key, its queue emptied, and the marker that has its other items
    settled right after. When the Txn is the step of item ``last``, the marker is written by a
    nested Txn (:data:`SETTLING`) only if another item is live: a run ended by its last live
    item (a chain's terminal step, say) costs no settling. ``alone_known``: the Txn already
    knows no other item is live, and writes no marker.
    """
    run.status = status  # type: ignore[assignment]
    if error is not None:
        run.error.CopyFrom(error)
    stamp(run, "finished_at", now)
    stamp(run, "updated_at", now)
    marker = settled(keys, run.run_id, status_name(status))
    writes: list[Request] = [
        Put(keys.run_info(run.run_id), run.SerializeToString()),
        Put(keys.status(run.run_id), status_name(status)),
        Delete(keys.queue(run.run_id, ""), prefix=True),
        Delete(keys.running(run.run_id)),  # no longer counted for the namespace's quota
    ]
    if status in FINAL:  # its run timeout is moot (a failed run's still runs: it may resume)
        writes.append(Delete(keys.timer(run.run_id)))
    if alone_known:
        return writes
    if last:
        return [*writes, Txn(alone(keys, run.run_id, last), [], [marker], name=SETTLING)]
    return [*writes, marker]


async def settle(kv: KV, keys: Keys, run_id: str, max_txn_ops: int) -> bool:
    """Settle what is still in flight in a finished run; idempotent.

    Returns:
        Whether the run is settled (or was resumed meanwhile, or had nothing to settle).
    """
    marker = await kv.get(keys.settle(run_id))
    if marker is None:
        return True
    status = marker.value
    # Not resumed meanwhile (a resume deletes the marker first, then re-queues).
    still = [Compare.value_is(keys.status(run_id), status), Compare.exists(keys.settle(run_id))]
    for attempt in range(_ATTEMPTS):
        if attempt and await kv.get(keys.settle(run_id)) is None:
            return True  # resumed meanwhile, or settled by another replica
        found, _ = await kv.range(keys.item(run_id))
        leftovers = [kv_ for kv_ in found if _state(kv_).status in IN_FLIGHT]
        moved = False
        per_item = _OPS_PER_ITEM + (_CHILD_OPS if any(_child(i) for i in leftovers) else 0)
        for chunk in batches(leftovers, max_txn_ops - 2, per_item=per_item):
            why = _WHY.get(status, "")
            guards = [*still, *(Compare.modified_at(i.key, i.mod_revision) for i in chunk)]
            writes = [w for item in chunk for w in _cancelled(keys, item, why)]
            ended = await children_ended(kv, keys, run_id, chunk, f"ended ({why})", guards, writes)
            result = await kv.txn(Txn(guards, writes))
            moved |= not result.succeeded
            for child_id in ended if result.succeeded else ():  # and theirs, in turn
                await settle(kv, keys, child_id, max_txn_ops)
        if not moved:
            done = await kv.txn(Txn(still, [Delete(keys.settle(run_id))]))
            return done.succeeded or await kv.get(keys.settle(run_id)) is None
    return False


MAX_BATCH_BYTES = 1 << 20
"""The most bytes of values one settling or re-queueing Txn writes (etcd takes 1.5 MiB)."""


def batches(
    found: Sequence[KeyValue],
    max_ops: int,
    per_item: int,
    extra: Callable[[KeyValue], int] = lambda kv: 0,
) -> Iterator[list[KeyValue]]:
    """``found`` in chunks whose Txns keep to etcd's operation and request-size limits.

    Each item takes ``per_item`` operations and about its value's size in writes, plus
    ``extra`` bytes (what else its Txn writes for it: a child run's copy of the context, say).
    """
    chunk: list[KeyValue] = []
    size = 0
    for kv in found:
        bytes_ = len(kv.value) + len(kv.key) + extra(kv)
        if chunk and ((len(chunk) + 1) * per_item > max_ops or size + bytes_ > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(kv)
        size += bytes_
    if chunk:
        yield chunk


async def settle_all(kv: KV, namespace: str, max_txn_ops: int) -> int:
    """Finish settling every run of a namespace whose settling was interrupted; how many."""
    keys = Keys(namespace)
    markers, _ = await kv.range(keys.settle())
    settled_now = 0
    for marker in markers:
        run_id = marker.key[len(keys.settle()) :].decode()
        settled_now += await settle(kv, keys, run_id, max_txn_ops)
    return settled_now


def _state(found: KeyValue) -> records_pb2.WorkItemState:
    return records_pb2.WorkItemState.FromString(found.value)


def holds(keys: Keys, state: records_pb2.WorkItemState) -> list[Request]:
    """Deletes of what an item in flight holds: its retry timer, or its claim."""
    item = state.item
    if state.status == records_pb2.ITEM_STATUS_WAITING_RETRY:
        return [Delete(keys.timer(item.run_id, item.item_id))]
    if state.status == records_pb2.ITEM_STATUS_IN_PROGRESS and state.session_id:
        return [Delete(keys.claim(int(state.session_id, 16), item.run_id, item.item_id))]
    return []


def _child(found: KeyValue) -> str:
    """The child run an item in flight waits for ("" for none)."""
    state = _state(found)
    return state.child_run_id if state.status == records_pb2.ITEM_STATUS_IN_PROGRESS else ""


async def children_ended(
    kv: KV,
    keys: Keys,
    run_id: str,
    chunk: Sequence[KeyValue],
    why: str,
    guards: list[Compare],
    writes: list[Request],
) -> list[str]:
    """Cancel, in a Txn of ``chunk``, the child runs its items wait for; those cancelled.

    A parent's end cancels its running children, and so does a resume that starts an item's
    child anew (each guarded by its record as read); the caller settles them after its Txn, so
    the whole tree below ends.
    """
    ended = []
    for item in chunk:
        child_id = _child(item)
        found = await kv.get(keys.run_info(child_id)) if child_id else None
        if found is None:
            continue
        child = records_pb2.RunRecord.FromString(found.value)
        if child.status in FINAL:
            continue
        error = work_item_pb2.NodeError(
            kind=work_item_pb2.ERROR_KIND_CANCELLED,
            message=f"its parent run {run_id} {why}",
        )
        guards.append(Compare.modified_at(found.key, found.mod_revision))
        writes.extend(ending(keys, child, records_pb2.RUN_STATUS_CANCELLED, now_ms(), error))
        ended.append(child_id)
    return ended


def _cancelled(keys: Keys, found: KeyValue, why: str) -> list[Request]:
    """The writes that settle one item: CANCELLED, and its timer or claim gone."""
    state = _state(found)
    writes = holds(keys, state)
    state.status = records_pb2.ITEM_STATUS_CANCELLED
    state.last_error.CopyFrom(
        work_item_pb2.NodeError(kind=work_item_pb2.ERROR_KIND_CANCELLED, message=why)
    )
    state.ClearField("retry_at")
    stamp(state, "updated_at", now_ms())
    writes.append(Put(found.key, state.SerializeToString()))
    return writes
