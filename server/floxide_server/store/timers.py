"""Retry timers: a failed attempt whose policy retries waits on a durable timer in etcd.

Arming is part of the failing step's Txn: the item is marked WAITING_RETRY and a timer key
``timer/{due_ms}/{run}/{item}`` is written, ordered by its due time so that the earliest is
first in a range read. Firing (:func:`fire_timers`) is a Txn per due timer that checks the run is
running and the item still waits at the revision read, deletes the timer, and queues the item
as its next attempt. Any replica may fire; the guards make it happen once, and a restart loses
no timer.
"""

from __future__ import annotations

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, Put, Request, Txn
from floxide_server.store.queue import entry, queue_entry
from floxide_server.store.records import PAUSED, RUNNING, now_ms, stamp, status_name

__all__ = ["arm", "due_ms", "fire_timers"]

FIRED_PER_ROUND = 256
"""Timers read per call of :func:`fire_timers`."""


def arm(keys: Keys, state: records_pb2.WorkItemState, due: int) -> list[Request]:
    """Writes that make an item wait for a retry at ``due`` (ms); ``state`` is updated."""
    item = state.item
    state.status = records_pb2.ITEM_STATUS_WAITING_RETRY
    stamp(state, "retry_at", due)
    return [
        Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
        Put(keys.timer(due, item.run_id, item.item_id), entry(item).SerializeToString()),
    ]


def due_ms(keys: Keys, timer_key: bytes) -> int:
    """A timer's due time, read from its key."""
    return int(timer_key[len(keys.timer()) :].split(b"/")[0])


async def fire_timers(kv: KV, namespace: str, now: int | None = None) -> int:
    """Make due retries pending again (any replica may call it); returns how many fired."""
    keys = Keys(namespace)
    now = now_ms() if now is None else now
    due, _ = await kv.range(keys.timer(), limit=FIRED_PER_ROUND)
    fired = 0
    for timer in due:
        if due_ms(keys, timer.key) > now:
            break
        waiting = work_item_pb2.WorkItem.FromString(timer.value)
        run_id, item_id = waiting.run_id, waiting.item_id
        status = await kv.get(keys.status(run_id))
        if status is not None and status.value == status_name(PAUSED):
            continue  # fires after resume
        found = await kv.get(keys.item(run_id, item_id))
        if found is None:
            await kv.txn(Txn([], [Delete(timer.key)]))
            continue
        state = records_pb2.WorkItemState.FromString(found.value)
        if (
            status is None
            or status.value != status_name(RUNNING)
            or state.status != records_pb2.ITEM_STATUS_WAITING_RETRY
        ):
            await kv.txn(Txn([Compare.exists(timer.key)], [Delete(timer.key)]))
            continue
        state.status = records_pb2.ITEM_STATUS_PENDING
        state.item.attempt = state.attempts + 1
        state.ClearField("retry_at")
        stamp(state, "updated_at", now)
        result = await kv.txn(
            Txn(
                [
                    Compare.exists(timer.key),
                    Compare.value_is(keys.status(run_id), status_name(RUNNING)),
                    Compare.modified_at(found.key, found.mod_revision),
                ],
                [
                    Delete(timer.key),
                    Put(found.key, state.SerializeToString()),
                    queue_entry(keys, state.item),
                ],
            )
        )
        fired += result.succeeded
    return fired
