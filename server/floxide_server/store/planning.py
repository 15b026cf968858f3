"""Planning a step: from what a claim left and what the worker reported, the one Txn to write.

Pure, in the spirit of etcd's ``txn/`` package (check, then build): no I/O, no clock, nothing
mutated that the caller owns. A :class:`Basis` holds what the plan starts from (the item's
state and its run as the claim saw them, the definition, the time, the group records known); a
:class:`Plan` holds the guards and writes of the completing Txn and what the step decides:

- **success** (``Next``, ``NextAll``, ``Hold``): the item is COMPLETED, its context operations
  recorded, and :func:`floxide_grpc._routing.route` says what follows: new items (queued, or
  claimed by a sticky session), arrivals at a join (:mod:`floxide_server.store.fanout`), or the
  run's output, which completes the run (the first terminal output wins, as in floxide) and
  settles its leftovers;
- **an invalid result** (an output or operation that breaks its schema or a limit) is a failed
  attempt of kind INVALID_OUTPUT, and the plan says so (``code``, ``message``);
- **failure** (``Abort``, an invalid result, a lost worker): the error is recorded; the item
  retries on a durable timer if its policy allows (:mod:`floxide_server.store.timers`), else it
  fails for good and its ``on_failure`` fallback takes its input, else the run fails (and its
  other items are settled).
  A lost worker says nothing about the item: it is re-queued at once up to ``LOST_ATTEMPTS``.

Every item not yet done has a live marker (``queue.live``): a step deletes its item's marker
(kept while a wide fan-out of it is not expanded), and a step that ends its branch with no
successor says so (``ends_branch``): its Txn then nests :func:`stuck`, which fails the run as
STUCK if no other item is live (:mod:`floxide_server.store.stuck`).

A fan-out too wide for one Txn is planned as an expansion record (see ``fanout``). A plan that
needs a group record not in its basis is incomplete and names what to read (``needs``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

from floxide_grpc._durations import format_seconds
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc._routing import Step, route, route_failure
from floxide_grpc.context import Operation, apply
from floxide_grpc.errors import FloxideError, ResourceExhausted
from floxide_grpc.retry import RetryPolicy
from floxide_grpc.transition import ErrorKind
from floxide_server.store import children, contexts, fanout, payloads, settling, timers
from floxide_server.store.keys import Keys
from floxide_server.store.kv import Compare, Delete, KeyValue, Put, Request, Txn
from floxide_server.store.queue import queue_entry
from floxide_server.store.records import fresh_state, stamp
from floxide_server.store.stuck import STUCK
from floxide_server.store.stuck import error as stuck_error
from floxide_server.store.workflows import Definition

__all__ = [
    "LOST_ATTEMPTS",
    "TXN_HEADROOM",
    "Basis",
    "Plan",
    "plan_lost",
    "plan_result",
    "stuck",
]

LOST_ATTEMPTS = 3
"""Attempts an item may lose with its worker before it fails, when its policy allows fewer."""
TXN_HEADROOM = 28
"""Operations a completion needs besides its new items (claim, states, context, groups, token)."""


@dataclasses.dataclass(frozen=True)
class Basis:
    """What a step is planned from.

    Attributes:
        keys: The run's namespace.
        definition: The definition the run is pinned to.
        run: The run's record (serialized), as the claim saw it or as read.
        state: The item's state (serialized), as the claim wrote it or as read.
        limits: Payload and Txn limits.
        now_ms: The time to stamp records with.
        groups: Group records known, by key (``None``: absent); a key missing is unknown.
        context: The run's context as read, if the step starts child runs (``children``).
    """

    keys: Keys
    definition: Definition
    run: bytes
    state: bytes
    limits: payloads.Limits
    now_ms: int
    groups: Mapping[bytes, KeyValue | None] = dataclasses.field(default_factory=dict)
    context: children.Inherited | None = None


@dataclasses.dataclass
class Plan:
    """The compares and writes of one step's Txn, and what the step decides.

    Attributes:
        guards: Compares besides the claim's own (group records, arrivals).
        writes: Every write of the step but its new items.
        new_items: Items to create (pending and queued, or one claimed by a sticky session).
        code: 0, or why the result was taken as a failed attempt (INVALID_ARGUMENT, ...).
        message: What was wrong with it.
        ends_run: The status the Txn ends the run with (0: the run goes on).
        settle: The run ended: its other items are settled after the Txn (``settling``).
        retry_in_ms: A retry timer is armed, due this long after ``now_ms``.
        ends_branch: The node whose item ended its branch with no successor: the step's Txn
            then nests :func:`stuck`, which fails the run if nothing else is live.
        expansions: Expansion records written, as (run, item), to expand after the Txn.
        groups: Group records written (``None``: the group is complete).
        needs: Group records to read first: the plan is incomplete, plan again with them.
        needs_context: The step starts child runs: read the run's context, plan again with it.
        ended: The run's record as the Txn ends it, if it does.
    """

    guards: list[Compare] = dataclasses.field(default_factory=list)
    writes: list[Request] = dataclasses.field(default_factory=list)
    new_items: list[work_item_pb2.WorkItem] = dataclasses.field(default_factory=list)
    code: int = 0
    message: str = ""
    reason: str = ""
    ends_run: int = 0
    settle: bool = False
    retry_in_ms: int | None = None
    ends_branch: str = ""
    expansions: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    groups: dict[bytes, bytes | None] = dataclasses.field(default_factory=dict)
    needs: tuple[bytes, ...] = ()
    needs_context: bool = False
    ended: records_pb2.RunRecord | None = None

    @property
    def incomplete(self) -> bool:
        """Whether something must be read before the plan can be made."""
        return bool(self.needs) or self.needs_context


def plan_result(
    basis: Basis,
    attempt: int,
    transition: work_item_pb2.Transition,
    operations: Sequence[work_item_pb2.ContextOperation],
) -> Plan:
    """Plan the Txn that applies a worker's result of ``attempt``."""
    run = records_pb2.RunRecord.FromString(basis.run)
    state = records_pb2.WorkItemState.FromString(basis.state)
    item = state.item
    plan = Plan()
    if transition.WhichOneof("outcome") == "abort":
        _plan_failure(basis, run, state, transition.abort, plan, lost=False)
        return plan
    try:
        step = _route_success(basis, item, transition, operations)
    except FloxideError as exc:  # a result that breaks its contract is a failed attempt
        kind = work_item_pb2.ERROR_KIND_INVALID_OUTPUT
        plan.code, plan.message, plan.reason = exc.code.value, str(exc), exc.reason
        _plan_failure(basis, run, state, work_item_pb2.NodeError(kind=kind, message=str(exc)), plan)
        return plan
    state.status = records_pb2.ITEM_STATUS_COMPLETED
    stamp(state, "updated_at", basis.now_ms)
    keys = basis.keys
    plan.writes.append(Put(keys.item(item.run_id, item.item_id), state.SerializeToString()))
    if operations:
        plan.writes.append(
            contexts.record_operations(keys, item.run_id, item.item_id, operations, attempt)
        )
    _plan_step(basis, run, item, step, plan, operations)
    if not (step.items or step.arrivals or step.output is not None):
        # The branch ends here with no successor: if no other item is live, the run is stuck.
        plan.ends_branch = item.node
        plan.writes.append(Put(keys.ended(item.run_id, item.node), b""))
    return plan


