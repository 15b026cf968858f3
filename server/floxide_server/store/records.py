"""Run and item records as the store writes them: statuses, time stamps, fresh states, run ids.

``RunRecord`` and ``WorkItemState`` are stored as the contracts define them, because the read
RPCs return them as they are stored; what is only ever stored has messages of its own.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Compare, Op, Target

__all__ = [
    "FAILED",
    "FINAL",
    "FINISHED",
    "PAUSED",
    "RUNNING",
    "TIMED_OUT",
    "WAITING",
    "fresh_state",
    "new_run_id",
    "now_ms",
    "stamp",
    "status_name",
    "unfinished",
]

RunStatus = records_pb2.RunStatus
RUNNING = records_pb2.RUN_STATUS_RUNNING
PAUSED = records_pb2.RUN_STATUS_PAUSED
FAILED = records_pb2.RUN_STATUS_FAILED
TIMED_OUT = records_pb2.RUN_STATUS_TIMED_OUT
FINAL = (records_pb2.RUN_STATUS_COMPLETED, records_pb2.RUN_STATUS_CANCELLED, TIMED_OUT)
"""Statuses a run never leaves."""
FINISHED = (*FINAL, FAILED)
"""Statuses of a run that has ended (a failed one may still be resumed)."""
WAITING = (records_pb2.ITEM_STATUS_PENDING, records_pb2.ITEM_STATUS_WAITING_RETRY)
"""Item statuses that wait for dispatch or for a retry timer."""

_last_id = [0, 0]  # the millisecond and sequence of the last id made here


def new_run_id() -> str:
    """A UUIDv7 (RFC 9562), monotonic within this process: keys of runs sort by creation."""
    ms = time.time_ns() // 1_000_000
    last_ms, sequence = _last_id
    if ms <= last_ms:
        ms, sequence = last_ms, sequence + 1
        if sequence >= 1 << 12:  # 4096 ids in one millisecond: borrow the next one
            ms, sequence = ms + 1, secrets.randbits(11)
    else:
        sequence = secrets.randbits(11)
    _last_id[:] = [ms, sequence]
    value = (
        (ms & (2**48 - 1)) << 80 | 0x7 << 76 | sequence << 64 | 0b10 << 62 | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


def status_name(status: int) -> bytes:
    """The value of a run's status key."""
    return RunStatus.Name(status).removeprefix("RUN_STATUS_").encode()  # type: ignore[arg-type]


def unfinished(keys: Keys, run_id: str, statuses: tuple[int, ...] = FINISHED) -> list[Compare]:
    """Guards that hold while the run's status is none of ``statuses``."""
    return [
        Compare(keys.status(run_id), Target.VALUE, Op.NOT_EQUAL, status_name(s)) for s in statuses
    ]


def now_ms() -> int:
    """This process's wall clock, in milliseconds (for records people read)."""
    return time.time_ns() // 1_000_000


def stamp(message: Any, field: str, ms: int) -> None:
    """Set a ``Timestamp`` field of a record."""
    getattr(message, field).FromMilliseconds(ms)


def fresh_state(item: work_item_pb2.WorkItem) -> records_pb2.WorkItemState:
    """The state of an item just made: pending, never attempted.

    A fresh queue entry stands for it, so a claim may rebuild it instead of reading it.
    """
    state = records_pb2.WorkItemState(status=records_pb2.ITEM_STATUS_PENDING)
    state.item.CopyFrom(item)
    state.updated_at.CopyFrom(item.created_at)
    return state
