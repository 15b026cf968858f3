"""Fan-out and join in the store: group records, arrivals, the join item, wide expansions.

A transition that makes several items opens a *group* (see :mod:`floxide_grpc._routing`). Each
branch that reaches the join writes its output under ``group/{g}/out/{index}`` (guarded by its
absence, so a repeat arrives once) and rewrites the group record ``group/{g}`` with a compare on
its revision: the one key that many steps share, and only within one group. The Txn that makes
the group reach its size creates the join item, which refers to the outputs rather than copying
them (its claim reads them). So fan-in is exact at any width, decided atomically in etcd.

Two things keep that key cheap on one replica. Completions of one group's branches take turns
(:class:`GroupTurns`), so they do not fail each other's compares; and the record a Txn wrote is
kept (:class:`GroupCache`), so the next arrival plans from it with no read; its compare on the
revision tells if another replica moved it meanwhile.

A fan-out too wide for one Txn (etcd's ``--max-txn-ops``) writes a durable *expansion record* in
the completing Txn instead of its items, and :func:`expand` turns it into items right after, in
bounded idempotent Txns; a crash in between loses nothing (the reconciler expands what is left).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import typing
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Protocol, TypeVar

from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, records_pb2, work_item_pb2
from floxide_grpc._routing import Arrival, arrive
from floxide_server._proto.floxide.storage.v1 import storage_pb2
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, KeyValue, Op, Put, Request, Target, Txn
from floxide_server.store.queue import new_items
from floxide_server.store.records import FINAL, status_name, unfinished

__all__ = [
    "EXPANSION_CHUNK",
    "MAX_GROUPS_KEPT",
    "Arrivals",
    "GroupCache",
    "GroupTurns",
    "expand",
    "expansion",
    "plan_arrivals",
]

EXPANSION_CHUNK = 40
"""Items created per Txn when expanding a wide fan-out (three writes each: 120 of 128)."""
EXPAND_PASSES = 16
"""Passes an expansion makes over what is left while its Txns keep failing, before it leaves
the rest to the reconciler."""
MAX_GROUPS_KEPT = 10_000
"""Group records a replica keeps in memory for the next arrival (the oldest go first)."""


@dataclasses.dataclass
class Arrivals:
    """What recording a step's arrivals takes: its guards and writes, and the joins it fires.

    Attributes:
        guards: The group records' revisions and the outputs' absence.
        writes: The outputs and the rewritten group records.
        joins: Join items made by the groups this step completes.
        groups: Group records written, by key (``None``: the group is complete).
        needs: Group records to read before planning can go on (none are known).
    """

    guards: list[Compare] = dataclasses.field(default_factory=list)
    writes: list[Request] = dataclasses.field(default_factory=list)
    joins: list[work_item_pb2.WorkItem] = dataclasses.field(default_factory=list)
    groups: dict[bytes, bytes | None] = dataclasses.field(default_factory=dict)
    needs: tuple[bytes, ...] = ()


def plan_arrivals(
    keys: Keys,
    item: work_item_pb2.WorkItem,
    arrivals: Sequence[Arrival],
    known: Mapping[bytes, KeyValue | None],
) -> Arrivals:
    """Record a step's arrivals in their groups, from the group records ``known``.

    Pure. ``known`` maps a group's key to its record (``None``: read, and absent); a key it
    lacks is unknown, and then nothing is planned: :attr:`Arrivals.needs` names what to read.
    """
    planned = Arrivals()
    group_keys = {a.frame.group_id: keys.group(item.run_id, a.frame.group_id) for a in arrivals}
    planned.needs = tuple(k for k in dict.fromkeys(group_keys.values()) if k not in known)
    if planned.needs:
        return planned
    groups: dict[str, tuple[KeyValue | None, checkpoint_pb2.JoinGroup | None]] = {}
    for arrival in arrivals:
        group_id = arrival.frame.group_id
        if group_id not in groups:
            found = known[group_keys[group_id]]
            groups[group_id] = (
                found,
                checkpoint_pb2.JoinGroup.FromString(found.value) if found else None,
            )
        found, group = groups[group_id]
        group, join = arrive(group, arrival, item, inline=False)
        groups[group_id] = (found, group)
        out = checkpoint_pb2.GroupArrival(index=arrival.frame.index, held=arrival.output is None)
        if arrival.output is not None:
            out.output.CopyFrom(arrival.output)
        out_key = keys.group_output(item.run_id, group_id, arrival.frame.index)
        planned.guards.append(Compare.missing(out_key))
        planned.writes.append(Put(out_key, out.SerializeToString()))
        if join is not None:
            planned.joins.append(join)
    for group_id, (found, group) in groups.items():
        assert group is not None
        group_key = group_keys[group_id]
        planned.guards.append(Compare.modified_at(group_key, found.mod_revision if found else 0))
        written = group.SerializeToString()
        planned.writes.append(Put(group_key, written))
        planned.groups[group_key] = written if len(group.arrivals) < group.size else None
    return planned


class _Planned(Protocol):
    @property
    def needs(self) -> tuple[bytes, ...]: ...


P = TypeVar("P", bound=_Planned)


class GroupCache:
    """The group records this replica's Txns wrote last, by key, for the next arrival."""

    def __init__(self, limit: int = MAX_GROUPS_KEPT) -> None:
        self.records: collections.OrderedDict[bytes, KeyValue] = collections.OrderedDict()
        self.limit = limit

    async def planned(self, kv: KV, plan: Callable[[Mapping[bytes, KeyValue | None]], P]) -> P:
        """Plan from the kept records; if a group is unknown, read it and plan again."""
        planned = plan(self.records)
        fetched: dict[bytes, KeyValue | None] = {}
        kept = typing.cast(MutableMapping[bytes, KeyValue | None], self.records)
        while planned.needs:  # what is read stays known: this ends
            found = await asyncio.gather(*(kv.get(key) for key in planned.needs))
            fetched.update(zip(planned.needs, found, strict=True))
            planned = plan(collections.ChainMap(fetched, kept))
        return planned

    def remember(self, groups: Mapping[bytes, bytes | None], revision: int) -> None:
        """Keep the records a Txn wrote at ``revision`` (0: forget them, unknown now)."""
        for key, record in groups.items():
            self.records.pop(key, None)
            if revision and record is not None:
                self.records[key] = KeyValue(key, record, 0, revision, 0)
        while len(self.records) > self.limit:  # groups of runs that stopped arriving
            self.records.popitem(last=False)