def plan_lost(basis: Basis, lease: int) -> Plan:
    """Plan the Txn that re-queues or fails an item whose worker's session ended."""
    run = records_pb2.RunRecord.FromString(basis.run)
    state = records_pb2.WorkItemState.FromString(basis.state)
    error = work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_WORKER_LOST,
        message=f"the worker's session {lease:x} ended while it held the item",
    )
    plan = Plan()
    _plan_failure(basis, run, state, error, plan, lost=True)
    return plan


def plan_unreceived(basis: Basis) -> Plan:
    """Plan the Txn that re-queues an item its worker never received: no attempt is used."""
    state = records_pb2.WorkItemState.FromString(basis.state)
    state.status = records_pb2.ITEM_STATUS_PENDING
    state.item.attempt = state.attempts  # the same attempt, again
    state.ClearField("session_id")
    stamp(state, "updated_at", basis.now_ms)
    keys, item = basis.keys, state.item
    return Plan(
        writes=[
            Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
            queue_entry(keys, item),
        ]
    )


def plan_timed_out(basis: Basis, timeout_ms: int, grace_ms: int) -> Plan:
    """Plan the Txn that ends an attempt past its deadline: failed, of kind TIMEOUT."""
    run = records_pb2.RunRecord.FromString(basis.run)
    state = records_pb2.WorkItemState.FromString(basis.state)
    error = work_item_pb2.NodeError(
        kind=work_item_pb2.ERROR_KIND_TIMEOUT,
        message=(
            f"node {state.item.node!r} timed out after {format_seconds(timeout_ms / 1000)}: "
            f"no result came within it and the server's grace of {format_seconds(grace_ms / 1000)}"
        ),
    )
    plan = Plan()
    _plan_failure(basis, run, state, error, plan)
    return plan


