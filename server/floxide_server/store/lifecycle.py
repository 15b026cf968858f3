"""Run lifecycle: start, cancel, pause and resume runs, and enqueue items into running ones.

Each is one guarded Txn on the run's record (its mod revision) and status key, retried from
fresh reads when another writer moved the record meanwhile. Starting is idempotent by key: the
key, a fingerprint of the request and the run are written in the start's own Txn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from floxide_grpc import _names as names
from floxide_grpc._durations import format_seconds
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2, workflow_pb2
from floxide_grpc._routing import derive_id, start_item
from floxide_grpc.errors import (
    AlreadyCompleted,
    AlreadyExists,
    ContextError,
    FailedPrecondition,
    InvalidArgument,
    InvalidPayload,
    NodeNotFound,
    NotFound,
    NotStarted,
    ResourceExhausted,
    RunNotFound,
    WorkflowNotFound,
)
from floxide_server.store import children, payloads, settling, timers
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, KeyValue, Put, Request, Txn
from floxide_server.store.lineage import Lineage
from floxide_server.store.reads import RunReads
from floxide_server.store.records import (
    FINAL,
    FINISHED,
    PAUSED,
    RUNNING,
    RunStatus,
    fresh_state,
    new_run_id,
    now_ms,
    stamp,
    status_name,
)
from floxide_server.store.workflows import Definition, WorkflowStore

__all__ = [
    "RunLifecycle",
    "prune_counted",
]

QUOTA_FRESH = 1.0
"""Seconds a count of a namespace's runs in flight is used again, far below its quota."""
QUOTA_FAR = 0.9
"""Below this share of the quota a recent count suffices; nearer, every start counts again."""

ATTEMPTS_ON_CONFLICT = 16
"""Txns a control call tries before it gives up on a record that keeps moving."""


