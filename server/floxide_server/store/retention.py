"""Retention: finished runs and ended sessions are kept for a period, then removed.

So the keyspace stays bounded. A run's keys live under its own prefix (``run/{run}/``), so
removing it is one guarded Txn with a range delete, plus its record, idempotency key, queue and
expansion entries. Child runs go with their parent (never alone), just before it. An ended
session's record (``worker/{lease}``) is one key, removed by a Txn guarded by its revision.
"""

from __future__ import annotations

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, KeyValue, Request, Txn
from floxide_server.store.records import FINISHED

__all__ = ["remove_ended_sessions", "remove_finished"]


SCAN_PAGES = 20
"""Pages of run records one pass reads at most (runs still going and children are skipped)."""


async def remove_finished(kv: KV, namespace: str, finished_before_ms: int, batch: int = 50) -> int:
    """Remove up to ``batch`` runs finished before a time: one guarded Txn per run.

    Runs are scanned oldest first (their ids are time-ordered), a page at a time, stopping at
    the first run started by a client after the cutoff. Child runs go with their parent.

    Returns:
        How many runs were removed.
    """
    keys = Keys(namespace)
    removed = 0
    start: bytes | None = None
    for _ in range(SCAN_PAGES):
        found, _ = await kv.range(keys.run_infos, start=start, limit=batch * 4)
        for record in found:
            run = records_pb2.RunRecord.FromString(record.value)
            if run.HasField("parent"):
                continue  # removed with its parent
            if run.created_at.ToMilliseconds() >= finished_before_ms or removed >= batch:
                return removed
            finished = run.status in FINISHED and run.HasField("finished_at")
            if finished and run.finished_at.ToMilliseconds() < finished_before_ms:
                removed += await _remove(kv, keys, record, run)
        if len(found) < batch * 4:
            break
        start = found[-1].key + b"\0"
    return removed


async def _remove(kv: KV, keys: Keys, record: KeyValue, run: records_pb2.RunRecord) -> bool:
    """Remove a finished run, its children first (each in a Txn of its own, deepest first).

    A run one of whose children could not be removed stays, for the next pass.
    """
    links, _ = await kv.range(keys.child(run.run_id))
    for link in links:
        child = await kv.get(keys.run_info(link.key[len(keys.child(run.run_id)) :].decode()))
        if child is not None and not await _remove(
            kv, keys, child, records_pb2.RunRecord.FromString(child.value)
        ):
            return False
    deletes: list[Request] = [
        Delete(record.key),
        Delete(keys.run(run.run_id), prefix=True),
        Delete(keys.queue(run.run_id, ""), prefix=True),
        Delete(keys.expansion(run.run_id, ""), prefix=True),
        Delete(keys.settle(run.run_id)),
        Delete(keys.timer(run.run_id), prefix=True),
        Delete(keys.running(run.run_id)),
    ]
    if run.idempotency_key:
        deletes.append(Delete(keys.idempotency(run.idempotency_key)))
    result = await kv.txn(Txn([Compare.modified_at(record.key, record.mod_revision)], deletes))
    return result.succeeded


async def remove_ended_sessions(
    kv: KV, namespace: str, ended_before_ms: int, batch: int = 50
) -> int:
    """Remove up to ``batch`` records of worker sessions ended before a time.

    Records are keyed by lease, not by time: they are scanned a page at a time, and each
    removed by one Txn guarded by its revision. A record without ``ended_at`` (a live session,
    or one the reconcile sweep has yet to stamp) stays.

    Returns:
        How many records were removed.
    """
    prefix = Keys(namespace).worker()
    removed = 0
    start: bytes | None = None
    while removed < batch:
        found, _ = await kv.range(prefix, start=start, limit=batch * 4)
        for entry in found:
            record = records_pb2.WorkerRecord.FromString(entry.value)
            if (
                not record.HasField("ended_at")
                or record.ended_at.ToMilliseconds() >= ended_before_ms
            ):
                continue
            result = await kv.txn(
                Txn([Compare.modified_at(entry.key, entry.mod_revision)], [Delete(entry.key)])
            )
            removed += result.succeeded
            if removed >= batch:
                break
        if len(found) < batch * 4:
            break
        start = found[-1].key + b"\0"
    return removed