def _route_success(
    basis: Basis,
    item: work_item_pb2.WorkItem,
    transition: work_item_pb2.Transition,
    operations: Sequence[work_item_pb2.ContextOperation],
) -> Step:
    """Check a successful result against its contract, then route it.

    Raises:
        FloxideError: an output or operation breaks its schema or a limit.
    """
    definition, limit = basis.definition, basis.limits.max_payload_bytes
    node = definition.graph.node(item.node)
    outcome = transition.WhichOneof("outcome")
    outputs = (
        [transition.next.output]
        if outcome == "next"
        else list(transition.next_all.outputs)
        if outcome == "next_all"
        else []
    )
    where = f"node {node.name!r} output"
    if len(outputs) > basis.limits.max_fanout:
        raise ResourceExhausted(
            f"node {node.name!r}: a fan-out of {len(outputs)} branches is over the limit of "
            f"{basis.limits.max_fanout}"
        )
    for output in outputs:
        payloads.validate(payloads.parse_json(output, limit, where), node.output_schema, where)
    for operation in operations:
        definition.context.check(Operation.from_proto(operation))
        payloads.parse_json(operation.value, limit, f"context field {operation.field!r}")
    return route(definition.graph, item, transition)


def _plan_step(
    basis: Basis,
    run: records_pb2.RunRecord,
    item: work_item_pb2.WorkItem,
    step: Step,
    plan: Plan,
    operations: Sequence[work_item_pb2.ContextOperation] = (),
) -> None:
    """Add what a routed step makes: items, arrivals and joins, or the run's output.

    A nested workflow's new item starts its child run in this Txn (:mod:`.children`), from the
    run's context as read and the step's own operations.
    """
    keys = basis.keys
    arrivals = fanout.plan_arrivals(keys, item, step.arrivals, basis.groups)
    if arrivals.needs:
        plan.needs = arrivals.needs
        return
    new_items = [*step.items, *arrivals.joins]
    nested = children.children_of(basis.definition, new_items)
    if nested and basis.context is None:
        plan.needs_context = True
        return
    plan.guards.extend(arrivals.guards)
    plan.writes.extend(arrivals.writes)
    plan.groups.update(arrivals.groups)
    for new in new_items:
        stamp(new, "created_at", basis.now_ms)
    ops = sum(children.weight(basis.definition, new.node) for new in new_items)
    copied = basis.context.size if basis.context is not None else 0
    written = sum(children.size(basis.definition, new, copied) for new in new_items)
    if ops > basis.limits.max_txn_ops - TXN_HEADROOM or written > settling.MAX_BATCH_BYTES:
        # Too wide for one Txn (etcd's --max-txn-ops, or its request size with the inputs
        # and the contexts child runs copy): a durable expansion record now, the items in
        # bounded Txns right after; a crash in between loses nothing (reconcile). The item
        # stays live until they are made.
        plan.writes.append(fanout.expansion(keys, run.run_id, item.item_id, new_items))
        plan.expansions.append((run.run_id, item.item_id))
    else:
        plan.writes.append(Delete(keys.live(run.run_id, item.item_id)))  # done: others live
        context = None
        if basis.context is not None and nested:
            plan.guards.append(basis.context.guard)
            context = copy.deepcopy(basis.context.context)
            apply(context, [Operation.from_proto(o) for o in operations], basis.definition.context)
        for new in new_items:
            if children.is_nested(basis.definition, new.node):
                plan.writes.extend(
                    children.start(
                        keys, basis.definition, run, fresh_state(new), context or {}, basis.now_ms
                    )
                )
            else:
                plan.new_items.append(new)
    if step.output is not None:
        run.output.CopyFrom(step.output)
        _end_run(basis, run, records_pb2.RUN_STATUS_COMPLETED, plan)


