"""Retention: finished runs are kept for a period, then removed, so the keyspace stays bounded.

A run's keys live under its own prefix (``run/{run}/``), so removing it is one guarded Txn with
a range delete, plus its record, idempotency key, queue and expansion entries.
"""

from __future__ import annotations

from floxide_grpc._proto.floxide.v1 import records_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, Request, Txn
from floxide_server.store.records import FINISHED

__all__ = ["remove_finished"]


async def remove_finished(kv: KV, namespace: str, finished_before_ms: int, batch: int = 50) -> int:
    """Remove up to ``batch`` runs finished before a time: one guarded Txn per run.

    Runs are scanned oldest first (their ids are time-ordered), stopping at the first created
    after the cutoff.

    Returns:
        How many runs were removed.
    """
    keys = Keys(namespace)
    found, _ = await kv.range(keys.run_infos, limit=batch * 4)
    removed = 0
    for record in found:
        run = records_pb2.RunRecord.FromString(record.value)
        if run.created_at.ToMilliseconds() >= finished_before_ms or removed >= batch:
            break
        finished = run.status in FINISHED and run.HasField("finished_at")
        if not finished or run.finished_at.ToMilliseconds() >= finished_before_ms:
            continue
        deletes: list[Request] = [
            Delete(record.key),
            Delete(keys.run(run.run_id), prefix=True),
            Delete(keys.queue(run.run_id, ""), prefix=True),
            Delete(keys.expansion(run.run_id, ""), prefix=True),
            Delete(keys.settle(run.run_id)),
            Delete(keys.timer(run.run_id), prefix=True),
        ]
        if run.idempotency_key:
            deletes.append(Delete(keys.idempotency(run.idempotency_key)))
        result = await kv.txn(Txn([Compare.modified_at(record.key, record.mod_revision)], deletes))
        removed += result.succeeded
    return removed
