"""Planning a step, without a KV: each decision of ``floxide_server.store.planning``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from floxide_server._proto.floxide.storage.v1 import storage_pb2
from floxide_server.store import planning, settling
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Compare, Delete, KeyValue, Put, Txn
from floxide_server.store.payloads import Limits
from floxide_server.store.records import fresh_state, status_name
from floxide_server.store.workflows import Definition

from floxide_grpc import NextAll, RetryPolicy, Workflow, node
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, records_pb2, work_item_pb2
from floxide_grpc._routing import route, start_item
from floxide_grpc.context import ContextSchema
from floxide_grpc.errors import StatusCode

Transition = work_item_pb2.Transition
KEYS = Keys("ns")
NOW = 1_000_000


@node
def split(n: int) -> NextAll[int]:
    return NextAll(list(range(n)))


@node
def inc(x: int) -> int:
    return x + 1


@node(join=True)
def gather(xs: list[int]) -> int:
    return sum(xs)


@node(retry=RetryPolicy(max_attempts=3, initial_backoff=timedelta(seconds=5), jitter=False))
def flaky(x: int) -> int:
    return x


@node
def rescue(x: int) -> str:
    return "rescued"


def js(value: Any) -> work_item_pb2.Payload:
    return work_item_pb2.Payload(
        encoding=work_item_pb2.ENCODING_JSON, data=json.dumps(value).encode()
    )


def nxt(value: Any) -> Transition:
    return Transition(next=Transition.Next(output=js(value)))


def fan(*values: Any) -> Transition:
    return Transition(next_all=Transition.NextAll(outputs=[js(v) for v in values]))


ABORT = Transition(
    abort=work_item_pb2.NodeError(kind=work_item_pb2.ERROR_KIND_GENERIC, message="no")
)


def definition(flow: Workflow) -> Definition:
    proto = flow.definition()
    return Definition("hash", Graph(proto), ContextSchema.from_proto(proto.context_fields))


def basis(
    flow: Workflow,
    item: work_item_pb2.WorkItem | None = None,
    *,
    attempts: int = 1,
    groups: Mapping[bytes, KeyValue | None] | None = None,
    limits: Limits | None = None,
) -> planning.Basis:
    """A basis as a claim leaves it: the item in progress (the start item unless given)."""
    parsed = definition(flow)
    run = records_pb2.RunRecord(
        namespace="ns",
        run_id="r",
        workflow=flow.name,
        definition_hash="hash",
        status=records_pb2.RUN_STATUS_RUNNING,
    )
    if item is None:
        item = start_item(
            parsed.definition, namespace="ns", run_id="r", definition_hash="hash", input=js(3)
        )
    state = fresh_state(item)
    state.status = records_pb2.ITEM_STATUS_IN_PROGRESS
    state.attempts = attempts
    return planning.Basis(
        KEYS,
        parsed,
        run.SerializeToString(),
        state.SerializeToString(),
        limits or Limits(),
        NOW,
        groups or {},
    )


def written(plan: planning.Plan, key: bytes) -> bytes:
    [value] = [w.value for w in plan.writes if isinstance(w, Put) and w.key == key]
    return value


def marked(plan: planning.Plan) -> bytes:
    """The settling marker a run's ending step writes if another item is still live."""
    [nested] = [w for w in plan.writes if isinstance(w, Txn) and w.name == settling.SETTLING]
    assert nested.compares == settling.alone(KEYS, "r", "start") and not nested.success
    [marker] = nested.failure
    assert isinstance(marker, Put) and marker.key == KEYS.settle("r")
    return marker.value


def item_state(plan: planning.Plan, item_id: str = "start") -> records_pb2.WorkItemState:
    return records_pb2.WorkItemState.FromString(written(plan, KEYS.item("r", item_id)))


def test_a_result_completes_its_item_and_makes_its_successor() -> None:
    flow = Workflow("chain", start=inc).edge(inc, rescue)
    plan = planning.plan_result(basis(flow), 1, nxt(4), [])
    assert item_state(plan).status == records_pb2.ITEM_STATUS_COMPLETED
    [successor] = plan.new_items
    assert successor.node == "rescue" and json.loads(successor.input.data) == 4
    assert (plan.code, plan.ends_run, plan.settle, plan.needs) == (0, 0, False, ())


def test_a_terminal_output_completes_the_run_and_settles_its_leftovers() -> None:
    plan = planning.plan_result(basis(Workflow("one", start=inc)), 1, nxt(4), [])
    assert plan.ends_run == records_pb2.RUN_STATUS_COMPLETED and plan.settle
    run = records_pb2.RunRecord.FromString(written(plan, KEYS.run_info("r")))
    assert run.status == records_pb2.RUN_STATUS_COMPLETED and json.loads(run.output.data) == 4
    assert written(plan, KEYS.status("r")) == status_name(records_pb2.RUN_STATUS_COMPLETED)
    assert Delete(KEYS.queue("r", ""), prefix=True) in plan.writes and not plan.new_items
    assert marked(plan) == status_name(records_pb2.RUN_STATUS_COMPLETED)


