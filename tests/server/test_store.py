"""The stores' behaviour, on the in-memory KV and on a real etcd: one suite, both backends."""

from __future__ import annotations

import asyncio
import json
import typing
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

import pytest
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.firing import Firer
from floxide_server.store import Store, fanout, queue, retention, settling, stuck
from floxide_server.store.claims import Claim
from floxide_server.store.completion import Completion, Sticky
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Delete, Put, Txn
from floxide_server.store.payloads import Limits
from floxide_server.store.workflows import WorkflowStore

from floxide_grpc import (
    AlreadyExists,
    Backoff,
    ClaimLost,
    FailedPrecondition,
    InvalidDefinition,
    InvalidPayload,
    Merge,
    NextAll,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    Workflow,
    WorkflowNotFound,
    node,
)
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc.errors import SessionEnded

Payload = work_item_pb2.Payload
Transition = work_item_pb2.Transition


def js(value: Any) -> Payload:
    return Payload(encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode())


def nxt(value: Any) -> Transition:
    return Transition(next=Transition.Next(output=js(value)))


def fan(*values: Any) -> Transition:
    return Transition(next_all=Transition.NextAll(outputs=[js(v) for v in values]))


def abort(message: str) -> Transition:
    return Transition(
        abort=work_item_pb2.NodeError(kind=work_item_pb2.ERROR_KIND_GENERIC, message=message)
    )


@dataclass
class Tally:
    total: Annotated[int, Merge.ADD] = 0


@node
def inc(x: int) -> int:
    return x + 1


@node
def show(x: int) -> str:
    return str(x)


