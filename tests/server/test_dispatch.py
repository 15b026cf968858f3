"""Dispatch's planning on its own (no etcd): what a wake looks at, whom it serves, in what order."""

from __future__ import annotations

import types
import typing

import pytest
from floxide_server.dispatch import Dispatcher
from floxide_server.ready import Queued, ReadyItems
from floxide_server.sessions import Credit, Session, Sessions
from floxide_server.store.claims import Claims
from floxide_server.watch import Watches

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2

NS = "ns"


def item(
    run_id: str, item_id: str, node: str = "echo", *, workflow: str = "quick", hash_: str = "h1"
) -> work_item_pb2.WorkItem:
    return work_item_pb2.WorkItem(
        namespace=NS,
        run_id=run_id,
        item_id=item_id,
        workflow=workflow,
        node=node,
        definition_hash=hash_,
        input=work_item_pb2.Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"1"),
    )


def session(lease: int, *served: tuple[str, str, str], credit: int = 1) -> Session:
    """A session of a worker serving these (workflow, node, definition hash): "" is any hash."""
    nodes = [records_pb2.ServedNode(workflow=w, node=n, definition_hash=h) for w, n, h in served]
    record = records_pb2.WorkerRecord(namespace=NS, nodes=nodes)
    return Session(lease, NS, record, Credit(credit, 1024))


def dispatcher(*sessions: Session) -> Dispatcher:
    live = types.SimpleNamespace(live={s.lease: s for s in sessions})
    return Dispatcher(
        typing.cast(Claims, None), typing.cast(Watches, None), typing.cast(Sessions, live)
    )


def wake(d: Dispatcher) -> list[tuple[int, str]]:
    """Plan one wake as dispatch does, taking each item's slot: (lease, item id) handed out."""
    plan = d._plan(NS)
    for taker, _ in plan:
        taker.credit.take()
    return [(taker.lease, queued.item.item_id) for taker, queued in plan]


class Watched:
    """A work item that notes each read of it, by its item id, in ``seen``."""

    def __init__(self, wrapped: work_item_pb2.WorkItem, seen: set[str]) -> None:
        self._wrapped = wrapped
        self._seen = seen

    def __getattr__(self, name: str) -> object:
        self._seen.add(self._wrapped.item_id)
        return getattr(self._wrapped, name)


def watched(wrapped: work_item_pb2.WorkItem, seen: set[str]) -> Queued:
    return Queued(typing.cast(work_item_pb2.WorkItem, Watched(wrapped, seen)), 1)


QUICK = ("quick", "echo", "")
HELD = ("held", "hold", "")


@pytest.mark.parametrize("waiting", [200, 2000])
def test_a_wake_looks_at_what_it_hands_out_not_at_what_waits_for_a_busy_worker(
    waiting: int,
) -> None:
    """Issue 16: every item queued for a busy one-slot worker was matched against every idle
    session on every wake. Now a wake reads only the items it hands out, however many wait."""
    busy, fast = session(1, HELD, credit=0), session(2, QUICK, credit=4)
    d = dispatcher(busy, fast)
    seen: set[str] = set()
    for n in range(waiting):  # queued first: the front runs
        d.give_back(NS, watched(item(f"held-{n}", f"hold-{n}", "hold", workflow="held"), seen))
    for n in range(3):
        d.give_back(NS, watched(item(f"quick-{n}", f"echo-{n}"), seen))
    seen.clear()
    assert wake(d) == [(2, "echo-0"), (2, "echo-1"), (2, "echo-2")]
    assert seen <= {"echo-0", "echo-1", "echo-2"}
    seen.clear()
    assert wake(d) == []  # credit left, nothing it serves
    assert seen == set()


def test_a_completion_takes_a_sibling_without_looking_at_what_waits_for_others() -> None:
    busy, fast = session(1, HELD, credit=0), session(2, QUICK, credit=0)
    d = dispatcher(busy, fast)
    seen: set[str] = set()
    for n in range(200):
        d.give_back(NS, watched(item(f"held-{n}", f"hold-{n}", "hold", workflow="held"), seen))
    d.give_back(NS, watched(item("quick", "echo"), seen))
    seen.clear()
    taken = d.take(fast)
    assert taken is not None and taken.item.item_id == "echo"
    assert seen == {"echo"}
    assert d.take(fast) is None
    d.give_back(NS, taken)  # its claim was not tried: dispatched again
    fast.credit.give_back()
    assert wake(d) == [(2, "echo")]


