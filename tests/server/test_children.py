"""Child runs in the store, on the in-memory KV and on a real etcd: each Txn of a child's life.

A nested workflow's item is never queued: the Txn that makes it ready starts its child run; the
child's end completes or fails the item in the child's own ending Txn; control crosses the link
both ways. Results are given as transitions, as a worker would report them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

import pytest
from floxide_server.firing import Firer
from floxide_server.store import Store, children, contexts, queue, retention, settling, stuck
from floxide_server.store.claims import Claim
from floxide_server.store.kv import KV, Delete, Put, Txn
from floxide_server.store.lifecycle import RunLifecycle
from floxide_server.store.payloads import Limits
from floxide_server.store.workflows import WorkflowStore

from floxide_grpc import (
    Backoff,
    ClaimLost,
    FailedPrecondition,
    InvalidDefinition,
    Merge,
    NextAll,
    RetryPolicy,
    Workflow,
    node,
    subworkflow,
)
from floxide_grpc._children import child_run_id
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from tests.server.test_store import Stores, abort, fan, js, nxt

RUNNING = records_pb2.RUN_STATUS_RUNNING
IN_PROGRESS = records_pb2.ITEM_STATUS_IN_PROGRESS
COMPLETED = records_pb2.ITEM_STATUS_COMPLETED


@dataclass
class Seen:
    tags: Annotated[list[str], Merge.APPEND] = None  # type: ignore[assignment]
    total: Annotated[int, Merge.ADD] = 0


@node
def prepare(x: int) -> int:
    return x


@node
def double(x: int) -> int:
    return 2 * x


@node
def finish(x: int) -> int:
    return x


@node
def split(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node(join=True)
def total(xs: list[int]) -> int:
    return sum(xs)


@node
def rescue(x: int) -> int:
    return -1


RETRY_ONCE = RetryPolicy(
    max_attempts=2, initial_backoff=timedelta(milliseconds=1), backoff=Backoff.FIXED, jitter=False
)

inner = Workflow("inner", start=double, context=Seen)


def parent(retry: RetryPolicy | None = None, timeout: timedelta | None = None) -> Workflow:
    """prepare -> nested(inner) -> finish."""
    nested = subworkflow(inner, name="nested").with_settings(retry=retry, timeout=timeout)
    return Workflow("outer", start=prepare, context=Seen).edge(prepare, nested).edge(nested, finish)


@pytest.fixture
async def stores(kv: KV) -> AsyncIterator[Stores]:
    limits = Limits(max_payload_bytes=4096)
    workflows = WorkflowStore(kv, limits)
    yield Stores(kv, f"ns-{uuid.uuid4().hex[:12]}", workflows, Store.open(kv, limits, workflows))


async def claim(stores: Stores, lease: int, run_id: str, node_name: str) -> Claim:
    """Claim the queued item of ``node_name`` in ``run_id``."""
    ready = [i for i in await queue.ready(stores.kv, stores.namespace) if i.run_id == run_id]
    found = [i for i in ready if i.node == node_name]
    assert found, f"no {node_name} of {run_id} is queued: {[i.node for i in ready]}"
    claimed = await stores.store.claims.claim(stores.namespace, lease, run_id, found[0].item_id)
    assert claimed is not None
    return claimed


async def step(
    stores: Stores,
    lease: int,
    run_id: str,
    node_name: str,
    transition: work_item_pb2.Transition,
    operations: list[work_item_pb2.ContextOperation] | None = None,
) -> Claim:
    claimed = await claim(stores, lease, run_id, node_name)
    await stores.store.completions.complete(
        stores.namespace, claimed.token, transition, operations or []
    )
    return claimed


async def run_of(stores: Stores, run_id: str) -> records_pb2.RunRecord:
    return await stores.store.reads.get(stores.namespace, run_id)


async def item_of(stores: Stores, run_id: str, node_name: str) -> records_pb2.WorkItemState:
    items, _ = await stores.store.reads.items(stores.namespace, run_id)
    [found] = [s for s in items if s.item.node == node_name]
    return found


async def fire(stores: Stores, after: float) -> int:
    clock = [0.0]
    firer = Firer(
        stores.kv, stores.namespace, None, 128, lambda: clock[0], lineage=stores.store.lineage
    )
    await firer.load()
    clock[0] = after
    return await firer.fire_due()


def tag(value: str) -> work_item_pb2.ContextOperation:
    return work_item_pb2.ContextOperation(
        field="tags", strategy=work_item_pb2.MERGE_STRATEGY_APPEND, value=js([value])
    )


async def test_the_predecessors_txn_starts_the_child_and_the_childs_end_completes_the_item(
    stores: Stores,
) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 5)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(5), [tag("parent")])

    waiting = await item_of(stores, run.run_id, "nested")
    child_id = child_run_id(run.run_id, waiting.item.item_id, 1)
    assert (waiting.status, waiting.attempts, waiting.child_run_id) == (IN_PROGRESS, 1, child_id)
    assert not [i for i in await queue.ready(stores.kv, stores.namespace) if i.node == "nested"]
    child = await run_of(stores, child_id)
    assert (child.status, child.workflow, child.parent.run_id, child.parent.item_id) == (
        RUNNING,
        "inner",
        run.run_id,
        waiting.item.item_id,
    )
    assert child.definition_hash == Graph(parent().definition()).child_hash("inner")
    # The child's context is a copy of the parent's, with the step's own operation in it.
    assert await stores.store.reads.context(stores.namespace, child_id) == {
        "tags": ["parent"],
        "total": 0,
    }

    await step(stores, lease, child_id, "double", nxt(10), [tag("child")])
    assert (await run_of(stores, child_id)).status == records_pb2.RUN_STATUS_COMPLETED
    done = await item_of(stores, run.run_id, "nested")
    assert (done.status, done.child_run_id) == (COMPLETED, child_id)
    # The child's changes stay its own.
    assert (await stores.store.reads.context(stores.namespace, run.run_id))["tags"] == ["parent"]
    finish_claim = await claim(stores, lease, run.run_id, "finish")
    assert json.loads(finish_claim.item.input.data) == 10
    await stores.store.completions.complete(stores.namespace, finish_claim.token, nxt(10))
    ended = await run_of(stores, run.run_id)
    assert ended.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(ended.output.data) == 10


async def test_a_child_that_fails_once_is_one_failed_attempt_and_a_retry_starts_a_new_child(
    stores: Stores,
) -> None:
    await stores.register(parent(retry=RETRY_ONCE))
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    first = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, first, "double", abort("boom"))

    assert (await run_of(stores, first)).status == records_pb2.RUN_STATUS_FAILED
    waiting = await item_of(stores, run.run_id, "nested")
    assert waiting.status == records_pb2.ITEM_STATUS_WAITING_RETRY
    assert "boom" in waiting.last_error.message and waiting.last_error.kind == 1
    with pytest.raises(FailedPrecondition, match="child run"):
        await stores.store.lifecycle.resume(stores.namespace, first)
    assert await fire(stores, after=1.0) == 1

    again = await item_of(stores, run.run_id, "nested")
    second = child_run_id(run.run_id, again.item.item_id, 2)
    assert (again.status, again.attempts, again.child_run_id) == (IN_PROGRESS, 2, second)
    assert second != first
    await step(stores, lease, second, "double", nxt(2))
    await step(stores, lease, run.run_id, "finish", nxt(2))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED
    children, _ = await stores.store.reads.list_runs(
        stores.namespace, [], "", 0, "", parent_run_id=run.run_id
    )
    assert {c.run_id for c in children} == {first, second}


async def test_a_child_that_fails_for_good_takes_the_fallback_edge(stores: Stores) -> None:
    nested = subworkflow(inner, name="nested")
    flow = Workflow("outer", start=prepare, context=Seen).edge(prepare, nested)
    flow.edge(nested, finish).on_failure(nested, rescue)
    await stores.register(flow)
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(3))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, child, "double", abort("no"))
    failed = await item_of(stores, run.run_id, "nested")
    assert failed.status == records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    rescued = await claim(stores, lease, run.run_id, "rescue")
    assert json.loads(rescued.item.input.data) == 3  # the item's original input


async def test_a_failed_parent_resumes_with_a_new_child_attempt(stores: Stores) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    first = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, first, "double", abort("boom"))
    failed = await run_of(stores, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED and "boom" in failed.error.message

    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    again = await item_of(stores, run.run_id, "nested")
    assert again.attempts == 2 and again.child_run_id not in ("", first)
    assert (await run_of(stores, again.child_run_id)).status == RUNNING
    await step(stores, lease, again.child_run_id, "double", nxt(2))
    await step(stores, lease, run.run_id, "finish", nxt(2))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED


async def test_cancelling_the_parent_cancels_the_child_and_settles_its_items(
    stores: Stores,
) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    held = await claim(stores, lease, child, "double")

    await stores.store.lifecycle.cancel(stores.namespace, run.run_id, "stop")
    cancelled = await run_of(stores, child)
    assert cancelled.status == records_pb2.RUN_STATUS_CANCELLED
    assert run.run_id in cancelled.error.message
    settled = await item_of(stores, child, "double")
    assert settled.status == records_pb2.ITEM_STATUS_CANCELLED
    assert (await item_of(stores, run.run_id, "nested")).status == records_pb2.ITEM_STATUS_CANCELLED
    assert (await stores.kv.range(stores.keys.claim(lease)))[0] == []  # the slot came back
    with pytest.raises(ClaimLost, match="was cancelled"):
        await stores.store.completions.complete(stores.namespace, held.token, nxt(2))


async def test_cancelling_a_child_cancels_its_parent(stores: Stores) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id

    await stores.store.lifecycle.cancel(stores.namespace, child, "enough")
    ended = await run_of(stores, run.run_id)
    assert ended.status == records_pb2.RUN_STATUS_CANCELLED
    assert child in ended.error.message and "enough" in ended.error.message
    assert (await item_of(stores, run.run_id, "nested")).status == records_pb2.ITEM_STATUS_CANCELLED


async def test_pause_and_resume_of_the_parent_reach_the_child(stores: Stores) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    await stores.store.lifecycle.pause(stores.namespace, run.run_id)
    assert (await run_of(stores, child)).status == records_pb2.RUN_STATUS_PAUSED
    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    assert (await run_of(stores, child)).status == RUNNING


async def test_a_fan_out_of_60_nested_workflows_joins_every_childs_output(stores: Stores) -> None:
    nested = subworkflow(inner, name="nested")
    flow = Workflow("wide", start=split, context=Seen).edge(split, nested).edge(nested, total)
    await stores.register(flow)
    run = await stores.start("wide", 60)
    lease = await stores.session(ttl=120)
    await step(stores, lease, run.run_id, "split", fan(*range(60)))

    children, _ = await stores.store.reads.list_runs(
        stores.namespace, [], "", 1000, "", parent_run_id=run.run_id
    )
    assert len(children) == 60 and {c.status for c in children} == {RUNNING}
    listed, _ = await stores.store.reads.list_runs(stores.namespace, [], "", 1000, "")
    assert [r.run_id for r in listed] == [run.run_id]  # children hidden unless asked
    for child in children:
        value = json.loads(child.input.data)
        await step(stores, lease, child.run_id, "double", nxt(2 * value))
    joined = await claim(stores, lease, run.run_id, "total")
    assert json.loads(joined.item.input.data) == [2 * i for i in range(60)]
    await stores.store.completions.complete(stores.namespace, joined.token, nxt(3540))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED


async def test_the_node_timeout_bounds_the_child_run_as_a_whole(stores: Stores) -> None:
    await stores.register(parent(timeout=timedelta(seconds=5)))
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    assert (await run_of(stores, child)).run_timeout.ToMilliseconds() == 5000
    assert await fire(stores, after=4.0) == 0
    assert await fire(stores, after=5.0) == 1
    assert (await run_of(stores, child)).status == records_pb2.RUN_STATUS_TIMED_OUT
    failed = await item_of(stores, run.run_id, "nested")
    assert failed.status == records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    assert failed.last_error.kind == work_item_pb2.ERROR_KIND_TIMEOUT
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_FAILED


async def test_a_nested_start_node_starts_its_child_in_the_runs_own_start(stores: Stores) -> None:
    deeper = subworkflow(inner, name="deeper")
    middle = Workflow("middle", start=deeper, context=Seen)
    top = Workflow("top", start=subworkflow(middle, name="mid"), context=Seen)
    await stores.register(top)
    run = await stores.start("top", 4)
    mid = await item_of(stores, run.run_id, "mid")
    grandchild = await item_of(stores, mid.child_run_id, "deeper")
    assert grandchild.status == IN_PROGRESS
    lease = await stores.session()
    await step(stores, lease, grandchild.child_run_id, "double", nxt(8))
    # The innermost end completes every level, in one Txn.
    assert (await run_of(stores, mid.child_run_id)).status == records_pb2.RUN_STATUS_COMPLETED
    done = await run_of(stores, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == 8


async def test_a_stuck_child_fails_its_parents_item(stores: Stores) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    # A marker lost by hand: the reconciler finds the child stuck.
    item = await item_of(stores, child, "double")
    await stores.kv.txn(
        Txn(
            [],
            [
                Delete(stores.keys.queue(child, item.item.item_id)),
                Delete(stores.keys.live(child, item.item.item_id)),
            ],
        )
    )
    state = records_pb2.WorkItemState()
    state.CopyFrom(item)
    state.status = records_pb2.ITEM_STATUS_COMPLETED
    await stores.kv.txn(
        Txn([], [Put(stores.keys.item(child, item.item.item_id), state.SerializeToString())])
    )
    assert await stuck.fail_stuck(stores.kv, stores.namespace, 0, 128, stores.store.lineage) == 1
    failed = await item_of(stores, run.run_id, "nested")
    assert failed.status == records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_FAILED


async def test_retention_removes_children_with_their_parent(stores: Stores) -> None:
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, child, "double", nxt(2))
    await step(stores, lease, run.run_id, "finish", nxt(2))
    assert await retention.remove_finished(stores.kv, stores.namespace, 2**62) == 1
    assert await stores.kv.get(stores.keys.run_info(child)) is None
    assert (await stores.kv.range(stores.keys.run(child)))[0] == []


def test_a_field_both_declare_must_agree() -> None:
    @dataclass
    class Other:
        tags: Annotated[list[str], Merge.REPLACE] = None  # type: ignore[assignment]

    nested = subworkflow(Workflow("other", start=double, context=Other), name="nested")
    flow = Workflow("outer", start=prepare, context=Seen).edge(prepare, nested)
    with pytest.raises(InvalidDefinition, match="context field 'tags'"):
        flow.definition()


def test_child_ids_are_derived_and_sort_with_their_parent() -> None:
    parent_id = str(uuid.UUID(int=(0x0190_0000_0000 << 80) | (7 << 76) | (2 << 62)))
    first = child_run_id(parent_id, "item", 1)
    assert first == child_run_id(parent_id, "item", 1) != child_run_id(parent_id, "item", 2)
    assert first[:13] == parent_id[:13] and uuid.UUID(first).version == 8
    assert len(first) == len(parent_id)


@node
def fork_two(x: int) -> int:
    return x


@node
def left(x: int) -> int:
    return x


@node
def right(x: int) -> int:
    return x


async def test_a_child_ended_by_one_of_two_branches_is_settled_by_that_step(stores: Stores) -> None:
    two = Workflow("two_ends", start=fork_two).edge(fork_two, [left, right])
    nested = subworkflow(two, name="nested")
    await stores.register(Workflow("outer_two", start=nested))
    run = await stores.start("outer_two", 1)
    child = (await item_of(stores, run.run_id, "nested")).child_run_id
    lease = await stores.session()
    await step(stores, lease, child, "fork_two", nxt(1))
    await step(stores, lease, child, "left", nxt(1))
    # The child's own leftover (right, still queued) is settled by the step that ended it.
    assert (await item_of(stores, child, "right")).status == records_pb2.ITEM_STATUS_CANCELLED
    assert await stores.kv.get(stores.keys.settle(child)) is None
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED


@dataclass
class Big:
    blob: Annotated[str, Merge.REPLACE] = ""


@node
def fan_four(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
def small(x: int) -> int:
    return x


@node(join=True)
def all_of(xs: list[int]) -> int:
    return sum(xs)


async def test_children_copying_a_large_context_are_started_in_txns_under_the_request_limit(
    stores: Stores,
) -> None:
    """Four copies of a 400 KB context pass etcd's 1.5 MiB request limit in one Txn: the
    fan-out is expanded, a few children per Txn."""
    nested = subworkflow(Workflow("small_inner", start=small, context=Big), name="nested")
    flow = Workflow("big_outer", start=fan_four, context=Big).edge(fan_four, nested)
    flow.edge(nested, all_of)
    await stores.register(flow)
    run, _ = await stores.store.lifecycle.start(
        stores.namespace, "big_outer", "", js(4), "", js({"blob": "x" * 400_000})
    )
    lease = await stores.session()
    await step(stores, lease, run.run_id, "fan_four", fan(0, 1, 2, 3))
    children, _ = await stores.store.reads.list_runs(
        stores.namespace, [], "", 0, "", parent_run_id=run.run_id
    )
    assert len(children) == 4
    for child in children:
        context = await stores.store.reads.context(stores.namespace, child.run_id)
        assert len(context["blob"]) == 400_000
        await step(stores, lease, child.run_id, "small", nxt(json.loads(child.input.data)))
    await step(stores, lease, run.run_id, "all_of", nxt(6))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED


# -- races, made to happen ----------------------------------------------------------------------


async def test_an_expansion_chunk_whose_context_moved_is_made_again_not_dropped(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sibling's context operation lands between a chunk's read and its Txn: the chunk's
    guard fails, and the expansion tries it again from fresh reads; every child is made."""
    nested = subworkflow(inner, name="nested")
    flow = Workflow("wide", start=split, context=Seen).edge(split, nested).edge(nested, total)
    await stores.register(flow)
    run = await stores.start("wide", 60)
    lease = await stores.session(ttl=120)
    reads = [0]
    real = children.inherited

    async def racing(kv: KV, keys: Any, definition: Any, run_id: str) -> children.Inherited:
        read = await real(kv, keys, definition, run_id)
        reads[0] += 1
        if reads[0] == 3:  # the first chunk's read (after the step's and the sizing's)
            op = contexts.record_operations(keys, run_id, "sibling", [tag("x")], 1)
            await kv.txn(Txn([], [op]))
        return read

    monkeypatch.setattr(children, "inherited", racing)
    await step(stores, lease, run.run_id, "split", fan(*range(60)))
    assert reads[0] > 3, "the race happened"
    kids, _ = await stores.store.reads.list_runs(
        stores.namespace, [], "", 1000, "", parent_run_id=run.run_id
    )
    assert len(kids) == 60
    assert (await stores.kv.range(stores.keys.expansion(run.run_id, "")))[0] == []


