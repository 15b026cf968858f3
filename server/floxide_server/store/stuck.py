"""Stuck runs end: a run with no item left to run and no terminal output fails, kind STUCK.

Every item not yet done has a marker ``run/{run}/live/{item}``, written and deleted by the
Txns that already create and finish it (a wide fan-out's item keeps its marker until its items
are made). No per-run counter is rewritten by every branch (DESIGN section 5): a Txn that ends a
branch without a successor holds a nested Txn whose compares say that no other marker exists
(two range compares around its own), and whose writes fail the run. etcd evaluates every compare
of a request before its writes, so the last branch sees the others' markers gone and its own
still there. Two last branches of one run never share a group-commit request: each one's range
compare covers what the other deletes, and group commit keeps such Txns apart.

A run made stuck by any other path (a crash between Txns, a marker lost by hand) is found by
the reconciler on the elected replica (:func:`fail_stuck`), which pages through running runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server.store import settling
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Put, Txn, prefix_end
from floxide_server.store.records import RUNNING, status_name

if TYPE_CHECKING:
    from floxide_server.store.lineage import Lineage

__all__ = ["PAGE", "STUCK", "error", "fail_stuck", "name_all"]

PAGE = 200
"""Runs the reconciler reads a time."""
STUCK = "stuck"
"""The name of the nested Txn that fails a stuck run, in its step's Txn."""


def error(nodes: Sequence[str]) -> work_item_pb2.NodeError:
    """The run's error: what was stuck, and where its branches ended."""
    where = ", ".join(repr(n) for n in sorted(set(nodes))) or "no node"
    return work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_STUCK,
        message=(
            "no item is left to run and no terminal node was reached; branches ended without "
            f"a successor at {where} (a Hold outside any join?)"
        ),
    )


async def ended_at(kv: KV, keys: Keys, run_id: str) -> list[str]:
    """The nodes recorded as having ended a branch of the run without a successor."""
    found, _ = await kv.range(keys.ended(run_id))
    return [kv_.key[len(keys.ended(run_id)) :].decode() for kv_ in found]


async def name_all(kv: KV, keys: Keys, run_id: str, revision: int) -> None:
    """Name every branch's last node in the error of a run that a step's Txn failed as stuck.

    That Txn read them before it ran: a branch that ended at the same time is added now, if
    the run's record is still the one it wrote at ``revision``.
    """
    nodes = await ended_at(kv, keys, run_id)
    record = await kv.get(keys.run_info(run_id))
    if record is None or record.mod_revision != revision:
        return
    run = records_pb2.RunRecord.FromString(record.value)
    if run.error.message == error(nodes).message:
        return
    run.error.CopyFrom(error(nodes))
    await kv.txn(
        Txn([Compare.modified_at(record.key, revision)], [Put(record.key, run.SerializeToString())])
    )


async def fail_stuck(
    kv: KV, namespace: str, now_ms: int, max_txn_ops: int, lineage: Lineage | None = None
) -> int:
    """Fail every running run of a namespace that has no live item; how many it failed.

    Each in a Txn guarded by the run's record (its revision), its status and the emptiness of
    its live markers, so a run that moved meanwhile is left alone. A child run's parent item
    fails in the same Txn (``lineage``), and a parent's item whose child ended unseen takes its
    end first (:meth:`~floxide_server.store.lineage.Lineage.catch_up`).
    """
    keys = Keys(namespace)
    failed = 0
    start: bytes | None = None
    while True:
        found, _ = await kv.range(keys.run_infos, start=start, limit=PAGE)
        for record in found:
            run = records_pb2.RunRecord.FromString(record.value)
            if run.status != RUNNING:
                continue
            if lineage is not None:  # an item waiting for a child that ended unseen
                await lineage.catch_up(namespace, run.run_id)
            live, _ = await kv.range(keys.live(run.run_id), limit=1)
            if live or not await _nothing_in_flight(kv, keys, run.run_id):
                continue
            nodes = await ended_at(kv, keys, run.run_id)
            writes = settling.ending(keys, run, records_pb2.RUN_STATUS_FAILED, now_ms, error(nodes))
            guards = [
                Compare.modified_at(record.key, record.mod_revision),
                Compare.value_is(keys.status(run.run_id), status_name(RUNNING)),
                Compare.none_in(keys.live(run.run_id), prefix_end(keys.live(run.run_id))),
            ]
            parent = await lineage.join(run, now_ms, guards, writes) if lineage else None
            result = await kv.txn(Txn(guards, writes))
            if result.succeeded:
                failed += 1
                if lineage is not None:
                    await lineage.after(parent, result.revision)
                await settling.settle(kv, keys, run.run_id, max_txn_ops)
            elif lineage is not None:
                lineage.forget(parent)
        if len(found) < PAGE:
            return failed
        start = found[-1].key + b"\0"


async def _nothing_in_flight(kv: KV, keys: Keys, run_id: str) -> bool:
    """Whether no item of the run waits, runs or expands, as the items themselves say.

    The markers' story, checked again before a run is failed behind its Txns' back.
    """
    expanding, _ = await kv.range(keys.expansion(run_id, ""), limit=1)
    if expanding:
        return False
    items, _ = await kv.range(keys.item(run_id))
    return not any(
        records_pb2.WorkItemState.FromString(found.value).status in settling.IN_FLIGHT
        for found in items
    )