@node
def split(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node(join=True)
def gather(xs: list[int]) -> int:
    return sum(xs)


@node(
    retry=RetryPolicy(
        max_attempts=2,
        initial_backoff=timedelta(milliseconds=1),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
def flaky(x: int) -> int:
    return x


@node
def rescue(x: int) -> str:
    return "rescued"


def chain() -> Workflow:
    return Workflow("chain", start=inc, context=Tally).edge(inc, show)


@dataclass
class Stores:
    kv: KV
    namespace: str
    workflows: WorkflowStore
    store: Store

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    async def register(self, flow: Workflow) -> str:
        definition_hash, _ = await self.workflows.register(self.namespace, flow.definition())
        return definition_hash

    async def start(self, workflow: str, value: Any, key: str = "") -> records_pb2.RunRecord:
        run, _ = await self.store.lifecycle.start(
            self.namespace, workflow, "", js(value), key, None
        )
        return run

    async def session(self, ttl: int = 30) -> int:
        lease = await self.kv.grant(ttl)
        await self.kv.txn(Txn([], [Put(self.keys.session(lease), b"worker", lease)]))
        return lease

    async def claim_next(self, lease: int) -> Claim:
        ready = await queue.ready(self.kv, self.namespace)
        assert ready, "nothing is ready"
        claim = await self.store.claims.claim(
            self.namespace, lease, ready[0].run_id, ready[0].item_id
        )
        assert claim is not None
        return claim

    async def complete_next(self, lease: int, transition: Transition) -> Completion:
        """Claim the next ready item for a session and complete it with ``transition``."""
        claim = await self.claim_next(lease)
        return await self.store.completions.complete(self.namespace, claim.token, transition)

    async def fire_timers(self, after: float) -> int:
        """Fire the timers due ``after`` seconds after the firer first saw them."""
        clock = [0.0]
        firer = Firer(self.kv, self.namespace, None, Limits().max_txn_ops, lambda: clock[0])
        await firer.load()
        clock[0] = after
        return await firer.fire_due()

    async def state(self, run_id: str) -> dict[str, tuple[int, int]]:
        items, _ = await self.store.reads.items(self.namespace, run_id)
        return {s.item.node: (s.status, s.attempts) for s in items}


@pytest.fixture
async def stores(kv: KV) -> AsyncIterator[Stores]:
    limits = Limits(max_payload_bytes=4096)
    workflows = WorkflowStore(kv, limits)
    yield Stores(kv, f"ns-{uuid.uuid4().hex[:12]}", workflows, Store.open(kv, limits, workflows))


# -- workflows ---------------------------------------------------------------------------------


async def test_register_is_idempotent_by_content_hash(stores: Stores) -> None:
    first = await stores.workflows.register(stores.namespace, chain().definition())
    again = await stores.workflows.register(stores.namespace, chain().definition())
    assert first[1] and not again[1] and first[0] == again[0]
    record = await stores.workflows.record(stores.namespace, "chain")
    assert record.definition_hash == first[0] and record.definition == chain().definition()
    listed, token = await stores.workflows.list_workflows(stores.namespace, 0, "")
    assert [(w.name, w.definition_hash) for w in listed] == [("chain", first[0])] and token == ""


async def test_an_invalid_definition_is_refused_and_nothing_is_stored(stores: Stores) -> None:
    definition = chain().definition()
    definition.edges[0].targets[0] = "nowhere"
    with pytest.raises(InvalidDefinition, match="edge from 'inc' to unknown node 'nowhere'"):
        await stores.workflows.register(stores.namespace, definition)
    definition = chain().definition()
    definition.nodes[0].input_schema = '{"type": 12}'
    with pytest.raises(InvalidDefinition, match="node 'inc' input schema"):
        await stores.workflows.register(stores.namespace, definition)
    assert await stores.workflows.list_workflows(stores.namespace, 0, "") == ([], "")


# -- starting ----------------------------------------------------------------------------------


async def test_a_start_uses_the_definition_another_replica_just_registered(
    stores: Stores,
) -> None:
    first_hash = await stores.register(chain())
    first = await stores.start("chain", 1)  # this replica now knows "chain" -> first_hash
    other = WorkflowStore(stores.kv, stores.store.limits)  # another replica
    second_hash, _ = await other.register(
        stores.namespace, Workflow("chain", start=inc).definition()
    )
    second = await stores.start("chain", 1)
    assert (first.definition_hash, second.definition_hash) == (first_hash, second_hash)
    assert first_hash != second_hash
    with pytest.raises(WorkflowNotFound):
        await stores.store.lifecycle.start(stores.namespace, "other", second_hash, js(1), "", None)


async def test_start_queues_the_first_item(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    assert run.status == records_pb2.RUN_STATUS_RUNNING
    assert (await stores.store.reads.get(stores.namespace, run.run_id)) == run
    assert [(i.node, i.run_id) for i in await queue.ready(stores.kv, stores.namespace)] == [
        ("inc", run.run_id)
    ]
    assert await stores.state(run.run_id) == {"inc": (records_pb2.ITEM_STATUS_PENDING, 0)}


async def test_idempotency_key_returns_the_same_run_or_refuses_other_input(stores: Stores) -> None:
    await stores.register(chain())
    first, created = await stores.store.lifecycle.start(
        stores.namespace, "chain", "", js(1), "order-9", None
    )
    again, created_again = await stores.store.lifecycle.start(
        stores.namespace, "chain", "", js(1), "order-9", None
    )
    assert created and not created_again and again.run_id == first.run_id
    with pytest.raises(AlreadyExists, match="idempotency key 'order-9' already started run"):
        await stores.store.lifecycle.start(stores.namespace, "chain", "", js(2), "order-9", None)
    runs, _ = await stores.store.reads.list_runs(stores.namespace, [], "", 0, "")
    assert [r.run_id for r in runs] == [first.run_id]


async def test_bad_starts_are_refused_and_change_nothing(stores: Stores) -> None:
    await stores.register(chain())
    with pytest.raises(WorkflowNotFound, match="workflow 'nope' is not registered"):
        await stores.start("nope", 1)
    with pytest.raises(InvalidPayload, match="'one' is not of type 'integer'"):
        await stores.start("chain", "one")
    with pytest.raises(InvalidPayload, match="not valid JSON"):
        broken = Payload(encoding=work_item_pb2.ENCODING_JSON, data=b"{x")
        await stores.store.lifecycle.start(stores.namespace, "chain", "", broken, "", None)
    with pytest.raises(ResourceExhausted, match="over the limit of 4096"):
        await stores.store.lifecycle.start(stores.namespace, "chain", "", js("x" * 5000), "", None)
    with pytest.raises(InvalidPayload, match="context field 'missing' is not declared"):
        await stores.store.lifecycle.start(
            stores.namespace, "chain", "", js(1), "", js({"missing": 1})
        )
    assert await stores.store.reads.list_runs(stores.namespace, [], "", 0, "") == ([], "")
    assert await queue.ready(stores.kv, stores.namespace) == []


# -- claiming and completing ---------------------------------------------------------------------


async def test_a_chain_runs_to_completion_with_context_operations(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    claim = await stores.claim_next(lease)
    assert claim.item.node == "inc" and json.loads(claim.item.input.data) == 1
    assert json.loads(claim.context.data) == {"total": 0}
    add = work_item_pb2.ContextOperation(
        field="total", strategy=work_item_pb2.MERGE_STRATEGY_ADD, value=js(5)
    )
    assert (
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(2), [add])
    ).code == 0
    claim = await stores.claim_next(lease)
    assert claim.item.node == "show" and json.loads(claim.context.data) == {"total": 5}
    await stores.store.completions.complete(stores.namespace, claim.token, nxt("2"))
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == "2"
    assert await stores.store.reads.context(stores.namespace, run.run_id) == {"total": 5}
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert (metrics.total_work_items, metrics.completed, metrics.pending) == (2, 2, 0)


async def test_results_are_fenced_by_claim_and_session(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    claim = await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, claim.token, nxt(2))
    with pytest.raises(AlreadyExists, match="already applied"):
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(2))
    forged = claim.token.replace(":1:", ":9:")
    with pytest.raises(ClaimLost):
        await stores.store.completions.complete(stores.namespace, forged, nxt(2))
    second = await stores.claim_next(lease)
    await stores.kv.revoke(lease)  # the worker's session ends before it reports
    with pytest.raises(ClaimLost):
        await stores.store.completions.complete(stores.namespace, second.token, nxt("2"))
    assert (
        await stores.store.reads.get(stores.namespace, run.run_id)
    ).status == records_pb2.RUN_STATUS_RUNNING
    assert (await stores.state(run.run_id))["show"] == (records_pb2.ITEM_STATUS_IN_PROGRESS, 1)
    assert (
        await stores.store.claims.claim(stores.namespace, lease, run.run_id, second.item.item_id)
        is None
    )


def serves_all(item: work_item_pb2.WorkItem) -> bool:
    return True


async def test_a_sticky_completion_claims_the_successor_in_the_same_txn(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    first = await stores.claim_next(lease)
    assert first.snapshot is not None and first.snapshot.depth == 0
    add = work_item_pb2.ContextOperation(
        field="total", strategy=work_item_pb2.MERGE_STRATEGY_ADD, value=js(5)
    )
    completion = await stores.store.completions.complete(
        stores.namespace,
        first.token,
        nxt(2),
        [add],
        snapshot=first.snapshot,
        sticky=Sticky(lease, serves_all),
    )
    second = completion.claim
    assert completion.code == 0 and second is not None
    assert second.item.node == "show" and json.loads(second.item.input.data) == 2
    assert json.loads(second.context.data) == {"total": 5}  # the Txn read its own write
    assert second.snapshot is not None and second.snapshot.depth == 1
    assert await queue.ready(stores.kv, stores.namespace) == []  # never queued
    assert (await stores.state(run.run_id))["show"] == (records_pb2.ITEM_STATUS_IN_PROGRESS, 1)
    last = await stores.store.completions.complete(
        stores.namespace,
        second.token,
        nxt("2"),
        snapshot=second.snapshot,
        sticky=Sticky(lease, serves_all),
    )
    assert last.code == 0 and last.claim is None
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == "2"
    with pytest.raises(AlreadyExists):
        await stores.store.completions.complete(stores.namespace, second.token, nxt("2"))


async def test_a_successor_the_session_does_not_serve_is_queued(stores: Stores) -> None:
    await stores.register(chain())
    await stores.start("chain", 1)
    lease = await stores.session()
    first = await stores.claim_next(lease)
    completion = await stores.store.completions.complete(
        stores.namespace,
        first.token,
        nxt(2),
        snapshot=first.snapshot,
        sticky=Sticky(lease, lambda item: item.node != "show"),
    )
    assert completion.claim is None
    assert [i.node for i in await queue.ready(stores.kv, stores.namespace)] == ["show"]


async def test_a_stale_snapshot_costs_a_retry_and_a_paused_run_is_not_sticky(
    stores: Stores,
) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    first = await stores.claim_next(lease)
    await stores.store.lifecycle.pause(
        stores.namespace, run.run_id
    )  # the snapshot's run record is stale
    completion = await stores.store.completions.complete(
        stores.namespace,
        first.token,
        nxt(2),
        snapshot=first.snapshot,
        sticky=Sticky(lease, serves_all),
    )
    assert completion.code == 0 and completion.claim is None  # applied, successor held back
    assert (await stores.state(run.run_id))["show"] == (records_pb2.ITEM_STATUS_PENDING, 0)
    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    second = await stores.claim_next(lease)
    await stores.store.lifecycle.pause(stores.namespace, run.run_id)
    await stores.store.lifecycle.resume(stores.namespace, run.run_id)  # stale again, but running
    last = await stores.store.completions.complete(
        stores.namespace, second.token, nxt("2"), snapshot=second.snapshot
    )
    assert last.code == 0
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED


async def test_sticky_fan_out_keeps_one_branch_and_the_last_arrival_claims_the_join(
    stores: Stores,
) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 3)
    lease = await stores.session()
    sticky = Sticky(lease, serves_all)
    start = await stores.claim_next(lease)
    fanned = await stores.store.completions.complete(
        stores.namespace, start.token, fan(10, 20, 30), snapshot=start.snapshot, sticky=sticky
    )
    assert fanned.claim is not None and fanned.claim.item.node == "inc"
    assert len(await queue.ready(stores.kv, stores.namespace)) == 2
    branches = [fanned.claim, await stores.claim_next(lease), await stores.claim_next(lease)]
    joins = []
    for claim in branches:
        value = json.loads(claim.item.input.data) + 1
        completion = await stores.store.completions.complete(
            stores.namespace, claim.token, nxt(value), snapshot=claim.snapshot, sticky=sticky
        )
        joins.append(completion.claim)
    assert joins[:2] == [None, None]
    join = joins[2]
    assert join is not None and join.item.node == "gather"
    assert json.loads(join.item.input.data) == [11, 21, 31]  # read in this Txn, index order
    await stores.store.completions.complete(
        stores.namespace, join.token, nxt(63), snapshot=join.snapshot
    )
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == 63


async def test_a_fresh_item_is_claimed_from_its_queue_entry_and_a_stale_entry_loses(
    stores: Stores,
) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 7)
    [entry], _ = await stores.kv.range(stores.keys.queue())
    fresh = (work_item_pb2.WorkItem.FromString(entry.value), entry.mod_revision)
    assert json.loads(fresh[0].input.data) == 7  # the input rides in a fresh item's entry
    lease = await stores.session()
    claim = await stores.store.claims.claim(
        stores.namespace, lease, run.run_id, fresh[0].item_id, queued=fresh
    )
    assert claim is not None and json.loads(claim.item.input.data) == 7
    await stores.kv.revoke(lease)  # its worker is lost: the item goes back, as attempt 2
    assert await stores.store.claims.release(stores.namespace, lease, run.run_id, fresh[0].item_id)
    [again], _ = await stores.kv.range(stores.keys.queue())
    requeued = work_item_pb2.WorkItem.FromString(again.value)
    assert not requeued.HasField("input")  # not fresh: its state must be read
    other = await stores.session()
    stale = await stores.store.claims.claim(
        stores.namespace, other, run.run_id, fresh[0].item_id, queued=fresh
    )
    assert stale is None  # the old entry's revision no longer matches the state
    claim = await stores.store.claims.claim(
        stores.namespace, other, run.run_id, fresh[0].item_id, queued=(requeued, again.mod_revision)
    )
    assert claim is not None and claim.item.attempt == 2
    assert json.loads(claim.item.input.data) == 7


async def queued(stores: Stores) -> list[tuple[work_item_pb2.WorkItem, int]]:
    found, _ = await stores.kv.range(stores.keys.queue())
    return [(work_item_pb2.WorkItem.FromString(kv.value), kv.mod_revision) for kv in found]


async def test_a_result_without_a_successor_claims_a_queued_sibling_in_its_txn(
    stores: Stores,
) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 4)
    lease = await stores.session()
    start = await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, start.token, fan(10, 20, 30, 40))
    first = await stores.claim_next(lease)
    waiting = await queued(stores)
    taken: list[object] = []
    given_back: list[object] = []

    def take() -> tuple[work_item_pb2.WorkItem, int] | None:
        taken.append(waiting[0])
        return waiting[0]

    sticky = Sticky(lease, serves_all, take=take, give_back=given_back.append)
    completion = await stores.store.completions.complete(
        stores.namespace, first.token, nxt(11), snapshot=first.snapshot, sticky=sticky
    )
    sibling = completion.claim
    assert completion.code == 0 and sibling is not None and given_back == []
    assert sibling.item.item_id == waiting[0][0].item_id
    assert json.loads(sibling.item.input.data) == json.loads(waiting[0][0].input.data)
    left = [q[0].item_id for q in await queued(stores)]
    assert left == [waiting[1][0].item_id, waiting[2][0].item_id]
    # An entry that changed since it was taken: the completion applies, the sibling is not
    # claimed (its nested Txn fails alone).
    stale = (waiting[1][0], waiting[1][1] - 1)
    completion = await stores.store.completions.complete(
        stores.namespace,
        sibling.token,
        nxt(21),
        snapshot=sibling.snapshot,
        sticky=Sticky(lease, serves_all, take=lambda: stale, give_back=given_back.append),
    )
    assert completion.code == 0 and completion.claim is None and given_back == []
    third = await stores.claim_next(lease)
    stale = (waiting[2][0], waiting[2][1] - 1)
    await stores.kv.revoke(lease)  # a result that is not applied gives its taken item back
    with pytest.raises(ClaimLost):
        await stores.store.completions.complete(
            stores.namespace,
            third.token,
            nxt(31),
            snapshot=third.snapshot,
            sticky=Sticky(lease, serves_all, take=lambda: stale, give_back=given_back.append),
        )
    assert given_back == [stale]
    assert (await stores.store.reads.get(stores.namespace, run.run_id)).status == (
        records_pb2.RUN_STATUS_RUNNING
    )


