"""Durable timers (retries, run timeouts): armed by the Txn that decides them, never early.

A timer is a key ``timer/{run}/{item}`` (a retry) or ``timer/{run}`` (the run's timeout) whose
TimerRecord holds a *delay*, never a due time: whatever the replicas' clocks say, the elected
replica measures it on its own monotonic clock (:mod:`floxide_server.firing`). ``retry_at`` on
an item is an estimate for people and is never read to fire.

Firing is one Txn per timer, guarded by the timer's create revision (a timer re-armed on the
same key is another timer) and by the run and item it acts on, so a deposed leader that has not
heard yet does no harm. A retry whose run is paused waits, and fires after a resume. A run
timeout counts paused and failed time: it ends a paused run, and a failed one (which can then no
longer be resumed). A run that ends otherwise deletes its timeout in its ending Txn.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import TYPE_CHECKING

from floxide_grpc._durations import format_seconds
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.store import settling
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, Put, Request, Txn
from floxide_server.store.queue import entry, queue_entry

if TYPE_CHECKING:
    from floxide_server.store.lineage import Lineage

from floxide_server.store.records import (
    FAILED,
    PAUSED,
    RUNNING,
    TIMED_OUT,
    now_ms,
    stamp,
    status_name,
)

__all__ = ["Outcome", "Timer", "arm", "arm_run_timeout", "drop", "fire_retry", "time_out"]

log = logging.getLogger(__name__)


def arm(keys: Keys, state: records_pb2.WorkItemState, now: int, delay_ms: int) -> list[Request]:
    """Writes that make an item wait ``delay_ms`` for a retry; ``state`` is updated.

    ``retry_at`` is stamped ``now + delay_ms``: an estimate for people, never read to fire.
    """
    item = state.item
    state.status = records_pb2.ITEM_STATUS_WAITING_RETRY
    stamp(state, "retry_at", now + delay_ms)
    timer = TimerRecord(run_id=item.run_id, item=entry(item), delay_ms=delay_ms)
    return [
        Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
        Put(keys.timer(item.run_id, item.item_id), timer.SerializeToString()),
    ]


def arm_run_timeout(keys: Keys, run_id: str, timeout_ms: int) -> Put:
    """The write that ends the run ``timeout_ms`` after it starts (fired by ``firing``)."""
    return Put(
        keys.timer(run_id), TimerRecord(run_id=run_id, delay_ms=timeout_ms).SerializeToString()
    )


class Outcome(enum.Enum):
    """What an attempt to fire a timer did."""

    FIRED = "fired"
    MOOT = "moot"  # nothing left to do: deleted
    WAITS = "waits"  # its run is paused: again later
    RACED = "raced"  # another write moved its run or item meanwhile: again at once


@dataclasses.dataclass
class Timer:
    """A timer as read: its key, its create revision and its record.

    The create revision is its identity: a timer re-armed on the same key is another timer.
    """

    key: bytes
    created: int
    record: TimerRecord


async def fire_retry(kv: KV, keys: Keys, timer: Timer, lineage: Lineage | None = None) -> Outcome:
    """Queue the item's next attempt (it waits while its run is paused).

    A nested workflow's item starts its next child run instead (``lineage``).
    """
    waiting = timer.record.item
    run_id, item_id = waiting.run_id, waiting.item_id
    status = await kv.get(keys.status(run_id))
    if status is not None and status.value == status_name(PAUSED):
        return Outcome.WAITS
    found = await kv.get(keys.item(run_id, item_id))
    state = records_pb2.WorkItemState.FromString(found.value) if found else None
    if (
        state is None
        or status is None
        or status.value != status_name(RUNNING)
        or state.status != records_pb2.ITEM_STATUS_WAITING_RETRY
    ):
        await drop(kv, timer)
        return Outcome.MOOT
    assert found is not None
    state.status = records_pb2.ITEM_STATUS_PENDING
    state.item.attempt = state.attempts + 1
    state.ClearField("retry_at")
    stamp(state, "updated_at", now_ms())
    guards: list[Compare] = []
    writes: list[Request] = [Put(found.key, state.SerializeToString())]
    if lineage is not None and await lineage.nested(keys, state.item):
        run = await kv.get(keys.run_info(run_id))
        if run is None:
            return Outcome.MOOT
        record = records_pb2.RunRecord.FromString(run.value)
        guards, writes = await lineage.readied(keys, record, [state], now_ms())
    else:
        writes.append(queue_entry(keys, state.item))
    result = await kv.txn(
        Txn(
            [
                Compare.created_at(timer.key, timer.created),
                Compare.value_is(keys.status(run_id), status_name(RUNNING)),
                Compare.modified_at(found.key, found.mod_revision),
                *guards,
            ],
            [Delete(timer.key), *writes],
        )
    )
    return Outcome.FIRED if result.succeeded else Outcome.RACED


async def time_out(
    kv: KV, keys: Keys, timer: Timer, max_txn_ops: int, lineage: Lineage | None = None
) -> Outcome:
    """End the run TIMED_OUT: running, paused, or failed (its time to be resumed is over).

    A child run's parent item fails in the same Txn, as an attempt of kind TIMEOUT.
    """
    run_id = timer.record.run_id
    found = await kv.get(keys.run_info(run_id))
    run = records_pb2.RunRecord.FromString(found.value) if found else None
    if found is None or run is None or run.status not in (RUNNING, PAUSED, FAILED):
        await drop(kv, timer)
        return Outcome.MOOT
    message = f"the run passed its run timeout of {format_seconds(timer.record.delay_ms / 1000)}"
    if run.status == FAILED:  # the failure is kept in the message
        message += f" (it had failed: {run.error.message})"
    error = work_item_pb2.NodeError(kind=work_item_pb2.ERROR_KIND_TIMEOUT, message=message)
    guards = [
        Compare.created_at(timer.key, timer.created),
        Compare.modified_at(found.key, found.mod_revision),
        Compare.value_is(keys.status(run_id), status_name(run.status)),
    ]
    now = now_ms()
    writes = settling.ending(keys, run, TIMED_OUT, now, error)  # the timer deleted too
    parent = await lineage.join(run, now, guards, writes) if lineage else None
    result = await kv.txn(Txn(guards, writes))
    if result.succeeded:
        log.info("run %s of %r timed out", run_id, keys.namespace)
        if lineage is not None:
            await lineage.after(parent, result.revision)
        await settling.settle(kv, keys, run_id, max_txn_ops)
        return Outcome.FIRED
    if lineage is not None:
        lineage.forget(parent)
    return Outcome.RACED


async def drop(kv: KV, timer: Timer) -> None:
    """Delete a timer that has nothing left to do (if it is still the same timer)."""
    await kv.txn(Txn([Compare.created_at(timer.key, timer.created)], [Delete(timer.key)]))
