"""The storage-format version: which layout of keys and values a cluster's etcd holds.

Every key the server writes (see :mod:`floxide_server.store.keys`) and every value (the floxide.v1
records stored as they are returned, and the server's own floxide.storage.v1 records) make up
one storage format, numbered by :data:`STORAGE_FORMAT`. The cluster records its format at
``/floxide/v1/storage-format``, as a decimal number. A server starting on an etcd that holds no
format writes its own (an etcd written before the key existed holds format 1, which is the same
layout); one that finds another format refuses to start, so that replicas of different formats
never read each other's data. A change to a key or to a storage message that older servers could
not read takes a new number here (and a migration).
"""

from __future__ import annotations

import logging

from floxide_grpc._proto.floxide.v1 import work_item_pb2
from floxide_grpc.errors import FailedPrecondition
from floxide_server._proto.floxide.storage.v1.storage_pb2 import TimerRecord
from floxide_server.store.keys import NAMESPACES, STORAGE_FORMAT_KEY, Keys
from floxide_server.store.kv import KV, Compare, Delete, Put, Txn
from floxide_server.store.records import now_ms

__all__ = ["STORAGE_FORMAT", "StorageFormatMismatch", "ensure_format"]

log = logging.getLogger(__name__)

STORAGE_FORMAT = 4
"""The storage format this server reads and writes.

2: every item not yet done has a live marker (``run/{run}/live/{item}``), which tells a stuck run;
a format-1 keyspace has none, so its running runs would all look stuck.
3: a timer holds a delay (a TimerRecord at ``timer/{run}/{item}``), never a due time; a format-2
keyspace's timers (``timer/{due_ms}/{run}/{item}``, a WorkItem) are migrated at start
(:func:`_migrate_timers`), once every replica of format 2 has stopped.
4: a claim key holds the claim's whole token (``{session}:{nonce}:{attempt}:{run}:{item}``),
compared whole by its result; a format-3 claim held its attempt, and its token named the key's
create revision. Nothing is rewritten: the claims of a format-3 keyspace are those of sessions
of stopped replicas, released as their leases end (their results are refused meanwhile).
"""
MIGRATES = {
    b"2": "timers with due times become timers with delays; claims hold their whole token",
    b"3": "claims hold their whole token (nothing to rewrite)",
}
"""Formats a server of this format migrates at start, with what it changes."""


class StorageFormatMismatch(FailedPrecondition):
    """Raised at startup when etcd holds another storage format than this server's."""


async def ensure_format(kv: KV) -> None:
    """Record this server's storage format if etcd holds none; refuse another one.

    The write is one guarded Txn (only if the key is missing), so that replicas starting together
    agree on one value: the first one's.

    Raises:
        StorageFormatMismatch: etcd holds another format (it is left as it is).
    """
    ours = str(STORAGE_FORMAT).encode()
    while True:
        result = await kv.txn(
            Txn([Compare.missing(STORAGE_FORMAT_KEY)], [Put(STORAGE_FORMAT_KEY, ours)])
        )
        if result.succeeded:
            log.info("recorded storage format %d in etcd", STORAGE_FORMAT)
            return
        found = await kv.get(STORAGE_FORMAT_KEY)
        if found is not None:
            break  # else it was deleted since the Txn saw it: write it again
    if found.value == ours:
        return
    if found.value in MIGRATES:
        log.warning(
            "migrating storage format %s to %d: %s",
            found.value.decode(),
            STORAGE_FORMAT,
            MIGRATES[found.value],
        )
        await _migrate_timers(kv)
        flipped = await kv.txn(
            Txn(
                [Compare.value_is(STORAGE_FORMAT_KEY, found.value)], [Put(STORAGE_FORMAT_KEY, ours)]
            )
        )
        now = await kv.get(STORAGE_FORMAT_KEY)
        if flipped.succeeded or (now is not None and now.value == ours):
            return  # (another replica may have finished the migration first)
        found = now or found
    theirs = found.value.decode(errors="replace")
    raise StorageFormatMismatch(
        f"etcd holds storage format {theirs} at {STORAGE_FORMAT_KEY.decode()}, but this server "
        f"reads and writes storage format {STORAGE_FORMAT}: run a server of format {theirs}, "
        "or migrate the data"
    )


async def _migrate_timers(kv: KV) -> int:
    """Format 2 to 3: each ``timer/{due_ms}/{run}/{item}`` becomes ``timer/{run}/{item}``.

    Its delay is what is left of it by this replica's clock (the last time a wall clock is read
    for a timer); idempotent, one guarded Txn per timer, so an interrupted migration goes on at
    the next start. Returns how many timers it moved.
    """
    indexed, _ = await kv.range(NAMESPACES)
    moved = 0
    for entry in indexed:
        keys = Keys(entry.key[len(NAMESPACES) :].decode())
        timers, _ = await kv.range(keys.timer())
        for timer in timers:
            due, _, rest = timer.key[len(keys.timer()) :].partition(b"/")
            if not (len(due) == 13 and due.isdigit() and rest.count(b"/") == 1):
                continue  # of format 3 already
            item = work_item_pb2.WorkItem.FromString(timer.value)
            record = TimerRecord(
                run_id=item.run_id, item=item, delay_ms=max(int(due) - now_ms(), 0)
            )
            result = await kv.txn(
                Txn(
                    [Compare.modified_at(timer.key, timer.mod_revision)],
                    [
                        Delete(timer.key),
                        Put(keys.timer(item.run_id, item.item_id), record.SerializeToString()),
                    ],
                )
            )
            moved += result.succeeded
    log.info("migrated %d timers", moved)
    return moved