async def test_a_result_that_fails_its_run_takes_no_sibling(stores: Stores) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 3)
    lease = await stores.session()
    start = await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, start.token, fan(10, 20, 30))
    branch = await stores.claim_next(lease)
    waiting = await queued(stores)
    taken: list[object] = []

    def take() -> tuple[work_item_pb2.WorkItem, int] | None:
        taken.append(waiting[0])
        return waiting[0]

    completion = await stores.store.completions.complete(
        stores.namespace,
        branch.token,
        abort("boom"),  # no retry policy, no fallback: the run fails
        snapshot=branch.snapshot,
        sticky=Sticky(lease, serves_all, take=take),
    )
    assert completion.claim is None and taken == []
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    assert await queued(stores) == []  # the failed run's queue is cleared, nothing claimed


async def test_only_one_session_wins_a_claim(stores: Stores) -> None:
    await stores.register(chain())
    await stores.start("chain", 1)
    first, second = await stores.session(), await stores.session()
    [item] = await queue.ready(stores.kv, stores.namespace)
    won = await stores.store.claims.claim(stores.namespace, first, item.run_id, item.item_id)
    lost = await stores.store.claims.claim(stores.namespace, second, item.run_id, item.item_id)
    assert won is not None and lost is None


async def test_a_session_that_ended_claims_nothing_and_the_item_stays_queued(
    stores: Stores,
) -> None:
    await stores.register(chain())
    await stores.start("chain", 1)
    lease = await stores.session()
    [item] = await queue.ready(stores.kv, stores.namespace)
    await stores.kv.revoke(lease)
    with pytest.raises(SessionEnded):  # dispatch gives the item back for another session
        await stores.store.claims.claim(stores.namespace, lease, item.run_id, item.item_id)
    assert [i.item_id for i in await queue.ready(stores.kv, stores.namespace)] == [item.item_id]