def test_an_abort_its_policy_retries_arms_a_timer_with_its_backoff() -> None:
    plan = planning.plan_result(basis(Workflow("f", start=flaky)), 1, ABORT, [])
    assert plan.retry_in_ms == 5000 and not plan.ends_run
    state = item_state(plan)
    assert state.status == records_pb2.ITEM_STATUS_WAITING_RETRY
    assert state.retry_at.ToMilliseconds() == NOW + 5000
    timer = storage_pb2.TimerRecord.FromString(written(plan, KEYS.timer("r", "start")))
    assert timer.delay_ms == 5000 and not timer.seen_at  # a delay, never a due time
    assert timer.item.item_id == "start" and not timer.item.HasField("input")
    assert any(w.key == KEYS.error("r", "start", 1) for w in plan.writes if isinstance(w, Put))


def test_the_last_attempt_of_an_abort_fails_the_run_and_settles_its_leftovers() -> None:
    plan = planning.plan_result(basis(Workflow("f", start=flaky), attempts=3), 3, ABORT, [])
    assert plan.retry_in_ms is None and plan.ends_run == records_pb2.RUN_STATUS_FAILED
    assert item_state(plan).status == records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    run = records_pb2.RunRecord.FromString(written(plan, KEYS.run_info("r")))
    assert run.error.message == "no" and plan.settle
    assert marked(plan) == status_name(records_pb2.RUN_STATUS_FAILED)


def test_a_failure_with_a_fallback_routes_its_input_there() -> None:
    flow = Workflow("f", start=inc).on_failure(inc, rescue)
    plan = planning.plan_result(basis(flow), 1, ABORT, [])
    assert item_state(plan).status == records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    [fallback] = plan.new_items
    assert fallback.node == "rescue" and json.loads(fallback.input.data) == 3
    assert not plan.ends_run


def test_an_output_that_breaks_its_schema_is_a_failed_attempt_with_the_reason() -> None:
    plan = planning.plan_result(basis(Workflow("one", start=inc)), 1, nxt("four"), [])
    assert plan.code == StatusCode.INVALID_ARGUMENT and "is not of type 'integer'" in plan.message
    state = item_state(plan)
    assert state.last_error.kind == work_item_pb2.ERROR_KIND_INVALID_OUTPUT
    assert plan.ends_run == records_pb2.RUN_STATUS_FAILED


def test_a_lost_worker_requeues_its_item_until_the_lost_attempts_run_out() -> None:
    flow = Workflow("one", start=inc)
    plan = planning.plan_lost(basis(flow, attempts=1), 0xABC)
    state = item_state(plan)
    assert state.status == records_pb2.ITEM_STATUS_PENDING and state.item.attempt == 2
    assert state.last_error.kind == work_item_pb2.ERROR_KIND_WORKER_LOST
    assert "abc" in state.last_error.message
    assert any(w.key == KEYS.queue("r", "start") for w in plan.writes if isinstance(w, Put))
    last = planning.plan_lost(basis(flow, attempts=planning.LOST_ATTEMPTS), 0xABC)
    assert last.ends_run == records_pb2.RUN_STATUS_FAILED


def _branch(flow: Workflow, index: int) -> work_item_pb2.WorkItem:
    parsed = definition(flow)
    first = start_item(
        parsed.definition, namespace="ns", run_id="r", definition_hash="hash", input=js(2)
    )
    return route(parsed.graph, first, fan(10, 20)).items[index]


def test_an_arrival_at_an_unknown_group_names_the_record_to_read() -> None:
    flow = Workflow("fan", start=split).edge(split, inc).edge(inc, gather)
    branch = _branch(flow, 0)
    group_key = KEYS.group("r", branch.group_stack[-1].group_id)
    plan = planning.plan_result(basis(flow, branch), 1, nxt(11), [])
    assert plan.needs == (group_key,)


def test_the_last_arrival_creates_the_join_and_every_arrival_is_guarded() -> None:
    flow = Workflow("fan", start=split).edge(split, inc).edge(inc, gather)
    first, second = _branch(flow, 0), _branch(flow, 1)
    group_key = KEYS.group("r", first.group_stack[-1].group_id)
    one = planning.plan_result(basis(flow, first, groups={group_key: None}), 1, nxt(11), [])
    assert Compare.modified_at(group_key, 0) in one.guards and not one.new_items
    record = one.groups[group_key]
    assert record is not None
    known = {group_key: KeyValue(group_key, record, 5, 7, 1)}
    two = planning.plan_result(basis(flow, second, groups=known), 1, nxt(21), [])
    assert Compare.modified_at(group_key, 7) in two.guards
    out_key = KEYS.group_output("r", first.group_stack[-1].group_id, 1)
    assert Compare.missing(out_key) in two.guards
    [join] = two.new_items
    assert join.node == "gather" and two.groups[group_key] is None  # the group is complete
    arrival = checkpoint_pb2.GroupArrival.FromString(written(two, out_key))
    assert json.loads(arrival.output.data) == 21


def test_a_fan_out_too_wide_for_one_txn_is_planned_as_an_expansion_record() -> None:
    flow = Workflow("fan", start=split).edge(split, inc).edge(inc, gather)
    limits = Limits(max_txn_ops=64)
    plan = planning.plan_result(basis(flow, limits=limits), 1, fan(*range(30)), [])
    assert not plan.new_items and plan.expansions == [("r", "start")]
    record = storage_pb2.ExpansionRecord.FromString(written(plan, KEYS.expansion("r", "start")))
    assert len(record.items) == 30


def test_planning_is_deterministic_and_leaves_its_basis_alone() -> None:
    flow = Workflow("chain", start=inc).edge(inc, rescue)
    start = basis(flow)
    state = start.state
    assert planning.plan_result(start, 1, nxt(4), []) == planning.plan_result(start, 1, nxt(4), [])
    assert start.state == state