def test_a_node_served_with_no_hash_gets_every_hash_and_one_with_a_hash_only_its_own() -> None:
    pinned = session(1, ("quick", "echo", "h1"), credit=5)
    d = dispatcher(pinned)
    for run_id, hash_ in [("a", "h1"), ("b", "h2"), ("c", "h1")]:
        d.give_back(NS, Queued(item(run_id, f"{run_id}-1", hash_=hash_), 1))
    assert wake(d) == [(1, "a-1"), (1, "c-1")]
    assert d.take(pinned) is None  # b's hash is not its own
    anyhash = session(2, QUICK, credit=5)
    d.sessions.live[2] = anyhash
    assert wake(d) == [(2, "b-1")]
    assert pinned.serves(item("x", "y", hash_="h1")) and not pinned.serves(
        item("x", "y", hash_="h2")
    )
    assert anyhash.serves(item("x", "y", hash_="h2"))
    assert not anyhash.serves(item("x", "y", "other")) and not anyhash.serves(
        item("x", "y", workflow="other")
    )


def test_runs_take_turns_the_one_served_longest_ago_first() -> None:
    """One item per run in turn, whichever node each is of, in one wake or in many."""
    queued = [("A", "x"), ("A", "x"), ("A", "y"), ("B", "x"), ("C", "y")]
    order = ["A-0", "B-3", "C-4", "A-1", "A-2"]
    one = session(1, ("quick", "x", ""), ("quick", "y", ""), credit=5)
    d = dispatcher(one)
    for n, (run_id, node) in enumerate(queued):
        d.give_back(NS, Queued(item(run_id, f"{run_id}-{n}", node), 1))
    assert wake(d) == [(1, item_id) for item_id in order]
    one.credit.available = 1
    for n, (run_id, node) in enumerate(queued):
        d.give_back(NS, Queued(item(run_id, f"{run_id}-{n}", node), 1))
    for item_id in order:  # a wake at a time, one slot each
        assert wake(d) == [(1, item_id)]
        one.credit.give_back()


def test_a_run_that_waited_longest_goes_first_at_a_node_it_reaches_late() -> None:
    """A's item at x waits (no one serves x); B is served at y; then A gets an item at y:
    A has waited longest, so it goes before B's next item there."""
    at_y = session(1, ("quick", "y", ""), credit=1)
    d = dispatcher(at_y)
    d.give_back(NS, Queued(item("A", "A-x", "x"), 1))
    d.give_back(NS, Queued(item("B", "B-y1", "y"), 1))
    d.give_back(NS, Queued(item("B", "B-y2", "y"), 1))
    assert wake(d) == [(1, "B-y1")]
    d.give_back(NS, Queued(item("A", "A-y", "y"), 1))
    at_y.credit.give_back()
    assert wake(d) == [(1, "A-y")]


def test_credit_is_never_exceeded_and_a_draining_session_takes_nothing() -> None:
    two, three = session(1, QUICK, credit=2), session(2, QUICK, credit=3)
    draining = session(3, QUICK, credit=5)
    draining.draining = True
    d = dispatcher(two, three, draining)
    for n in range(10):
        d.give_back(NS, Queued(item(f"r{n}", f"i{n}"), 1))
    handed = wake(d)
    assert sorted(lease for lease, _ in handed) == [1, 1, 2, 2, 2]
    assert [i for _, i in handed] == [f"i{n}" for n in range(5)]  # the front runs
    assert wake(d) == []


def test_ready_items_forget_a_run_and_take_it_back_at_the_back() -> None:
    ready = ReadyItems()
    for run_id, node in [("A", "x"), ("A", "y"), ("B", "x")]:
        ready.add(Queued(item(run_id, f"{run_id}-{node}", node), 1))
    served = [("quick", "x", ""), ("quick", "y", "")]
    assert ready.keys_for(served) == {("quick", "x", "h1"), ("quick", "y", "h1")}
    ready.clear("A")
    assert ready.keys_for(served) == {("quick", "x", "h1")}
    ready.add(Queued(item("A", "A-x", "x"), 1))  # read again: after B
    front = ready.front(("quick", "x", "h1"))
    assert front is not None and front[1].item.run_id == "B"
    ready.remove("B", "B-x")
    ready.remove("A", "A-x")
    assert not ready and ready.keys_for(served) == set()
