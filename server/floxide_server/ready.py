"""The ready items dispatch holds for a namespace, indexed by the workers that may run them.

Dispatch used to look at every ready item, and ask every session with credit whether it
served it, on every wake: 200 runs queued for one busy one-slot worker turned a burst of 300
runs for the other workers from 1.7 s into 21.1 s, ``Session.serves`` taking 76 % of the
server (issue 16). Items are now kept in buckets by :data:`Key`, the (workflow, node,
definition hash) a worker must serve to run them; a session reaches its buckets through the
keys it serves (:meth:`ReadyItems.keys_for`; a node served with no hash reaches the buckets of
every hash of that node). What waits for other workers is never looked at: beside 200 runs
queued for a busy worker, bench/burst.py's burst now takes as long as alone (it took 1.2x on
this project's machine kind, 2 cores; its server CPU 0.74 s against 0.59, now the same).

**Serving order.** Every run has a turn: a number from one counter, given when the run enters
(it has no ready item yet) and again each time one of its items is served. The lowest turn is
the run that has waited longest since it was last served. Each bucket keeps its runs sorted by
turn, so a bucket's front run is the one whose turn comes first among the runs it holds, and
dispatch hands out from the bucket whose front comes first.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import typing
from collections.abc import Iterable, Iterator

from floxide_grpc._proto.floxide.v1 import work_item_pb2

__all__ = ["Key", "Queued", "ReadyItems", "key_of"]

Key = tuple[str, str, str]
"""What an item needs of a worker: its workflow, node and definition hash.

A session's keys are the nodes it serves; there an empty hash stands for every hash.
"""


def key_of(item: work_item_pb2.WorkItem) -> Key:
    """The key of the workers that may run an item."""
    return (item.workflow, item.node, item.definition_hash)


class Queued(typing.NamedTuple):
    """A queue entry: the item (with its input when it is fresh and small) and its revision."""

    item: work_item_pb2.WorkItem
    revision: int


class _Bucket:
    """The ready items of one key, by run; the runs sorted by turn."""

    def __init__(self) -> None:
        self.order: list[tuple[int, str]] = []  # (turn, run id)
        self.runs: dict[str, dict[str, Queued]] = {}

    def add(self, turn: int, queued: Queued) -> None:
        run_id = queued.item.run_id
        if run_id not in self.runs:
            self.runs[run_id] = {}
            bisect.insort(self.order, (turn, run_id))
        self.runs[run_id][queued.item.item_id] = queued

    def remove(self, turn: int, run_id: str, item_id: str) -> None:
        items = self.runs[run_id]
        del items[item_id]
        if not items:
            del self.runs[run_id]
            del self.order[bisect.bisect_left(self.order, (turn, run_id))]

    def move(self, turn: int, run_id: str, to: int) -> None:
        """The run's turn moves on, to the back."""
        del self.order[bisect.bisect_left(self.order, (turn, run_id))]
        self.order.append((to, run_id))


@dataclasses.dataclass
class _Run:
    turn: int
    keys: dict[str, Key] = dataclasses.field(default_factory=dict)  # item id -> its bucket's


class ReadyItems:
    """The ready items of one namespace, in buckets by key; runs in serving order.

    Every operation costs what it touches: an item added, removed or served; a bucket's front;
    the runs a scan asks for. None depends on how many items wait in other buckets.
    """

    def __init__(self) -> None:
        self._turns = itertools.count()
        self._runs: dict[str, _Run] = {}
        self._buckets: dict[Key, _Bucket] = {}
        self._hashes: dict[tuple[str, str], set[str]] = {}  # of each node's buckets

    def __bool__(self) -> bool:
        return bool(self._runs)

    def add(self, queued: Queued) -> None:
        """A ready item (again, or with a newer entry); a run new here enters at the back."""
        item = queued.item
        key = key_of(item)
        known = self._runs.get(item.run_id)
        if known is not None and known.keys.get(item.item_id, key) != key:
            self.remove(item.run_id, item.item_id)  # the same item under another key: moved
        run = self._runs.get(item.run_id)
        if run is None:
            run = self._runs[item.run_id] = _Run(next(self._turns))
        run.keys[item.item_id] = key
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            self._hashes.setdefault(key[:2], set()).add(key[2])
        bucket.add(run.turn, queued)

    def remove(self, run_id: str, item_id: str) -> None:
        """An item is no longer ready (claimed, or its run ended); a run with none is forgotten."""
        run = self._runs.get(run_id)
        key = run.keys.pop(item_id, None) if run is not None else None
        if run is None or key is None:
            return
        bucket = self._buckets[key]
        bucket.remove(run.turn, run_id, item_id)
        if not bucket.runs:
            del self._buckets[key]
            hashes = self._hashes[key[:2]]
            hashes.discard(key[2])
            if not hashes:
                del self._hashes[key[:2]]
        if not run.keys:
            del self._runs[run_id]

    def serve(self, queued: Queued) -> None:
        """An item is handed out: removed, and its run (if it has more) goes to the back."""
        run_id = queued.item.run_id
        self.remove(run_id, queued.item.item_id)
        run = self._runs.get(run_id)
        if run is not None:
            turn = next(self._turns)
            for key in set(run.keys.values()):
                self._buckets[key].move(run.turn, run_id, turn)
            run.turn = turn

    def clear(self, run_id: str = "") -> None:
        """Forget a run's items (to read them again), or every item."""
        if not run_id:
            self._runs.clear()
            self._buckets.clear()
            self._hashes.clear()
            return
        run = self._runs.get(run_id)
        if run is not None:
            for item_id in list(run.keys):
                self.remove(run_id, item_id)

    def keys_for(self, served: Iterable[Key]) -> set[Key]:
        """The keys with ready items that a worker serving ``served`` runs."""
        found = set()
        for workflow, node, definition_hash in served:
            if definition_hash:
                if (workflow, node, definition_hash) in self._buckets:
                    found.add((workflow, node, definition_hash))
            else:  # every hash of the node
                found.update((workflow, node, h) for h in self._hashes.get((workflow, node), ()))
        return found

    def front(self, key: Key) -> tuple[int, Queued] | None:
        """The turn of a key's front run, and that run's first item of the key."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        turn, run_id = bucket.order[0]
        return turn, next(iter(bucket.runs[run_id].values()))

    def scan(self, key: Key, runs: int) -> Iterator[tuple[int, Queued]]:
        """The items of a key's first ``runs`` runs, front first, each with its run's turn."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        for turn, run_id in bucket.order[:runs]:
            for queued in bucket.runs[run_id].values():
                yield turn, queued