def _plan_failure(
    basis: Basis,
    run: records_pb2.RunRecord,
    state: records_pb2.WorkItemState,
    error: work_item_pb2.NodeError,
    plan: Plan,
    *,
    lost: bool = False,
) -> None:
    """Record a failed attempt, then retry it, fall back, or fail the run (in that order)."""
    keys, now = basis.keys, basis.now_ms
    item = state.item
    node = basis.definition.graph.node(item.node)
    kind = (
        ErrorKind.from_proto(error.kind)
        if error.kind in work_item_pb2.ErrorKind.values()
        else ErrorKind.GENERIC
    )
    record = records_pb2.ErrorRecord(
        namespace=keys.namespace,
        run_id=run.run_id,
        item_id=item.item_id,
        node=item.node,
        attempt=state.attempts,
        error=error,
    )
    stamp(record, "occurred_at", now)
    plan.writes.append(
        Put(keys.error(run.run_id, item.item_id, state.attempts), record.SerializeToString())
    )
    state.last_error.CopyFrom(error)
    stamp(state, "updated_at", now)
    policy = RetryPolicy.from_proto(node.retry_policy) if node.HasField("retry_policy") else None
    item_key = keys.item(run.run_id, item.item_id)
    if lost and (policy is None or not policy.should_retry(kind, state.attempts)):
        # A lost worker says nothing about the item: retry it up to LOST_ATTEMPTS times
        # even without a policy (a node that kills its worker every time stops there).
        if state.attempts < LOST_ATTEMPTS:
            state.status = records_pb2.ITEM_STATUS_PENDING
            state.item.attempt = state.attempts + 1
            plan.writes.append(Put(item_key, state.SerializeToString()))
            plan.writes.append(queue_entry(keys, state.item))
            return
        policy = None
    if policy is not None and policy.should_retry(
        kind, state.attempts, non_retryable=error.non_retryable
    ):
        plan.retry_in_ms = int(policy.backoff_for(state.attempts).total_seconds() * 1000)
        plan.writes.extend(timers.arm(keys, state, now, plan.retry_in_ms))
        return
    state.status = records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
    state.ClearField("retry_at")
    plan.writes.append(Put(item_key, state.SerializeToString()))
    fallback = route_failure(basis.definition.graph, item)
    if fallback is not None:
        _plan_step(basis, run, item, fallback, plan)
        return
    run.failed_item.CopyFrom(
        records_pb2.FailedItem(item_id=item.item_id, node=item.node, attempts=state.attempts)
    )
    _end_run(basis, run, records_pb2.RUN_STATUS_FAILED, plan, error)


def _end_run(
    basis: Basis,
    run: records_pb2.RunRecord,
    status: int,
    plan: Plan,
    error: work_item_pb2.NodeError | None = None,
) -> None:
    """End the run in the step's Txn; its other items are settled right after, if any is live.

    See :func:`~floxide_server.store.settling.ending`.
    """
    item_id = records_pb2.WorkItemState.FromString(basis.state).item.item_id
    plan.writes.extend(settling.ending(basis.keys, run, status, basis.now_ms, error, last=item_id))
    plan.ends_run = status
    plan.settle = True
    plan.ended = run


def stuck(basis: Basis, nodes: Sequence[str]) -> tuple[Txn, records_pb2.RunRecord]:
    """The Txn nested in a branch-ending step's: it fails the run if no other item is live.

    ``nodes`` are those that ended branches before (``ended/``); the item's node is added.
    Returns it with the run's record as it ends the run (a child's parent is told in it).
    """
    run = records_pb2.RunRecord.FromString(basis.run)
    item = records_pb2.WorkItemState.FromString(basis.state).item
    failed = records_pb2.RUN_STATUS_FAILED
    why = stuck_error([*nodes, item.node])
    txn = Txn(
        settling.alone(basis.keys, item.run_id, item.item_id),
        settling.ending(basis.keys, run, failed, basis.now_ms, why, alone_known=True),
        name=STUCK,
    )
    return txn, run