class RunLifecycle:
    """Starting and controlling runs of every namespace."""

    def __init__(
        self,
        kv: KV,
        workflows: WorkflowStore,
        reads: RunReads,
        limits: payloads.Limits,
        lineage: Lineage,
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.reads = reads
        self.limits = limits
        self.lineage = lineage
        self._counted: dict[str, tuple[int, float]] = {}  # namespace -> (runs in flight, when)

    async def start(
        self,
        namespace: str,
        workflow: str,
        definition_hash: str,
        input: work_item_pb2.Payload,
        idempotency_key: str,
        context: work_item_pb2.Payload | None,
        run_timeout_ms: int | None = None,
    ) -> tuple[records_pb2.RunRecord, bool]:
        """Start a run, or return the one this idempotency key started.

        ``run_timeout_ms``: how long the run may take, paused time included (``None``: no
        limit); a durable timer armed in the start's Txn ends it TIMED_OUT then.

        Raises:
            WorkflowNotFound: unknown workflow or hash.
            InvalidArgument: the run timeout is zero or less, or over the limit.
            InvalidPayload: the input or context does not fit its schema.
            ResourceExhausted: a payload is over the limit.
            AlreadyExists: the idempotency key started a run with another request.
        """
        keys = Keys(namespace)
        if run_timeout_ms is not None and not 0 < run_timeout_ms <= self.limits.max_run_timeout_ms:
            raise InvalidArgument(
                "run_timeout must be more than 0 and at most "
                f"{format_seconds(self.limits.max_run_timeout_ms / 1000)}; "
                f"got {format_seconds(run_timeout_ms / 1000)}"
            )
        await self._within_quota(keys, idempotency_key)
        for _ in range(ATTEMPTS_ON_CONFLICT):
            current = 0
            if not definition_hash:
                hash_now, current = await self.workflows.current(namespace, workflow)
            definition = await self.workflows.get(namespace, definition_hash or hash_now)
            if definition.definition.name != workflow:
                raise WorkflowNotFound(
                    f"definition {definition.hash!r} is not of workflow {workflow!r}"
                )
            started = await self._start(
                keys, definition, current, input, idempotency_key, context, run_timeout_ms
            )
            if started is not None:
                return started
            self.workflows.forget(namespace, workflow)  # registered anew meanwhile
        raise FailedPrecondition(f"workflow {workflow!r} is changing too fast to start")

    async def _start(
        self,
        keys: Keys,
        definition: Definition,
        current: int,
        input: work_item_pb2.Payload,
        idempotency_key: str,
        context: work_item_pb2.Payload | None,
        run_timeout_ms: int | None,
    ) -> tuple[records_pb2.RunRecord, bool] | None:
        """Start a run of this definition, or ``None`` if it is no longer current.

        ``current`` is the revision of the workflow's current pointer the definition was found
        at (0: the hash was asked for, no pointer involved).
        """
        namespace = keys.namespace
        workflow = definition.definition.name
        record = definition
        start = definition.graph.node(definition.definition.start)
        value = payloads.parse_json(input, self.limits.max_payload_bytes, "input")
        payloads.validate(
            value, start.input_schema, f"workflow {workflow!r} input (node {start.name!r})"
        )
        context_bytes = self._initial_context(definition, context)
        if idempotency_key:  # "" starts a run with no key
            names.check_key("idempotency_key", idempotency_key)
        fingerprinted = [workflow.encode(), record.hash.encode(), input.data, context_bytes]
        if run_timeout_ms is not None:
            fingerprinted.append(b"run_timeout=%d" % run_timeout_ms)
        fingerprint = hashlib.sha256(b"\0".join(fingerprinted)).hexdigest()
        run_id = new_run_id()
        now = now_ms()
        run = records_pb2.RunRecord(
            namespace=namespace,
            run_id=run_id,
            workflow=workflow,
            definition_hash=record.hash,
            status=RUNNING,
            input=input,
            idempotency_key=idempotency_key,
        )
        if run_timeout_ms is not None:
            run.run_timeout.FromMilliseconds(run_timeout_ms)
        stamp(run, "created_at", now)
        stamp(run, "updated_at", now)
        first = start_item(
            definition.definition,
            namespace=namespace,
            run_id=run_id,
            definition_hash=record.hash,
            input=input,
        )
        stamp(first, "created_at", now)
        writes: list[Request] = [
            Put(keys.run_info(run_id), run.SerializeToString()),
            Put(keys.status(run_id), status_name(RUNNING)),
            Put(keys.running(run_id), b""),
            Put(keys.context_init(run_id), context_bytes),
            *children.readied(
                keys,
                definition,
                run,
                fresh_state(first),
                json.loads(context_bytes),
                now,
                fresh=True,
            ),
        ]
        if run_timeout_ms is not None:
            writes.append(timers.arm_run_timeout(keys, run_id, run_timeout_ms))
        guards = []
        if current:
            guards.append(Compare.modified_at(keys.workflow_current(workflow), current))
        if not idempotency_key:
            result = await self.kv.txn(Txn(guards, writes))
            return (run, True) if result.succeeded else None
        idem = keys.idempotency(idempotency_key)
        stamped = f"{run_id}\n{fingerprint}".encode()
        result = await self.kv.txn(
            Txn([*guards, Compare.missing(idem)], [Put(idem, stamped), *writes])
        )
        if result.succeeded:
            return run, True
        if current:
            pointer = await self.kv.get(keys.workflow_current(workflow))
            if pointer is None or pointer.mod_revision != current:
                return None
        existing = await self.kv.get(idem)
        if existing is None:  # pragma: no cover - idempotency keys live as long as their run
            raise AlreadyExists(f"idempotency key {idempotency_key!r} is being reused")
        existing_run, existing_fingerprint = existing.value.decode().split("\n")
        if existing_fingerprint != fingerprint:
            raise AlreadyExists(
                f"idempotency key {idempotency_key!r} already started run {existing_run} "
                "with another workflow, input or run timeout"
            )
        return await self.reads.get(namespace, existing_run), False

    def _initial_context(
        self, definition: Definition, context: work_item_pb2.Payload | None
    ) -> bytes:
        """A run's initial context: the declared initials with the start's overrides.

        Raises:
            InvalidPayload: the overrides are not an object of declared fields.
            ResourceExhausted: the context is over the limit.
        """
        overrides: dict[str, Any] = {}
        if context is not None and context.data:
            overrides = payloads.parse_json(context, self.limits.max_context_bytes, "context")
            if not isinstance(overrides, dict):
                raise InvalidPayload("context: must be a JSON object")
        try:
            initial = definition.context.initial(overrides)
        except ContextError as exc:
            raise InvalidPayload(str(exc)) from exc
        context_bytes = json.dumps(initial, separators=(",", ":"), allow_nan=False).encode()
        if len(context_bytes) > self.limits.max_context_bytes:
            raise ResourceExhausted(f"context of {len(context_bytes)} bytes is over the limit")
        return context_bytes

    async def _set_status(
        self,
        namespace: str,
        run_id: str,
        allowed: Sequence[int],
        status: int,
        verb: str,
        *,
        extra: Sequence[Request] = (),
        error: work_item_pb2.NodeError | None = None,
        also: Callable[[records_pb2.RunRecord], Awaitable[tuple[list[Compare], list[Request]]]]
        | None = None,
    ) -> records_pb2.RunRecord:
        """Move a run from one of ``allowed`` to ``status`` in one guarded Txn.

        ``also`` adds guards and writes made from the run as it is to be written.
        """
        keys = Keys(namespace)
        for _ in range(ATTEMPTS_ON_CONFLICT):
            found = await self.kv.get(keys.run_info(payloads.check_name("run id", run_id)))
            if found is None:
                raise RunNotFound(
                    f"run {run_id!r} not found in namespace {namespace!r}", run_id=run_id
                )
            run = records_pb2.RunRecord.FromString(found.value)
            if run.status == status and status == PAUSED:
                return run  # pausing a paused run changes nothing
            if run.status not in allowed:
                state = RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
                raise FailedPrecondition(f"cannot {verb} run {run_id!r}: it is {state}")
            run.status = status  # type: ignore[assignment]
            now = now_ms()
            stamp(run, "updated_at", now)
            if status in FINISHED:
                stamp(run, "finished_at", now)
            else:
                run.ClearField("finished_at")
            if error is not None:
                run.error.CopyFrom(error)
            elif status == RUNNING:
                run.ClearField("error")
                run.ClearField("failed_item")
            guards, writes = await also(run) if also is not None else ([], [])
            result = await self.kv.txn(
                Txn(
                    [Compare.modified_at(keys.run_info(run_id), found.mod_revision), *guards],
                    [
                        Put(keys.run_info(run_id), run.SerializeToString()),
                        Put(keys.status(run_id), status_name(status)),
                        *_counted(keys, run, status),
                        *extra,
                        *writes,
                    ],
                )
            )
            if result.succeeded:
                return run
        raise FailedPrecondition(f"run {run_id!r} is changing too fast to {verb}; try again")

    async def _within_quota(self, keys: Keys, idempotency_key: str) -> None:
        """Refuse a start over the namespace's quota of runs in flight (read before writing).

        A count of the running-run index, not a counter every start and end rewrites: starts
        at the same instant may pass it together, by as many as are in flight. Far below the
        quota (under :data:`QUOTA_FAR` of it), a count read less than :data:`QUOTA_FRESH` ago
        is used again, plus this replica's starts since: a start costs no read then. A start
        an idempotency key already made is not refused: it starts nothing.

        Raises:
            ResourceExhausted: the namespace has its quota of runs running or paused.
        """
        quota = self.limits.max_runs_in_flight
        if not quota:
            return
        count, when = self._counted.get(keys.namespace, (quota, 0.0))
        now = time.monotonic()
        if now - when < QUOTA_FRESH and count + 1 < quota * QUOTA_FAR:
            self._counted[keys.namespace] = (count + 1, when)  # far below it: no read
            return
        count = await self.kv.count(keys.running())
        self._counted[keys.namespace] = (count + 1, now)
        if count < quota:
            return
        if idempotency_key and await self.kv.get(keys.idempotency(idempotency_key)) is not None:
            return
        raise ResourceExhausted(
            f"namespace {keys.namespace!r} has {quota} runs in flight, its quota "
            "(max_runs_in_flight): wait for some to end"
        )

    async def cancel(self, namespace: str, run_id: str, reason: str) -> records_pb2.RunRecord:
        """Cancel a running, paused or failed run: nothing of it is dispatched again.

        Its running children are cancelled with it (settling cancels them); a child run's
        ancestors are cancelled in the same Txn.

        Raises:
            RunNotFound: no such run.
            FailedPrecondition: the run already completed or was cancelled.
        """
        keys = Keys(namespace)
        error = work_item_pb2.NodeError(
            kind=work_item_pb2.ERROR_KIND_CANCELLED, message=reason or "cancelled by request"
        )
        ancestors: list[str] = []

        async def above(run: records_pb2.RunRecord) -> tuple[list[Compare], list[Request]]:
            guards, writes, ancestors[:] = await self.lineage.ancestors(keys, run, now_ms())
            return guards, writes

        run = await self._set_status(
            namespace,
            run_id,
            (RUNNING, PAUSED, records_pb2.RUN_STATUS_FAILED),
            records_pb2.RUN_STATUS_CANCELLED,
            "cancel",
            extra=[
                Delete(keys.queue(run_id, ""), prefix=True),
                Delete(keys.timer(run_id)),  # its run timeout
                settling.settled(keys, run_id, status_name(records_pb2.RUN_STATUS_CANCELLED)),
            ],
            error=error,
            also=above,
        )
        for cancelled in [run_id, *ancestors]:
            await settling.settle(self.kv, keys, cancelled, self.limits.max_txn_ops)
        return run

    async def pause(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """Stop dispatching a running run's items; held items finish and are recorded.

        Its running children are paused after it, each in a Txn of its own.
        """
        run = await self._set_status(namespace, run_id, (RUNNING,), PAUSED, "pause")
        await self._children(namespace, run_id, RUNNING, self.pause)
        return run

    async def resume(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """Resume a paused run, or a failed one whole: every item that did not complete runs again.

        A paused run's paused children are resumed after it; a failed run's nested workflow
        items that failed start new child runs.

        Raises:
            NotStarted: no such run.
            AlreadyCompleted: the run completed, was cancelled or timed out.
            FailedPrecondition: the run is running, or failed as stuck, or is a child whose
                failure its parent took.
        """
        keys = Keys(namespace)
        try:
            found = await self.reads.get(namespace, run_id)
        except RunNotFound as exc:
            raise NotStarted(f"cannot resume: {exc}", run_id=run_id) from None
        if found.status in FINAL:
            state = RunStatus.Name(found.status).removeprefix("RUN_STATUS_").lower()
            raise AlreadyCompleted(
                f"cannot resume run {run_id!r}: it is already {state}", run_id=run_id
            )
        failed = found.status == records_pb2.RUN_STATUS_FAILED
        if failed and found.error.kind == work_item_pb2.ERROR_KIND_STUCK:
            raise FailedPrecondition(
                f"cannot resume run {run_id!r}: it failed as stuck ({found.error.message}), "
                "so nothing is left to run again; start a new run"
            )
        if failed and found.HasField("parent"):
            raise FailedPrecondition(
                f"cannot resume run {run_id!r}: it is a child run, and its failure was a failed "
                f"attempt of item {found.parent.item_id!r} of run {found.parent.run_id!r}; "
                "resume that run (or let its retry policy start a new child)"
            )
        if failed:
            await self._requeue(keys, found)
        # Only from the status it was found in: a paused run that failed meanwhile is resumed
        # again by the caller, whole.
        found_in = (
            (found.status,) if found.status in (PAUSED, records_pb2.RUN_STATUS_FAILED) else ()
        )
        run = await self._set_status(
            namespace,
            run_id,
            found_in or (PAUSED, records_pb2.RUN_STATUS_FAILED),
            RUNNING,
            "resume",
        )
        if failed:  # wide fan-outs that were not expanded while the run had failed
            expansions, _ = await self.kv.range(keys.expansion(run_id, ""))
            for expansion in expansions:
                item_id = expansion.key[len(keys.expansion(run_id, "")) :].decode()
                await self.lineage.expand(namespace, run_id, item_id)
            # A child started by the requeue that ended before the run ran again.
            await self.lineage.catch_up(namespace, run_id)
        else:
            await self._children(namespace, run_id, PAUSED, self.resume)
        return run

    async def _children(
        self,
        namespace: str,
        run_id: str,
        status: int,
        change: Callable[[str, str], Awaitable[records_pb2.RunRecord]],
    ) -> None:
        """Pause or resume the run's children that are in ``status`` (and theirs, in turn)."""
        keys = Keys(namespace)
        found, _ = await self.kv.range(keys.child(run_id))
        for link in found:
            child_id = link.key[len(keys.child(run_id)) :].decode()
            record = await self.kv.get(keys.run_info(child_id))
            if record is None or records_pb2.RunRecord.FromString(record.value).status != status:
                continue
            with contextlib.suppress(FailedPrecondition):  # it moved on meanwhile
                await change(namespace, child_id)

    async def _requeue(self, keys: Keys, run: records_pb2.RunRecord) -> None:
        """Re-queue every item of a failed run that did not complete, at attempt + 1.

        Those that failed and those settled when the run failed; completed items, join
        arrivals and failed items whose fallback took over stay. Settling stops first (its
        Txns need its marker). Bounded Txns, each guarded by the run still failed and by the
        items' revisions; a resume interrupted midway is finished by the next one.
        """
        run_id = run.run_id
        still = Compare.value_is(keys.status(run_id), status_name(records_pb2.RUN_STATUS_FAILED))
        await self.kv.txn(Txn([still], [Delete(keys.settle(run_id))]))
        definition = await self.workflows.get(keys.namespace, run.definition_hash)
        for _ in range(ATTEMPTS_ON_CONFLICT):
            found, _ = await self.kv.range(keys.item(run_id))
            targets = [kv for kv in found if _to_requeue(definition.graph, kv)]
            moved = False
            for chunk in await self._batches(keys, definition, run_id, targets):
                guards = [still, *(Compare.modified_at(kv.key, kv.mod_revision) for kv in chunk)]
                states = [_requeued(kv) for kv in chunk]
                held = [w for kv in chunk for w in settling.holds(keys, _state(kv))]
                # A child still running (settling was cut short) is cancelled: a new one starts.
                ended = await settling.children_ended(
                    self.kv, keys, run_id, chunk, "runs its item again", guards, held
                )
                readied, writes = await self.lineage.readied(keys, run, states, now_ms())
                result = await self.kv.txn(Txn([*guards, *readied], [*held, *writes]))
                moved |= not result.succeeded
                for child_id in ended if result.succeeded else ():
                    await settling.settle(self.kv, keys, child_id, self.limits.max_txn_ops)
            if not moved:
                return
        # Given up: what was re-queued is settled again, as the run is still failed.
        status = status_name(records_pb2.RUN_STATUS_FAILED)
        await self.kv.txn(Txn([still], [settling.settled(keys, run_id, status)]))
        await settling.settle(self.kv, keys, run_id, self.limits.max_txn_ops)
        raise FailedPrecondition(f"run {run_id!r} is changing too fast to resume; try again")

    async def _batches(
        self, keys: Keys, definition: Definition, run_id: str, targets: list[KeyValue]
    ) -> list[list[KeyValue]]:
        """Items to make ready again, in chunks that fit one Txn each.

        One that starts a child run writes more: the child's first items, and copies of the
        run's context and of its input.
        """
        nested = {kv.key for kv in targets if _nested(definition.graph, kv)}
        if not nested:
            return list(settling.batches(targets, self.limits.max_txn_ops - 4, per_item=5))
        weight = max(children.weight(definition, _state(kv).item.node) for kv in targets)
        copied = (await children.inherited(self.kv, keys, definition, run_id)).size

        def extra(kv: KeyValue) -> int:
            state = _state(kv)
            return children.size(definition, state.item, copied) if kv.key in nested else 0

        ops = self.limits.max_txn_ops - 4
        per_item = 5 + weight + 6  # and the cancel of a child still running, if any
        return list(settling.batches(targets, ops, per_item=per_item, extra=extra))

    async def enqueue(
        self,
        namespace: str,
        run_id: str,
        node: str,
        input: work_item_pb2.Payload,
        request_id: str,
    ) -> tuple[work_item_pb2.WorkItem, bool]:
        """Add an item for a node to a running run, once per request id.

        Raises:
            NotFound: no such run or node.
            InvalidPayload: the input does not fit the node.
            FailedPrecondition: the run is not running.
        """
        keys = Keys(namespace)
        names.check_key("request_id", request_id)
        run = await self.reads.get(namespace, run_id)
        definition = await self.workflows.get(namespace, run.definition_hash)
        try:
            target = definition.graph.node(node)
        except NodeNotFound as exc:
            raise NotFound(str(exc)) from exc
        value = payloads.parse_json(input, self.limits.max_payload_bytes, "input")
        payloads.validate(value, target.input_schema, f"node {node!r} input")
        item = work_item_pb2.WorkItem(
            namespace=namespace,
            run_id=run_id,
            item_id=derive_id("enqueue", request_id),
            node=node,
            input=input,
            attempt=1,
            definition_hash=run.definition_hash,
            workflow=run.workflow,
        )
        stamp(item, "created_at", now_ms())
        guards, writes = await self.lineage.readied(
            keys, run, [fresh_state(item)], now_ms(), fresh=True
        )
        result = await self.kv.txn(
            Txn(
                [
                    Compare.missing(keys.item(run_id, item.item_id)),
                    Compare.value_is(keys.status(run_id), status_name(RUNNING)),
                    *guards,
                ],
                writes,
            )
        )
        if result.succeeded:
            return item, True
        existing = await self.kv.get(keys.item(run_id, item.item_id))
        if existing is None:
            raise FailedPrecondition(f"run {run_id!r} is not running")
        return records_pb2.WorkItemState.FromString(existing.value).item, False


def _to_requeue(graph: Graph, found: KeyValue) -> bool:
    """Whether a failed run's item runs again when the run is resumed."""
    state = records_pb2.WorkItemState.FromString(found.value)
    if state.status == records_pb2.ITEM_STATUS_COMPLETED:
        return False
    failed = state.status in (
        records_pb2.ITEM_STATUS_PERMANENTLY_FAILED,
        records_pb2.ITEM_STATUS_FAILED,
    )
    return not (failed and graph.fallback.get(state.item.node))  # a fallback took over


def _nested(graph: Graph, found: KeyValue) -> bool:
    """Whether an item starts a child run when it is made ready."""
    node = graph.node(_state(found).item.node)
    return node.kind == workflow_pb2.NODE_KIND_SUBWORKFLOW


def _state(found: KeyValue) -> records_pb2.WorkItemState:
    return records_pb2.WorkItemState.FromString(found.value)


def _requeued(found: KeyValue) -> records_pb2.WorkItemState:
    """An item of a resumed run as it is made ready again: pending, at its next attempt."""
    state = _state(found)
    state.item.attempt = state.attempts + 1  # attempts are never lowered
    state.status = records_pb2.ITEM_STATUS_PENDING
    for field in ("retry_at", "session_id", "worker_id"):
        state.ClearField(field)
    stamp(state, "updated_at", now_ms())
    return state


def _counted(keys: Keys, run: records_pb2.RunRecord, status: int) -> list[Request]:
    """A started run's place in the quota's index as its status changes (a child has none)."""
    if run.HasField("parent") or status == PAUSED:
        return []
    if status == RUNNING:
        return [Put(keys.running(run.run_id), b"")]
    return [Delete(keys.running(run.run_id))]


async def prune_counted(kv: KV, keys: Keys, after: bytes = b"", page: int = 200) -> bytes:
    """Drop, from one page of the quota's index, runs no longer running or paused.

    Every ending Txn drops its run itself; this catches what it cannot: a run ended by a
    replica of an older version (a rolling upgrade). Each drop is guarded by the status it
    saw. Returns where the next page starts (``b""``: from the beginning again).
    """
    found, _ = await kv.range(keys.running(), start=after or None, limit=page)
    for entry in found:
        run_id = entry.key[len(keys.running()) :].decode()
        status = await kv.get(keys.status(run_id))
        if status is not None and status.value in (status_name(RUNNING), status_name(PAUSED)):
            continue
        seen = (
            Compare.missing(keys.status(run_id))
            if status is None
            else Compare.modified_at(status.key, status.mod_revision)
        )
        await kv.txn(Txn([seen], [Delete(entry.key)]))
    return found[-1].key + b"\0" if len(found) == page else b""