@dataclasses.dataclass
class _Turn:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class GroupTurns:
    """Completions of one group's branches on this replica, one at a time.

    They all rewrite the group's record: taking turns here, they do not fail each other's
    compares (conflicts remain only between replicas).
    """

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str, str], _Turn] = {}

    @contextlib.asynccontextmanager
    async def turn(self, namespace: str, run_id: str, group_id: str) -> AsyncIterator[None]:
        """Hold the group's turn for the duration of the block."""
        key = (namespace, run_id, group_id)
        turn = self._turns.setdefault(key, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]


def expansion(
    keys: Keys, run_id: str, item_id: str, items: Sequence[work_item_pb2.WorkItem]
) -> Put:
    """The durable record of a fan-out too wide for its completing Txn."""
    record = storage_pb2.ExpansionRecord(namespace=keys.namespace, run_id=run_id, items=items)
    return Put(keys.expansion(run_id, item_id), record.SerializeToString())


Readied = Callable[
    [Sequence[work_item_pb2.WorkItem]], Awaitable[tuple[list[Compare], list[Request]]]
]
"""Guards and writes that make a chunk of new items ready (nested workflows' start children)."""


async def expand(
    kv: KV,
    namespace: str,
    run_id: str,
    item_id: str,
    readied: Readied | None = None,
    share: Callable[[work_item_pb2.WorkItem], float] | None = None,
) -> None:
    """Turn an expansion record into items, in bounded idempotent Txns, then delete it.

    ``readied`` makes a chunk ready (default: queued); ``share`` says what part of one Txn an
    item takes (default: ``1 / EXPANSION_CHUNK``). Each chunk's Txn makes only items not made
    yet, each guarded by its absence, so passes may chunk differently; a chunk whose Txn
    failed (what it read moved: the run's context or status) is tried again from fresh reads,
    and the record is deleted only once every item is made. A failed run's record is kept, not
    expanded: resuming the run expands it; so is one that keeps moving (the reconciler goes on).
    """
    keys = Keys(namespace)
    key = keys.expansion(run_id, item_id)
    found = await kv.get(key)
    if found is None:
        return
    failed = status_name(records_pb2.RUN_STATUS_FAILED)
    items = list(storage_pb2.ExpansionRecord.FromString(found.value).items)
    for _ in range(EXPAND_PASSES):
        status = await kv.get(keys.status(run_id))
        if status is not None and status.value == failed:
            return
        if status is None or status.value in {status_name(s) for s in FINAL}:
            break  # nothing of it is made any more: the record goes
        made = await asyncio.gather(*(kv.get(keys.item(run_id, i.item_id)) for i in items))
        remaining = [i for i, kv_ in zip(items, made, strict=True) if kv_ is None]
        if not remaining:
            break
        for chunk in _chunks(remaining, share or (lambda item: 1 / EXPANSION_CHUNK)):
            guards, writes = await readied(chunk) if readied else ([], new_items(keys, chunk))
            result = await kv.txn(
                Txn(
                    [
                        Compare.modified_at(key, found.mod_revision),
                        *(Compare.missing(keys.item(run_id, i.item_id)) for i in chunk),
                        *unfinished(keys, run_id),
                        *guards,
                    ],
                    writes,
                )
            )
            if not result.succeeded:
                break  # look again at what is made and why
        else:
            break
        if await kv.get(key) is None:
            return  # expanded by another replica meanwhile
    else:
        return
    kept = Compare(keys.status(run_id), Target.VALUE, Op.NOT_EQUAL, failed)
    await kv.txn(  # and the expanding item is done: its items are live in its place
        Txn(
            [Compare.modified_at(key, found.mod_revision), kept],
            [Delete(key), Delete(keys.live(run_id, item_id))],
        )
    )


def _chunks(
    items: Sequence[work_item_pb2.WorkItem], share: Callable[[work_item_pb2.WorkItem], float]
) -> list[list[work_item_pb2.WorkItem]]:
    """``items`` in order, in chunks that each fill at most one Txn."""
    chunks: list[list[work_item_pb2.WorkItem]] = []
    used = 1.0
    for item in items:
        taken = share(item)
        if used + taken > 1.0 + 1e-9 or not chunks:
            chunks.append([])
            used = 0.0
        chunks[-1].append(item)
        used += taken
    return chunks