async def test_a_child_ending_while_its_failed_parent_is_resumed_is_taken_once_it_runs(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume starts the new child before the parent runs again; a worker quicker than the
    resume's last Txn ends the child in between. The resume then takes the child's end."""
    await stores.register(parent())
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    first = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, first, "double", abort("boom"))
    real = RunLifecycle._set_status

    async def quick_worker(
        self: RunLifecycle, namespace: str, run_id: str, *a: Any, **k: Any
    ) -> Any:
        if run_id == run.run_id:
            again = await item_of(stores, run.run_id, "nested")
            await step(stores, lease, again.child_run_id, "double", nxt(2))
        return await real(self, namespace, run_id, *a, **k)

    monkeypatch.setattr(RunLifecycle, "_set_status", quick_worker)
    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    taken = await item_of(stores, run.run_id, "nested")
    assert (taken.status, taken.attempts) == (COMPLETED, 2)
    await step(stores, lease, run.run_id, "finish", nxt(2))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_COMPLETED


async def test_cancelling_an_earlier_attempts_child_leaves_the_parent_alone(
    stores: Stores,
) -> None:
    await stores.register(parent(retry=RETRY_ONCE))
    run = await stores.start("outer", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    first = (await item_of(stores, run.run_id, "nested")).child_run_id
    await step(stores, lease, first, "double", abort("boom"))
    await fire(stores, after=1.0)
    second = (await item_of(stores, run.run_id, "nested")).child_run_id
    await stores.store.lifecycle.cancel(stores.namespace, first, "cleanup")
    assert (await run_of(stores, first)).status == records_pb2.RUN_STATUS_CANCELLED
    assert (await run_of(stores, run.run_id)).status == RUNNING
    assert (await run_of(stores, second)).status == RUNNING


@node
def boom(x: int) -> int:
    return x


async def test_a_resume_after_cut_short_settling_cancels_the_child_it_starts_anew(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent failed (another branch) but its settling was cut short (a crash): its nested
    item still waits for a running child. Resuming it starts the item's next child and cancels
    the old one, in the same Txn: no child is left running unattached."""
    nested = subworkflow(inner, name="nested")
    flow = Workflow("forked", start=prepare, context=Seen).edge(prepare, [nested, boom])
    await stores.register(flow)
    run = await stores.start("forked", 1)
    lease = await stores.session()
    await step(stores, lease, run.run_id, "prepare", nxt(1))
    old = (await item_of(stores, run.run_id, "nested")).child_run_id

    async def crashed(*_: Any, **__: Any) -> bool:
        return False

    with monkeypatch.context() as patched:
        patched.setattr(settling, "settle", crashed)
        await step(stores, lease, run.run_id, "boom", abort("the other branch"))
    assert (await run_of(stores, run.run_id)).status == records_pb2.RUN_STATUS_FAILED
    assert (await run_of(stores, old)).status == RUNNING  # settling never reached it

    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    again = await item_of(stores, run.run_id, "nested")
    assert again.attempts == 2 and again.child_run_id != old
    cancelled = await run_of(stores, old)
    assert cancelled.status == records_pb2.RUN_STATUS_CANCELLED
    assert "runs its item again" in cancelled.error.message
    assert (await run_of(stores, again.child_run_id)).status == RUNNING