async def test_a_fan_out_joins_once_in_index_order(stores: Stores) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 3)
    lease = await stores.session()
    await stores.complete_next(lease, fan(10, 20, 30))
    branches = [await stores.claim_next(lease) for _ in range(3)]
    for claim in reversed(branches):  # arrive out of order
        value = json.loads(claim.item.input.data) + 1
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(value))
    join = await stores.claim_next(lease)
    assert join.item.node == "gather" and json.loads(join.item.input.data) == [11, 21, 31]
    await stores.store.completions.complete(stores.namespace, join.token, nxt(63))
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == 63


class Rival:
    """Stands for another replica that wins every race for one key: each transaction guarded by
    that key finds it rewritten just before it runs (etcd and MemoryKV cannot lose a race on
    their own in one process)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.key = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    async def txn(self, txn: Txn) -> Any:
        if self.key and any(c.key == self.key for c in txn.compares):
            current = await self.kv.get(self.key)
            assert current is not None
            await self.kv.txn(Txn([], [Put(self.key, current.value)]))
        return await self.kv.txn(txn)


async def test_a_result_that_keeps_losing_races_is_kept_for_a_resend(stores: Stores) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 2)
    lease = await stores.session()
    await stores.complete_next(lease, fan(1, 2))
    first = await stores.claim_next(lease)
    await stores.store.completions.complete(
        stores.namespace, first.token, nxt(2)
    )  # the group's record now
    branch = await stores.claim_next(lease)
    rival = Rival(stores.kv)
    runs = Store.open(typing.cast(KV, rival), stores.store.limits, stores.workflows)
    rival.key = stores.keys.group(run.run_id, branch.item.group_stack[-1].group_id)
    with pytest.raises(Unavailable, match="send the result again"):
        await runs.completions.complete(
            stores.namespace, branch.token, nxt(2), snapshot=branch.snapshot
        )
    items, _ = await stores.store.reads.items(stores.namespace, run.run_id)
    [held] = [i for i in items if i.item.item_id == branch.item.item_id]
    assert held.status == records_pb2.ITEM_STATUS_IN_PROGRESS  # nothing changed, claim stands
    rival.key = b""  # the race is over: the resent result is applied
    assert (await runs.completions.complete(stores.namespace, branch.token, nxt(3))).code == 0
    join = await stores.claim_next(lease)
    assert json.loads(join.item.input.data) == [2, 3]


async def test_branches_completed_on_two_replicas_join_once_with_every_output(
    stores: Stores,
) -> None:
    """Each replica keeps the group record it last wrote; the other's writes make it stale,
    and the compare on its revision sends the completion back to a fresh read."""
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 4)
    lease = await stores.session()
    other = Store.open(stores.kv, stores.store.limits, stores.workflows)
    start = await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, start.token, fan(10, 20, 30, 40))
    branches = [await stores.claim_next(lease) for _ in range(4)]
    for n, claim in enumerate(branches):
        replica = stores.store if n % 2 == 0 else other
        value = json.loads(claim.item.input.data) + 1
        completion = await replica.completions.complete(
            stores.namespace, claim.token, nxt(value), snapshot=claim.snapshot
        )
        assert completion.code == 0
    join = await stores.claim_next(lease)
    assert json.loads(join.item.input.data) == [11, 21, 31, 41]
    items, _ = await stores.store.reads.items(stores.namespace, run.run_id)
    assert [i.item.node for i in items].count("gather") == 1


async def test_an_invalid_output_is_recorded_as_a_failed_attempt(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    claim = await stores.claim_next(await stores.session())
    completion = await stores.store.completions.complete(
        stores.namespace, claim.token, nxt("not a number")
    )
    assert completion.code == 3 and "is not of type 'integer'" in completion.message
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    errors, _ = await stores.store.reads.errors(stores.namespace, run.run_id)
    assert [(e.node, e.attempt, e.error.kind) for e in errors] == [
        ("inc", 1, work_item_pb2.ERROR_KIND_INVALID_OUTPUT)
    ]


async def test_a_failed_attempt_waits_on_a_durable_timer_then_falls_back(stores: Stores) -> None:
    flow = Workflow("retry", start=flaky).edge(flaky, show).on_failure(flaky, rescue)
    await stores.register(flow)
    run = await stores.start("retry", 1)
    lease = await stores.session()
    await stores.complete_next(lease, abort("down"))
    assert (await stores.state(run.run_id))["flaky"] == (records_pb2.ITEM_STATUS_WAITING_RETRY, 1)
    assert await queue.ready(stores.kv, stores.namespace) == []
    assert await stores.fire_timers(after=0) == 0  # its backoff is 1 ms: not due yet
    assert await stores.fire_timers(after=0.001) == 1
    retry = await stores.claim_next(lease)
    assert retry.item.attempt == 2
    await stores.store.completions.complete(stores.namespace, retry.token, abort("still down"))
    assert (await stores.state(run.run_id))["flaky"] == (
        records_pb2.ITEM_STATUS_PERMANENTLY_FAILED,
        2,
    )
    fallback = await stores.claim_next(lease)
    assert fallback.item.node == "rescue" and json.loads(fallback.item.input.data) == 1
    await stores.store.completions.complete(stores.namespace, fallback.token, nxt("rescued"))
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert json.loads(done.output.data) == "rescued"
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert (metrics.retries, metrics.failed) == (1, 1)


async def test_a_failed_run_resumes_with_attempts_kept(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    await stores.complete_next(lease, abort("boom"))
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED and failed.error.message == "boom"
    resumed = await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    assert resumed.status == records_pb2.RUN_STATUS_RUNNING
    claim = await stores.claim_next(lease)
    assert claim.item.attempt == 2
    with pytest.raises(FailedPrecondition, match="it is running"):
        await stores.store.lifecycle.resume(stores.namespace, run.run_id)


async def test_pause_stops_dispatch_and_resume_continues(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    lease = await stores.session()
    paused = await stores.store.lifecycle.pause(stores.namespace, run.run_id)
    assert paused.status == records_pb2.RUN_STATUS_PAUSED
    assert (
        await stores.store.lifecycle.pause(stores.namespace, run.run_id)
    ).status == records_pb2.RUN_STATUS_PAUSED
    [item] = await queue.ready(stores.kv, stores.namespace)
    assert (
        await stores.store.claims.claim(stores.namespace, lease, item.run_id, item.item_id) is None
    )
    await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    assert (
        await stores.store.claims.claim(stores.namespace, lease, item.run_id, item.item_id)
        is not None
    )


async def test_cancel_stops_the_run_and_refuses_late_results(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    claim = await stores.claim_next(await stores.session())
    cancelled = await stores.store.lifecycle.cancel(
        stores.namespace, run.run_id, "no longer needed"
    )
    assert cancelled.status == records_pb2.RUN_STATUS_CANCELLED
    with pytest.raises(ClaimLost, match="was cancelled \\(run cancelled\\)"):
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(2))
    assert await queue.ready(stores.kv, stores.namespace) == []
    with pytest.raises(FailedPrecondition, match=r"cannot cancel run .* it is cancelled"):
        await stores.store.lifecycle.cancel(stores.namespace, run.run_id, "again")
    with pytest.raises(NotFound):
        await stores.store.lifecycle.cancel(stores.namespace, str(uuid.uuid4()), "")


async def test_list_runs_pages_newest_first_and_filters(stores: Stores) -> None:
    await stores.register(chain())
    runs = [await stores.start("chain", n) for n in range(5)]
    await stores.store.lifecycle.cancel(stores.namespace, runs[1].run_id, "")
    page, token = await stores.store.reads.list_runs(stores.namespace, [], "", 2, "")
    assert [r.run_id for r in page] == [runs[4].run_id, runs[3].run_id] and token
    rest, end = await stores.store.reads.list_runs(stores.namespace, [], "", 10, token)
    assert [r.run_id for r in rest] == [r.run_id for r in reversed(runs[:3])] and end == ""
    cancelled, _ = await stores.store.reads.list_runs(
        stores.namespace, [records_pb2.RUN_STATUS_CANCELLED], "", 0, ""
    )
    assert [r.run_id for r in cancelled] == [runs[1].run_id]
    assert (await stores.store.reads.list_runs(stores.namespace, [], "other", 0, ""))[0] == []


async def test_enqueue_is_idempotent_and_checks_its_input(stores: Stores) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    item, created = await stores.store.lifecycle.enqueue(
        stores.namespace, run.run_id, "show", js(7), "req-1"
    )
    again, created_again = await stores.store.lifecycle.enqueue(
        stores.namespace, run.run_id, "show", js(7), "req-1"
    )
    assert created and not created_again and item.item_id == again.item_id
    with pytest.raises(NotFound, match="has no node 'ghost'"):
        await stores.store.lifecycle.enqueue(stores.namespace, run.run_id, "ghost", js(7), "req-2")
    with pytest.raises(InvalidPayload):
        await stores.store.lifecycle.enqueue(stores.namespace, run.run_id, "show", js("x"), "req-3")
    pending, _ = await stores.store.reads.pending(stores.namespace, run.run_id)
    assert sorted(i.node for i in pending) == ["inc", "show"]


@pytest.mark.parametrize("bad", ["", "../x", "a" * 200])
async def test_malformed_ids_are_refused(stores: Stores, bad: str) -> None:
    from floxide_grpc import InvalidArgument  # noqa: PLC0415

    with pytest.raises(InvalidArgument):
        await stores.store.reads.get(stores.namespace, bad)


async def test_a_fan_out_wider_than_one_txn_expands_and_joins(stores: Stores) -> None:
    await stores.register(Workflow("wide", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("wide", 100)
    lease = await stores.session()
    await stores.complete_next(lease, fan(*range(100)))
    assert await stores.kv.get(stores.keys.expansion(run.run_id, "start")) is None  # expanded
    ready = await queue.ready(stores.kv, stores.namespace)
    assert len(ready) == 100 and len({i.item_id for i in ready}) == 100
    for item in ready:
        claim = await stores.store.claims.claim(stores.namespace, lease, item.run_id, item.item_id)
        assert claim is not None
        await stores.store.completions.complete(
            stores.namespace, claim.token, nxt(json.loads(claim.item.input.data) + 1)
        )
    join = await stores.claim_next(lease)
    assert join.item.node == "gather" and json.loads(join.item.input.data) == list(range(1, 101))


async def test_an_interrupted_expansion_is_finished_once(stores: Stores) -> None:
    from floxide_grpc._proto.floxide.v1 import checkpoint_pb2  # noqa: PLC0415

    await stores.register(Workflow("wide", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("wide", 3)
    items = [
        work_item_pb2.WorkItem(
            namespace=stores.namespace,
            run_id=run.run_id,
            item_id=f"i{n:03d}",
            node="inc",
            input=js(n),
            attempt=1,
        )
        for n in range(90)
    ]
    record = checkpoint_pb2.Checkpoint(pending=items)
    key = stores.keys.expansion(run.run_id, "start")
    await stores.kv.txn(Txn([], [Put(key, record.SerializeToString())]))
    await asyncio.gather(
        *(fanout.expand(stores.kv, stores.namespace, run.run_id, "start") for _ in range(3))
    )
    assert await stores.kv.get(key) is None
    pending, _ = await stores.store.reads.pending(stores.namespace, run.run_id, size=1000)
    assert len(pending) == 91  # the start item and the 90 expanded, each once


async def test_retention_removes_old_finished_runs_whole(stores: Stores) -> None:
    await stores.register(chain())
    done = (
        await stores.store.lifecycle.start(stores.namespace, "chain", "", js(1), "idem-1", None)
    )[0]
    running = await stores.start("chain", 2)
    await stores.store.lifecycle.cancel(stores.namespace, done.run_id, "finish it")
    assert await retention.remove_finished(stores.kv, stores.namespace, finished_before_ms=0) == 0
    removed = await retention.remove_finished(
        stores.kv, stores.namespace, finished_before_ms=10**13
    )
    assert removed == 1
    with pytest.raises(NotFound):
        await stores.store.reads.get(stores.namespace, done.run_id)
    assert (await stores.kv.range(stores.keys.run(done.run_id)))[0] == []
    assert await stores.kv.get(stores.keys.idempotency("idem-1")) is None
    assert (
        await stores.store.reads.get(stores.namespace, running.run_id)
    ).status == records_pb2.RUN_STATUS_RUNNING


def through(endpoints: list[str], namespace: str) -> Stores:
    """Stores on an etcd client of their own, whose first endpoint is used first."""
    from floxide_server.etcd import EtcdKV  # noqa: PLC0415

    kv = EtcdKV(endpoints, timeout=1.0)
    limits = Limits()
    workflows = WorkflowStore(kv, limits)
    return Stores(kv, namespace, workflows, Store.open(kv, limits, workflows))


async def test_lost_replies_of_claim_and_complete_cause_no_double_effect_and_no_false_loss(
    etcd: EmbeddedEtcd,
) -> None:
    """A TCP proxy in front of etcd swallows the replies of an applied claim and completion.

    Each client sends through the proxy first; the retry after the lost reply fails over to
    etcd itself, and finds the first attempt applied.
    """
    from tests.helpers import TcpProxy  # noqa: PLC0415

    proxy = await TcpProxy(etcd.client_port).start()
    endpoints = [f"127.0.0.1:{proxy.port}", etcd.endpoint]
    s = through(endpoints, f"ns-{uuid.uuid4().hex[:12]}")
    try:
        await s.register(chain())
        run = await s.start("chain", 1)
        lease = await s.session()
        [item] = await queue.ready(s.kv, s.namespace)
        proxy.blackhole = True  # etcd applies the claim; its reply is lost
        claim = await s.store.claims.claim(s.namespace, lease, item.run_id, item.item_id)
        assert claim is not None  # not a false "someone else got it"
        proxy.blackhole = False
        assert (await s.state(run.run_id))["inc"] == (records_pb2.ITEM_STATUS_IN_PROGRESS, 1)
        await s.kv.close()
        s = through(endpoints, s.namespace)  # through the proxy again
        await s.store.reads.get(s.namespace, run.run_id)
        proxy.blackhole = True  # the completion is applied; its reply is lost
        completion = await s.store.completions.complete(s.namespace, claim.token, nxt(2))
        assert completion.code == 0  # not a false "claim lost"
        proxy.blackhole = False
        ready = await queue.ready(s.kv, s.namespace)
        assert [i.node for i in ready] == ["show"]  # the successor exists once
        with pytest.raises(AlreadyExists):
            await s.store.completions.complete(s.namespace, claim.token, nxt(2))
    finally:
        await s.kv.close()
        await proxy.stop()


async def test_a_lost_reply_of_a_sticky_completion_still_hands_over_the_successor(
    etcd: EmbeddedEtcd,
) -> None:
    from tests.helpers import TcpProxy  # noqa: PLC0415

    proxy = await TcpProxy(etcd.client_port).start()
    s = through([f"127.0.0.1:{proxy.port}", etcd.endpoint], f"ns-{uuid.uuid4().hex[:12]}")
    try:
        await s.register(chain())
        run = await s.start("chain", 1)
        lease = await s.session()
        first = await s.claim_next(lease)
        proxy.blackhole = True  # applied, with the successor claimed; the reply is lost
        completion = await s.store.completions.complete(
            s.namespace,
            first.token,
            nxt(2),
            snapshot=first.snapshot,
            sticky=Sticky(lease, serves_all),
        )
        proxy.blackhole = False
        second = completion.claim
        assert completion.code == 0 and second is not None  # read back, not left claimed
        assert second.item.node == "show" and second.snapshot is None  # recovered by reads
        assert await queue.ready(s.kv, s.namespace) == []
        await s.store.completions.complete(s.namespace, second.token, nxt("2"))
        done = await s.store.reads.get(s.namespace, run.run_id)
        assert done.status == records_pb2.RUN_STATUS_COMPLETED
        assert json.loads(done.output.data) == "2"
    finally:
        await s.kv.close()
        await proxy.stop()


# -- how a run ends: nothing is left in flight ----------------------------------------------


def in_flight(metrics: records_pb2.RunMetrics) -> int:
    return metrics.pending + metrics.in_progress + metrics.waiting_retry


async def test_the_first_terminal_output_completes_the_run_and_settles_the_rest(
    stores: Stores,
) -> None:
    await stores.register(Workflow("race", start=split).edge(split, inc))  # inc is terminal
    run = await stores.start("race", 3)
    lease = await stores.session()
    await stores.complete_next(lease, fan(1, 2, 3))
    first, second = await stores.claim_next(lease), await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, first.token, nxt(5))
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(done.output.data) == 5
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.cancelled == 2 and metrics.completed == 2
    items, _ = await stores.store.reads.items(
        stores.namespace, run.run_id, [records_pb2.ITEM_STATUS_CANCELLED]
    )
    assert {i.last_error.message for i in items} == {"run completed"}
    held = next(i for i in items if i.item.item_id == second.item.item_id)
    assert held.attempts == 1 and held.item.input == second.item.input  # kept
    with pytest.raises(ClaimLost, match=r"was cancelled \(run completed\)"):
        await stores.store.completions.complete(stores.namespace, second.token, nxt(6))
    assert await queue.ready(stores.kv, stores.namespace) == []
    assert await stores.kv.get(stores.keys.settle(run.run_id)) is None


async def test_a_failed_run_settles_its_retries_and_their_timers(stores: Stores) -> None:
    await stores.register(Workflow("fails", start=split).edge(split, flaky))
    run = await stores.start("fails", 2)
    lease = await stores.session()
    await stores.complete_next(lease, fan(1, 2))
    waits, fails = await stores.claim_next(lease), await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, waits.token, abort("later"))
    assert len((await stores.kv.range(stores.keys.timer()))[0]) == 1  # a retry waits
    for_good = work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_GENERIC, message="no", non_retryable=True
    )
    await stores.store.completions.complete(
        stores.namespace, fails.token, Transition(abort=for_good)
    )
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.cancelled == 1 and metrics.failed == 1
    assert (await stores.kv.range(stores.keys.timer()))[0] == []  # its timer is gone
    assert await stores.fire_timers(after=10**6) == 0


async def test_a_failed_run_resumes_whole_and_its_join_fires_once_with_every_output(
    stores: Stores,
) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 10)
    lease = await stores.session()
    await stores.complete_next(lease, fan(*range(10)))
    claims = [await stores.claim_next(lease) for _ in range(5)]
    for claim in claims[:2]:  # two branches arrive before the failure
        value = json.loads(claim.item.input.data) + 1
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(value))
    await stores.store.completions.complete(stores.namespace, claims[2].token, abort("boom"))
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.cancelled == 7  # 2 held, 5 queued
    resumed = await stores.store.lifecycle.resume(stores.namespace, run.run_id)
    assert resumed.status == records_pb2.RUN_STATUS_RUNNING
    with pytest.raises(ClaimLost):  # a result of before the failure is refused
        await stores.store.completions.complete(stores.namespace, claims[3].token, nxt(4))
    again = [await stores.claim_next(lease) for _ in range(8)]
    assert {c.item.attempt for c in again if c.item.item_id == claims[2].item.item_id} == {2}
    assert await queue.ready(stores.kv, stores.namespace) == []  # 8 re-queued, no more
    for claim in again:
        value = json.loads(claim.item.input.data) + 1
        await stores.store.completions.complete(stores.namespace, claim.token, nxt(value))
    join = await stores.claim_next(lease)
    assert join.item.node == "gather"
    assert json.loads(join.item.input.data) == [x + 1 for x in range(10)]
    await stores.store.completions.complete(stores.namespace, join.token, nxt(55))
    done = await stores.store.reads.get(stores.namespace, run.run_id)
    assert done.status == records_pb2.RUN_STATUS_COMPLETED
    assert await queue.ready(stores.kv, stores.namespace) == []  # the join fired once


async def test_settling_a_crash_interrupted_is_finished_by_any_replica(stores: Stores) -> None:
    await stores.register(Workflow("race", start=split).edge(split, inc))
    run = await stores.start("race", 2)
    lease = await stores.session()
    await stores.complete_next(lease, fan(1, 2))
    first, second = await stores.claim_next(lease), await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, first.token, nxt(2))
    # As if the replica had died between the run's ending Txn and its settling.
    key = stores.keys.item(run.run_id, second.item.item_id)
    found = await stores.kv.get(key)
    assert found is not None
    state = records_pb2.WorkItemState.FromString(found.value)
    state.status = records_pb2.ITEM_STATUS_IN_PROGRESS
    await stores.kv.txn(
        Txn(
            [],
            [
                Put(key, state.SerializeToString()),
                Put(stores.keys.settle(run.run_id), b"COMPLETED"),
            ],
        )
    )
    assert await settling.settle_all(stores.kv, stores.namespace, 128) == 1
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.cancelled == 1
    assert await stores.kv.get(stores.keys.settle(run.run_id)) is None


HOLD = Transition(hold=Transition.Hold())


@node
def merge(x: int) -> int:  # holds in the tests: a merge that waits outside any join
    return x


async def test_a_run_whose_branches_all_hold_outside_a_join_fails_as_stuck(
    stores: Stores,
) -> None:
    await stores.register(Workflow("held", start=split).edge(split, merge))
    run = await stores.start("held", 2)
    lease = await stores.session()
    await stores.complete_next(lease, fan(1, 2))
    first, second = await stores.claim_next(lease), await stores.claim_next(lease)
    await stores.store.completions.complete(stores.namespace, first.token, HOLD)
    running = await stores.store.reads.get(stores.namespace, run.run_id)
    assert running.status == records_pb2.RUN_STATUS_RUNNING  # the other branch is live
    await stores.store.completions.complete(stores.namespace, second.token, HOLD)
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    assert failed.error.kind == work_item_pb2.ERROR_KIND_STUCK
    assert "branches ended without a successor at 'merge'" in failed.error.message
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.completed == 3
    with pytest.raises(FailedPrecondition, match="it failed as stuck"):
        await stores.store.lifecycle.resume(stores.namespace, run.run_id)


@node
def other(x: int) -> int:  # holds too, at another node: the two Txns share no key
    return x


async def test_the_last_two_branches_ending_at_once_still_end_the_run(stores: Stores) -> None:
    """Their Txns go to etcd together: they must not share one request (each would see the
    other's marker, as every compare of a request reads the state before it)."""
    await stores.register(Workflow("held", start=inc).edge(inc, [merge, other]))
    runs = [await stores.start("held", n) for n in range(4)]
    lease = await stores.session()
    starts = [await stores.claim_next(lease) for _ in runs]
    for start in starts:
        await stores.store.completions.complete(stores.namespace, start.token, nxt(1))
    branches = [await stores.claim_next(lease) for _ in range(8)]
    await asyncio.gather(
        *(stores.store.completions.complete(stores.namespace, b.token, HOLD) for b in branches)
    )
    for run in runs:
        ended = await stores.store.reads.get(stores.namespace, run.run_id)
        assert ended.error.kind == work_item_pb2.ERROR_KIND_STUCK
        assert "at 'merge', 'other'" in ended.error.message


async def test_a_run_made_stuck_behind_its_txns_back_is_failed_by_the_reconciler(
    stores: Stores,
) -> None:
    await stores.register(chain())
    run = await stores.start("chain", 1)
    live = await stores.start("chain", 2)
    # As if its one item had ended its branch in a Txn that could not fail the run.
    await stores.kv.txn(Txn([], [Delete(stores.keys.live(run.run_id), prefix=True)]))
    assert await stuck.fail_stuck(stores.kv, stores.namespace, 0, 128) == 0  # it is queued
    key = stores.keys.item(run.run_id, "start")
    found = await stores.kv.get(key)
    assert found is not None
    state = records_pb2.WorkItemState.FromString(found.value)
    state.status = records_pb2.ITEM_STATUS_COMPLETED
    await stores.kv.txn(
        Txn(
            [],
            [Put(key, state.SerializeToString()), Delete(stores.keys.queue(run.run_id, "start"))],
        )
    )
    assert await stuck.fail_stuck(stores.kv, stores.namespace, 0, 128) == 1
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    assert failed.error.kind == work_item_pb2.ERROR_KIND_STUCK
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.completed == 1
    still = await stores.store.reads.get(stores.namespace, live.run_id)
    assert still.status == records_pb2.RUN_STATUS_RUNNING
    assert await stuck.fail_stuck(stores.kv, stores.namespace, 0, 128) == 0


async def test_an_item_lost_too_often_fails_its_run_and_the_rest_is_settled(
    stores: Stores,
) -> None:
    await stores.register(Workflow("fan", start=split).edge(split, inc).edge(inc, gather))
    run = await stores.start("fan", 2)
    await stores.complete_next(await stores.session(), fan(1, 2))
    for _ in range(3):  # the same item, claimed and lost with its worker three times
        lease = await stores.session()
        lost = await stores.claim_next(lease)
        assert await stores.store.claims.release(
            stores.namespace, lease, run.run_id, lost.item.item_id
        )
    failed = await stores.store.reads.get(stores.namespace, run.run_id)
    assert failed.status == records_pb2.RUN_STATUS_FAILED
    assert failed.error.kind == work_item_pb2.ERROR_KIND_WORKER_LOST
    metrics = await stores.store.reads.metrics(stores.namespace, run.run_id)
    assert in_flight(metrics) == 0 and metrics.cancelled == 1
