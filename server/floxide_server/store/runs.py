"""Runs in the store: start, observe and control runs; enqueue, claim and complete their items.

Every state transition is one guarded transaction (DESIGN invariant 2):

- **start**: the run record, its status key, initial context, first item and its queue entry,
  and the idempotency key, if the key is new;
- **claim**: delete the queue entry, write the claim ``claim/{lease}/{run}/{item}`` (its create
  revision is the fencing token) and mark the item in progress, if the entry still exists, the
  session's key still exists and the run is RUNNING;
- **complete**: delete the claim, mark the item done, write its context operations, its
  successors and their queue entries, its join arrival (and the join item when it is the last),
  or the run's output, if the claim was created at the token's revision, the session lives and
  the run is not finished; or, for a failed attempt, a durable retry timer, a fallback, or the
  run's failure. A *sticky* completion also claims one successor for the same session in the
  same Txn (it is never queued), so a chain costs one Txn a step; and a completion starts from
  its claim's :class:`Snapshot`, so it needs no read before its Txn.

Nothing is trusted that a compare does not check: a result races its session's expiry, a
cancel, a pause or another replica, and loses cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import secrets
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from floxide_grpc._proto.floxide.v1 import (
    checkpoint_pb2,
    records_pb2,
    work_item_pb2,
    worker_service_pb2,
)
from floxide_grpc.context import Operation, apply
from floxide_grpc.errors import (
    AlreadyExists,
    ClaimLost,
    ContextError,
    FailedPrecondition,
    FloxideError,
    InvalidArgument,
    InvalidPayload,
    NodeNotFound,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WorkflowNotFound,
)
from floxide_grpc.retry import RetryPolicy
from floxide_grpc.routing import Step, arrive, join_input, route, route_failure, start_item
from floxide_grpc.transition import ErrorKind
from floxide_server.store import payloads
from floxide_server.store.keys import Keys
from floxide_server.store.kv import (
    KV,
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    Request,
    Target,
    Txn,
    TxnResult,
)
from floxide_server.store.workflows import Definition, WorkflowStore

__all__ = [
    "FINISHED",
    "MAX_CHAIN",
    "Claim",
    "ClaimToken",
    "Completion",
    "RunStore",
    "Snapshot",
    "Sticky",
    "new_run_id",
    "status_name",
]

RunStatus = records_pb2.RunStatus
ItemStatus = records_pb2.ItemStatus
RUNNING = records_pb2.RUN_STATUS_RUNNING
PAUSED = records_pb2.RUN_STATUS_PAUSED
FINAL = (records_pb2.RUN_STATUS_COMPLETED, records_pb2.RUN_STATUS_CANCELLED)
FINISHED = (*FINAL, records_pb2.RUN_STATUS_FAILED)
WAITING = (records_pb2.ITEM_STATUS_PENDING, records_pb2.ITEM_STATUS_WAITING_RETRY)
_ATTEMPTS_ON_CONFLICT = 16
LOST_ATTEMPTS = 3
"""Attempts an item may lose with its worker before it fails, when its policy allows fewer."""
TXN_HEADROOM = 28
"""Operations a completion needs besides its new items (claim, states, context, groups, token)."""
EXPANSION_CHUNK = 40
"""Items created per Txn when expanding a wide fan-out (two writes each, one compare per Txn)."""
MAX_CHAIN = 16
"""Successors a session may claim in a row with its completions (sticky), before the queue."""
MAX_GROUPS_KEPT = 10_000
"""Group records a replica keeps in memory for the next arrival (the oldest go first)."""
QUEUED_INPUT_BYTES = 1024
"""Inputs up to this size ride in fresh items' queue entries (held in dispatch's memory)."""


_last_id = [0, 0]  # the millisecond and sequence of the last id made here


def new_run_id() -> str:
    """A UUIDv7 (RFC 9562), monotonic within this process: keys of runs sort by creation."""
    ms = time.time_ns() // 1_000_000
    last_ms, sequence = _last_id
    if ms <= last_ms:
        ms, sequence = last_ms, sequence + 1
        if sequence >= 1 << 12:  # 4096 ids in one millisecond: borrow the next one
            ms, sequence = ms + 1, secrets.randbits(11)
    else:
        sequence = secrets.randbits(11)
    _last_id[:] = [ms, sequence]
    value = (
        (ms & (2**48 - 1)) << 80 | 0x7 << 76 | sequence << 64 | 0b10 << 62 | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


def _fold(definition: Definition, init: KeyValue | None, ops: Sequence[KeyValue]) -> dict[str, Any]:
    """A run's context: its initial value and every item's operations, in commit order."""
    context: dict[str, Any] = json.loads(init.value) if init is not None else {}
    for kv in sorted(ops, key=lambda kv: kv.mod_revision):
        stored = worker_service_pb2.StepResult.FromString(kv.value)
        apply(
            context,
            [Operation.from_proto(op) for op in stored.context_operations],
            definition.context,
        )
    return context


def status_name(status: int) -> bytes:
    """The value of a run's status key."""
    return RunStatus.Name(status).removeprefix("RUN_STATUS_").encode()  # type: ignore[arg-type]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fresh_state(item: work_item_pb2.WorkItem) -> records_pb2.WorkItemState:
    """The state of an item just made: pending, never attempted.

    A fresh queue entry stands for it, so a claim may rebuild it instead of reading it.
    """
    state = records_pb2.WorkItemState(status=records_pb2.ITEM_STATUS_PENDING)
    state.item.CopyFrom(item)
    state.updated_at.CopyFrom(item.created_at)
    return state


def _stamp(message: Any, field: str, ms: int) -> None:
    getattr(message, field).FromMilliseconds(ms)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a claim's Txn wrote and read, so that its completion needs no read before its Txn.

    Every part is guarded by its revision in the completing Txn: a stale snapshot costs one
    failed Txn and a retry from fresh reads, never a wrong write.

    Attributes:
        state: The item's state as the claim wrote it (serialized).
        state_revision: The revision the claim wrote it at.
        run: The run's record as the claim saw it (serialized).
        run_revision: That record's mod revision.
        depth: How many claims in a row of this chain were made by completions (sticky).
    """

    state: bytes
    state_revision: int
    run: bytes
    run_revision: int
    depth: int = 0


@dataclasses.dataclass(frozen=True)
class Claim:
    """An item claimed by a session: what the worker receives.

    Attributes:
        token: The fencing token the worker sends back with its result.
        item: The item, with its input (a join's list of outputs, assembled now).
        context: The run's context as of the claim.
        deadline_ms: When the attempt times out (0: no timeout).
        snapshot: What its completion may start from (none after a lost reply).
    """

    token: str
    item: work_item_pb2.WorkItem
    context: work_item_pb2.Payload
    deadline_ms: int
    snapshot: Snapshot | None = None


@dataclasses.dataclass(frozen=True)
class Sticky:
    """A session that may take a successor of the step it completes, in the completing Txn.

    Attributes:
        lease: The session's lease.
        serves: Whether the session runs an item's node.
    """

    lease: int
    serves: Callable[[work_item_pb2.WorkItem], bool]
    take: Callable[[], tuple[work_item_pb2.WorkItem, int] | None] = lambda: None
    """When the result has no successor for the session: a fresh queued item (its entry and
    the entry's revision) to claim in the same Txn instead, if it is still there."""
    give_back: Callable[[tuple[work_item_pb2.WorkItem, int]], None] = lambda queued: None
    """Returns a taken item that no Txn tried to claim."""


@dataclasses.dataclass(frozen=True)
class Completion:
    """How a result was taken.

    Applied (``code`` 0), or applied as a failed attempt because it was invalid (``code``
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and why); and the successor claimed with it for
    the same session, if it was sticky.
    """

    code: int = 0
    message: str = ""
    claim: Claim | None = None


@dataclasses.dataclass(frozen=True)
class ClaimToken:
    """A claim's fencing token, opaque to workers; the server parses it only here.

    It names the session's lease, the claim key's create revision, the attempt and the item.
    """

    lease: int
    revision: int
    attempt: int
    run_id: str
    item_id: str

    def __str__(self) -> str:
        return f"{self.lease:x}:{self.revision}:{self.attempt}:{self.run_id}:{self.item_id}"

    @classmethod
    def parse(cls, token: str) -> ClaimToken:
        """Read a token.

        Raises:
            InvalidArgument: it is malformed.
        """
        try:
            lease, revision, attempt, run_id, item_id = token.split(":")
            return cls(int(lease, 16), int(revision), int(attempt), run_id, item_id)
        except ValueError as exc:
            raise InvalidArgument(f"claim token {token!r} is malformed") from exc


class RunStore:
    """Runs, items, context, errors and metrics of every namespace, on a :class:`KV`."""

    def __init__(self, kv: KV, workflows: WorkflowStore, limits: payloads.Limits) -> None:
        self.kv = kv
        self.workflows = workflows
        self.limits = limits
        self._group_turns: dict[tuple[str, str, str], _Turns] = {}
        self._groups: dict[bytes, tuple[bytes, int]] = {}  # group key -> (record, revision)

    # -- reading ---------------------------------------------------------------------------

    async def get(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """A run's record.

        Raises:
            NotFound: no such run.
        """
        found = await self.kv.get(Keys(namespace).run_info(payloads.check_name("run id", run_id)))
        if found is None:
            raise NotFound(f"run {run_id!r} not found in namespace {namespace!r}")
        return records_pb2.RunRecord.FromString(found.value)

    async def _state(
        self, keys: Keys, run_id: str, item_id: str
    ) -> tuple[KeyValue, records_pb2.WorkItemState]:
        found = await self.kv.get(keys.item(run_id, item_id))
        if found is None:
            raise NotFound(f"item {item_id!r} of run {run_id!r} not found")
        return found, records_pb2.WorkItemState.FromString(found.value)

    async def list_runs(
        self,
        namespace: str,
        statuses: Sequence[int],
        workflow: str,
        size: int,
        token: str,
    ) -> tuple[list[records_pb2.RunRecord], str]:
        """Runs newest first, filtered by status and workflow; a page and the next token."""
        keys = Keys(namespace)
        for status in statuses:
            if status not in RunStatus.values() or status == records_pb2.RUN_STATUS_UNSPECIFIED:
                raise InvalidArgument(f"unknown run status {status} in the filter")
        size = payloads.page_size(size)
        after = payloads.decode_page_token(token)
        start = keys.run_info(after) if after else None
        found: list[records_pb2.RunRecord] = []
        while len(found) < size:
            batch, _ = await self.kv.range(
                keys.run_infos, start=start, limit=size + 1, reverse=True
            )
            batch = [kv for kv in batch if after is None or kv.key != keys.run_info(after)]
            if not batch:
                break
            for kv in batch:
                record = records_pb2.RunRecord.FromString(kv.value)
                if (not statuses or record.status in statuses) and (
                    not workflow or record.workflow == workflow
                ):
                    found.append(record)
            after = records_pb2.RunRecord.FromString(batch[-1].value).run_id
            start = keys.run_info(after)
        page = found[:size]
        more = len(found) > size or (
            len(page) == size and bool(await self._older(keys, page[-1].run_id))
        )
        return page, payloads.encode_page_token(page[-1].run_id) if more and page else ""

    async def _older(self, keys: Keys, run_id: str) -> bool:
        batch, _ = await self.kv.range(
            keys.run_infos, start=keys.run_info(run_id), limit=2, reverse=True
        )
        return any(kv.key != keys.run_info(run_id) for kv in batch)

    async def items(
        self,
        namespace: str,
        run_id: str,
        statuses: Sequence[int] = (),
        size: int = 0,
        token: str = "",
    ) -> tuple[list[records_pb2.WorkItemState], str]:
        """A run's items with their states, filtered by status; a page and the next token."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        size = payloads.page_size(size)
        after = payloads.decode_page_token(token)
        start = keys.item(run_id, after) + b"\0" if after else None
        found: list[records_pb2.WorkItemState] = []
        last = ""
        while len(found) <= size:
            batch, _ = await self.kv.range(keys.item(run_id), start=start, limit=size + 1)
            if not batch:
                break
            for kv in batch:
                state = records_pb2.WorkItemState.FromString(kv.value)
                last = state.item.item_id
                if not statuses or state.status in statuses:
                    found.append(state)
                if len(found) > size:
                    break
            start = keys.item(run_id, last) + b"\0"
        page = found[:size]
        return page, payloads.encode_page_token(page[-1].item.item_id) if len(found) > size else ""

    async def pending(
        self, namespace: str, run_id: str, size: int = 0, token: str = ""
    ) -> tuple[list[work_item_pb2.WorkItem], str]:
        """Items waiting for dispatch or a retry timer."""
        states, next_token = await self.items(namespace, run_id, WAITING, size, token)
        return [s.item for s in states], next_token

    async def errors(
        self, namespace: str, run_id: str, size: int = 0, token: str = ""
    ) -> tuple[list[records_pb2.ErrorRecord], str]:
        """A run's failed attempts, oldest first."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        found, _ = await self.kv.range(keys.error(run_id))
        records = sorted(
            (records_pb2.ErrorRecord.FromString(kv.value) for kv in found),
            key=lambda r: (r.occurred_at.ToMilliseconds(), r.item_id, r.attempt),
        )
        size = payloads.page_size(size)
        offset = int(payloads.decode_page_token(token) or 0)
        page = records[offset : offset + size]
        more = offset + size < len(records)
        return page, payloads.encode_page_token(str(offset + size)) if more else ""

    async def metrics(self, namespace: str, run_id: str) -> records_pb2.RunMetrics:
        """Counts derived from the run's items and errors (no counter key is ever rewritten)."""
        await self.get(namespace, run_id)
        keys = Keys(namespace)
        metrics = records_pb2.RunMetrics(namespace=namespace, run_id=run_id)
        items, _ = await self.kv.range(keys.item(run_id))
        for kv in items:
            state = records_pb2.WorkItemState.FromString(kv.value)
            metrics.total_work_items += 1
            metrics.retries += max(state.attempts - 1, 0)
            match state.status:
                case records_pb2.ITEM_STATUS_COMPLETED:
                    metrics.completed += 1
                case records_pb2.ITEM_STATUS_PERMANENTLY_FAILED:
                    metrics.failed += 1
                case records_pb2.ITEM_STATUS_PENDING:
                    metrics.pending += 1
                case records_pb2.ITEM_STATUS_IN_PROGRESS:
                    metrics.in_progress += 1
                case records_pb2.ITEM_STATUS_WAITING_RETRY:
                    metrics.waiting_retry += 1
        errors, _ = await self.kv.range(keys.error(run_id))
        metrics.worker_lost = sum(
            records_pb2.ErrorRecord.FromString(kv.value).error.kind
            == work_item_pb2.ERROR_KIND_WORKER_LOST
            for kv in errors
        )
        return metrics

    async def context(self, namespace: str, run_id: str) -> dict[str, Any]:
        """The run's context now: its initial value and every item's operations, in order."""
        record = await self.get(namespace, run_id)
        return await self._context(Keys(namespace), record)

    async def _context(self, keys: Keys, record: records_pb2.RunRecord) -> dict[str, Any]:
        definition = await self.workflows.get(keys.namespace, record.definition_hash)
        init, (ops, _) = await asyncio.gather(
            self.kv.get(keys.context_init(record.run_id)),
            self.kv.range(keys.context_ops(record.run_id)),
        )
        return _fold(definition, init, ops)

    # -- starting and controlling ------------------------------------------------------------

    async def start(
        self,
        namespace: str,
        workflow: str,
        definition_hash: str,
        input: work_item_pb2.Payload,
        idempotency_key: str,
        context: work_item_pb2.Payload | None,
    ) -> tuple[records_pb2.RunRecord, bool]:
        """Start a run, or return the one this idempotency key started.

        Raises:
            WorkflowNotFound: unknown workflow or hash.
            InvalidPayload: the input or context does not fit its schema.
            ResourceExhausted: a payload is over the limit.
            AlreadyExists: the idempotency key started a run with another request.
        """
        keys = Keys(namespace)
        for _ in range(_ATTEMPTS_ON_CONFLICT):
            current = 0
            if not definition_hash:
                hash_now, current = await self.workflows.current(namespace, workflow)
            definition = await self.workflows.get(namespace, definition_hash or hash_now)
            if definition.definition.name != workflow:
                raise WorkflowNotFound(
                    f"definition {definition.hash!r} is not of workflow {workflow!r}"
                )
            started = await self._start(keys, definition, current, input, idempotency_key, context)
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
        if len(idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        fingerprint = hashlib.sha256(
            b"\0".join([workflow.encode(), record.hash.encode(), input.data, context_bytes])
        ).hexdigest()
        run_id = new_run_id()
        now = _now_ms()
        run = records_pb2.RunRecord(
            namespace=namespace,
            run_id=run_id,
            workflow=workflow,
            definition_hash=record.hash,
            status=RUNNING,
            input=input,
            idempotency_key=idempotency_key,
        )
        _stamp(run, "created_at", now)
        _stamp(run, "updated_at", now)
        first = start_item(
            definition.definition,
            namespace=namespace,
            run_id=run_id,
            definition_hash=record.hash,
            input=input,
        )
        _stamp(first, "created_at", now)
        writes: list[Request] = [
            Put(keys.run_info(run_id), run.SerializeToString()),
            Put(keys.status(run_id), status_name(RUNNING)),
            Put(keys.context_init(run_id), context_bytes),
            *self._new_items(keys, [first]),
        ]
        guards = []
        if current:
            guards.append(Compare.modified_at(keys.workflow_current(workflow), current))
        if not idempotency_key:
            result = await self.kv.txn(Txn(guards, writes))
            return (run, True) if result.succeeded else None
        idem = keys.idempotency(idempotency_key)
        stamp = f"{run_id}\n{fingerprint}".encode()
        result = await self.kv.txn(
            Txn([*guards, Compare.missing(idem)], [Put(idem, stamp), *writes])
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
                "with another workflow or input"
            )
        return await self.get(namespace, existing_run), False

    def _new_items(self, keys: Keys, items: Sequence[work_item_pb2.WorkItem]) -> list[Request]:
        """Writes that create pending items and their queue entries."""
        writes: list[Request] = []
        for item in items:
            state = _fresh_state(item)
            writes.append(Put(keys.item(item.run_id, item.item_id), state.SerializeToString()))
            writes.extend(self._queue_entry(keys, item, fresh=True))
        return writes

    @staticmethod
    def _queue_entry(
        keys: Keys, item: work_item_pb2.WorkItem, *, fresh: bool = False
    ) -> list[Request]:
        """The write that makes an item ready: its queue entry.

        A *fresh* item (just created, never attempted: its state is the item, pending) with a
        small input keeps its input in the entry, so that a claim can rebuild its state without
        reading it; any other entry is the item without its input.
        """
        entry = work_item_pb2.WorkItem()
        entry.CopyFrom(item)
        if not fresh or entry.input.ByteSize() > QUEUED_INPUT_BYTES:
            entry.ClearField("input")
        return [Put(keys.queue(item.run_id, item.item_id), entry.SerializeToString())]

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
    ) -> records_pb2.RunRecord:
        """Move a run from one of ``allowed`` to ``status`` in one guarded Txn."""
        keys = Keys(namespace)
        for _ in range(_ATTEMPTS_ON_CONFLICT):
            found = await self.kv.get(keys.run_info(payloads.check_name("run id", run_id)))
            if found is None:
                raise NotFound(f"run {run_id!r} not found in namespace {namespace!r}")
            run = records_pb2.RunRecord.FromString(found.value)
            if run.status == status and status == PAUSED:
                return run  # pausing a paused run changes nothing
            if run.status not in allowed:
                state = RunStatus.Name(run.status).removeprefix("RUN_STATUS_").lower()
                raise FailedPrecondition(f"cannot {verb} run {run_id!r}: it is {state}")
            run.status = status  # type: ignore[assignment]
            now = _now_ms()
            _stamp(run, "updated_at", now)
            if status in FINISHED:
                _stamp(run, "finished_at", now)
            else:
                run.ClearField("finished_at")
            if error is not None:
                run.error.CopyFrom(error)
            elif status == RUNNING:
                run.ClearField("error")
            result = await self.kv.txn(
                Txn(
                    [Compare.modified_at(keys.run_info(run_id), found.mod_revision)],
                    [
                        Put(keys.run_info(run_id), run.SerializeToString()),
                        Put(keys.status(run_id), status_name(status)),
                        *extra,
                    ],
                )
            )
            if result.succeeded:
                return run
        raise FailedPrecondition(f"run {run_id!r} is changing too fast to {verb}; try again")

    async def cancel(self, namespace: str, run_id: str, reason: str) -> records_pb2.RunRecord:
        """Cancel a running, paused or failed run: nothing of it is dispatched again.

        Raises:
            NotFound: no such run.
            FailedPrecondition: the run already completed or was cancelled.
        """
        keys = Keys(namespace)
        error = work_item_pb2.NodeError(
            kind=work_item_pb2.ERROR_KIND_CANCELLED, message=reason or "cancelled by request"
        )
        run = await self._set_status(
            namespace,
            run_id,
            (RUNNING, PAUSED, records_pb2.RUN_STATUS_FAILED),
            records_pb2.RUN_STATUS_CANCELLED,
            "cancel",
            extra=[Delete(keys.queue(run_id, ""), prefix=True)],
            error=error,
        )
        await self._settle_leftovers(keys, run_id, records_pb2.ITEM_STATUS_CANCELLED)
        return run

    async def pause(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """Stop dispatching a running run's items; held items finish and are recorded."""
        return await self._set_status(namespace, run_id, (RUNNING,), PAUSED, "pause")

    async def resume(self, namespace: str, run_id: str) -> records_pb2.RunRecord:
        """Resume a paused run, or a failed one by re-queueing its failed items.

        Raises:
            NotFound: no such run.
            FailedPrecondition: the run is running, completed or cancelled.
        """
        keys = Keys(namespace)
        found = await self.get(namespace, run_id)
        requeue: list[Request] = []
        if found.status == records_pb2.RUN_STATUS_FAILED:
            graph = (await self.workflows.get(namespace, found.definition_hash)).graph
            states, _ = await self.kv.range(keys.item(run_id))
            for kv in states:
                state = records_pb2.WorkItemState.FromString(kv.value)
                failed = state.status in (
                    records_pb2.ITEM_STATUS_PERMANENTLY_FAILED,
                    records_pb2.ITEM_STATUS_FAILED,
                )
                if failed and not graph.fallback.get(state.item.node):  # a fallback took over
                    state.item.attempt = state.attempts + 1  # attempts are never lowered
                    state.status = records_pb2.ITEM_STATUS_PENDING
                    requeue.append(Put(kv.key, state.SerializeToString()))
                    entry = work_item_pb2.WorkItem()
                    entry.CopyFrom(state.item)
                    entry.ClearField("input")
                    requeue.append(
                        Put(keys.queue(run_id, state.item.item_id), entry.SerializeToString())
                    )
        return await self._set_status(
            namespace,
            run_id,
            (PAUSED, records_pb2.RUN_STATUS_FAILED),
            RUNNING,
            "resume",
            extra=requeue,
        )

    async def _settle_leftovers(self, keys: Keys, run_id: str, status: int) -> None:
        """Mark what still waits in a finished run (best effort, in bounded batches)."""
        states, _ = await self.kv.range(keys.item(run_id))
        writes: list[Request] = []
        for kv in states:
            state = records_pb2.WorkItemState.FromString(kv.value)
            if state.status in WAITING:
                state.status = status  # type: ignore[assignment]
                writes.append(Put(kv.key, state.SerializeToString()))
        for start in range(0, len(writes), self.limits.max_txn_ops - 4):
            await self.kv.txn(
                Txn(
                    [
                        Compare(
                            keys.status(run_id), Target.VALUE, Op.NOT_EQUAL, status_name(RUNNING)
                        )
                    ],
                    writes[start : start + self.limits.max_txn_ops - 4],
                )
            )

    # -- the queue -----------------------------------------------------------------------------

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
        payloads.check_name("request_id", request_id)
        run = await self.get(namespace, run_id)
        definition = await self.workflows.get(namespace, run.definition_hash)
        try:
            target = definition.graph.node(node)
        except NodeNotFound as exc:
            raise NotFound(str(exc)) from exc
        value = payloads.parse_json(input, self.limits.max_payload_bytes, "input")
        payloads.validate(value, target.input_schema, f"node {node!r} input")
        from floxide_grpc.routing import derive_id  # noqa: PLC0415

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
        _stamp(item, "created_at", _now_ms())
        result = await self.kv.txn(
            Txn(
                [
                    Compare.missing(keys.item(run_id, item.item_id)),
                    Compare.value_is(keys.status(run_id), status_name(RUNNING)),
                ],
                self._new_items(keys, [item]),
            )
        )
        if result.succeeded:
            return item, True
        existing = await self.kv.get(keys.item(run_id, item.item_id))
        if existing is None:
            raise FailedPrecondition(f"run {run_id!r} is not running")
        return records_pb2.WorkItemState.FromString(existing.value).item, False

    async def ready(self, namespace: str, limit: int = 0) -> list[work_item_pb2.WorkItem]:
        """Queue entries in run order (inputs not included)."""
        found, _ = await self.kv.range(Keys(namespace).queue(), limit=limit)
        entries = [work_item_pb2.WorkItem.FromString(kv.value) for kv in found]
        for entry in entries:
            entry.ClearField("input")
        return entries

    async def claim(
        self,
        namespace: str,
        lease: int,
        run_id: str,
        item_id: str,
        *,
        queued: tuple[work_item_pb2.WorkItem, int] | None = None,
    ) -> Claim | None:
        """Claim a queued item for a session.

        Args:
            namespace: The run's namespace.
            lease: The session's lease.
            run_id: The item's run.
            item_id: The item.
            queued: The item's queue entry and its revision, as dispatch saw it: a fresh item's
                entry has its input, and its state is rebuilt from it instead of read (the
                claim's guard on the state's revision makes that exact).

        Returns:
            The claim, or ``None`` if another session got it first, the run is not running, or
            the session has ended.
        """
        keys = Keys(namespace)
        if queued is not None and queued[0].HasField("input"):
            state, revision = _fresh_state(queued[0]), queued[1]
        else:
            found, state = await self._state(keys, run_id, item_id)
            revision = found.mod_revision
        if state.status != records_pb2.ITEM_STATUS_PENDING:
            return None
        # The same guarded claim a completion nests to take a sibling, under the session's guard.
        handover = self._claiming_queued(keys, lease, state, revision)
        assert handover.nested_txn is not None
        result = await self.kv.txn(
            Txn([Compare.exists(keys.session(lease))], [handover.nested_txn])
        )
        if not result.succeeded:
            return None
        return await self._handed_over(keys, lease, handover, result)

    def _claiming(
        self, keys: Keys, lease: int, state: records_pb2.WorkItemState, now: int
    ) -> tuple[list[Request], list[Request]]:
        """Mark an item in progress for a session: the writes, and the reads its assignment needs.

        The reads go after the writes in the same Txn, which sees them (as etcd's Txn does).
        """
        item = state.item
        attempt = max(item.attempt, 1)
        state.status = records_pb2.ITEM_STATUS_IN_PROGRESS
        state.attempts = attempt
        state.session_id = f"{lease:x}"
        _stamp(state, "updated_at", now)
        writes: list[Request] = [
            Put(keys.claim(lease, item.run_id, item.item_id), str(attempt).encode()),
            Put(keys.item(item.run_id, item.item_id), state.SerializeToString()),
        ]
        reads: list[Request] = [
            Get(keys.context_init(item.run_id)),
            Get(keys.context_ops(item.run_id), prefix=True),
        ]
        if item.join_group_id:
            reads.append(Get(keys.group_outputs(item.run_id, item.join_group_id), prefix=True))
        return writes, reads

    async def _assignment(
        self,
        keys: Keys,
        lease: int,
        state: records_pb2.WorkItemState,
        writes: list[Request],
        revision: int,
        got: list[object] | None,
        run: KeyValue | None,
        depth: int,
        now: int,
    ) -> Claim | None:
        """The claim of an item that a Txn made of :meth:`_claiming`'s writes and reads.

        ``got`` holds the responses of those reads, or ``None`` when the Txn's reply was lost
        and was recovered: then they are read again, as they would have been.
        """
        item = state.item
        run_id, item_id = item.run_id, item.item_id
        written = typing.cast(Put, writes[1]).value
        definition = await self.workflows.get(keys.namespace, item.definition_hash)
        if got is None:
            claim = await self.kv.get(keys.claim(lease, run_id, item_id))
            if claim is None:
                return None
            revision = claim.create_revision
            init = await self.kv.get(keys.context_init(run_id))
            ops, _ = await self.kv.range(keys.context_ops(run_id))
            outputs: Sequence[KeyValue] = []
            if item.join_group_id:
                outputs, _ = await self.kv.range(keys.group_outputs(run_id, item.join_group_id))
            snapshot = None
        else:
            reads = typing.cast(list[list[KeyValue]], got)
            init = reads[0][0] if reads[0] else None
            ops = reads[1]
            outputs = reads[2] if item.join_group_id else []
            snapshot = (
                Snapshot(written, revision, run.value, run.mod_revision, depth)
                if run is not None
                else None
            )
        if item.join_group_id:
            arrivals = [checkpoint_pb2.GroupArrival.FromString(kv.value) for kv in outputs]
            item.input.CopyFrom(join_input([a.output for a in arrivals if not a.held]))
        context = _fold(definition, init, ops)
        node = definition.graph.node(item.node)
        deadline = now + node.timeout.ToMilliseconds() if node.HasField("timeout") else 0
        return Claim(
            token=str(ClaimToken(lease, revision, state.attempts, run_id, item_id)),
            item=item,
            context=work_item_pb2.Payload(
                encoding=work_item_pb2.ENCODING_JSON,
                data=json.dumps(context, separators=(",", ":")).encode(),
            ),
            deadline_ms=deadline,
            snapshot=snapshot,
        )

    # -- completing ----------------------------------------------------------------------------

    async def complete(
        self,
        namespace: str,
        token: str,
        transition: work_item_pb2.Transition,
        operations: Sequence[work_item_pb2.ContextOperation] = (),
        *,
        snapshot: Snapshot | None = None,
        sticky: Sticky | None = None,
    ) -> Completion:
        """Apply a claimed item's result once, fenced by its token.

        Args:
            namespace: The run's namespace.
            token: The claim's fencing token.
            transition: What the node returned.
            operations: The context operations it recorded.
            snapshot: The claim's snapshot: the first Txn is tried from it, with no read first.
            sticky: The session may take a successor in the same Txn (a chain stays on it).

        Returns:
            How it was taken: applied, or applied as a failed attempt because it was invalid;
            with the successor's claim if one was taken.

        Raises:
            InvalidArgument: the token is malformed.
            ClaimLost: the claim no longer stands or its session ended; nothing changed.
            AlreadyExists: this result was already applied; nothing changed.
            Unavailable: other completions kept winning the same keys; nothing changed, and
                the claim stands: send the result again.
        """
        claim = ClaimToken.parse(token)
        keys = Keys(namespace)
        stack = (
            records_pb2.WorkItemState.FromString(snapshot.state).item.group_stack
            if snapshot is not None
            else None
        )
        if not stack:
            return await self._complete(keys, claim, transition, operations, snapshot, sticky)
        # A branch may arrive at its group, whose record all its branches rewrite: on this
        # replica they take turns, so they do not fail each other's compares.
        key = (namespace, claim.run_id, stack[-1].group_id)
        turns = self._group_turns.setdefault(key, _Turns())
        turns.users += 1
        try:
            async with turns.lock:
                return await self._complete(keys, claim, transition, operations, snapshot, sticky)
        finally:
            turns.users -= 1
            if not turns.users:
                del self._group_turns[key]

    async def _complete(
        self,
        keys: Keys,
        claim: ClaimToken,
        transition: work_item_pb2.Transition,
        operations: Sequence[work_item_pb2.ContextOperation],
        snapshot: Snapshot | None,
        sticky: Sticky | None,
    ) -> Completion:
        taken: list[tuple[work_item_pb2.WorkItem, int]] = []  # a sibling, taken once, kept
        tried = False
        try:
            for attempt in range(_ATTEMPTS_ON_CONFLICT):
                done, snapshot, tried = await self._attempt(
                    keys, claim, transition, operations, snapshot, sticky, taken
                )
                if done is not None:
                    return done
                if attempt:  # another replica keeps winning: back off, with jitter
                    await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.1)))
        finally:
            if taken and not tried and sticky is not None:
                sticky.give_back(taken[0])
        # The claim still stands: the worker sends the result again (never dropped).
        raise Unavailable(f"item {claim.item_id!r}: too much contention, send the result again")

    async def _attempt(
        self,
        keys: Keys,
        claim: ClaimToken,
        transition: work_item_pb2.Transition,
        operations: Sequence[work_item_pb2.ContextOperation],
        snapshot: Snapshot | None,
        sticky: Sticky | None,
        taken: list[tuple[work_item_pb2.WorkItem, int]],
    ) -> tuple[Completion | None, Snapshot | None, bool]:
        """One completing Txn.

        Returns:
            The completion if the Txn committed, else ``None``; the snapshot the next attempt
            starts from (``None``: fresh reads); whether a Txn tried the sibling in ``taken``
            (taken from ``sticky`` at most once, kept across attempts).
        """
        namespace = keys.namespace
        claim_key = keys.claim(claim.lease, claim.run_id, claim.item_id)
        if snapshot is None:
            snapshot = await self._claimed(keys, claim)
        state = records_pb2.WorkItemState.FromString(snapshot.state)
        run = records_pb2.RunRecord.FromString(snapshot.run)
        definition = await self.workflows.get(namespace, run.definition_hash)
        plan = await self._plan(keys, definition, run, state, claim, transition, operations)
        guards = [
            Compare.created_at(claim_key, claim.revision),
            Compare.exists(keys.session(claim.lease)),
            *(
                Compare(keys.status(claim.run_id), Target.VALUE, Op.NOT_EQUAL, status_name(s))
                for s in FINISHED
            ),
            Compare.modified_at(keys.item(claim.run_id, claim.item_id), snapshot.state_revision),
            Compare.modified_at(keys.run_info(claim.run_id), snapshot.run_revision),
            *plan.guards,
        ]
        successor = None
        handover: _Handover | None = None
        # Nothing more for a run this Txn ends: and a nested claim's compares would read the
        # run as it was before it (etcd evaluates every compare of a Txn first).
        if sticky is not None and not plan.ends_run and run.status == RUNNING:
            successor = next((i for i in plan.new_items if sticky.serves(i)), None)
            if successor is not None:  # claimed here, never queued
                guards.append(Compare.value_is(keys.status(claim.run_id), status_name(RUNNING)))
                handover = _Handover(records_pb2.WorkItemState(item=successor))
                handover.claiming, handover.reads = self._claiming(
                    keys, sticky.lease, handover.state, _now_ms()
                )
                handover.run = KeyValue(b"", snapshot.run, 0, snapshot.run_revision, 0)
                handover.depth = snapshot.depth + 1
            else:
                if not taken and (sibling := sticky.take()) is not None:
                    taken.append(sibling)
                    if (sibling[0].run_id, sibling[0].item_id) == (claim.run_id, claim.item_id):
                        taken.clear()  # a stale entry of this very item: nothing to claim
                if taken:
                    sibling_item, revision = taken[0]
                    handover = self._claiming_queued(
                        keys, sticky.lease, _fresh_state(sibling_item), revision
                    )
        writes: list[Request] = [
            Delete(claim_key),
            *plan.writes,
            *self._new_items(keys, [i for i in plan.new_items if i is not successor]),
        ]
        if handover is not None:
            writes.extend(handover.requests)
        result = await self.kv.txn(Txn(guards, writes))
        self._remember(plan, result.revision if result.succeeded else 0)
        if not result.succeeded:
            await self._why_not(keys, claim)
            return None, None, False  # anything else moved: retry from fresh reads
        for run_id, item_id in plan.expansions:
            await self.expand(namespace, run_id, item_id)
        if plan.finished:
            await self._settle_leftovers(keys, claim.run_id, records_pb2.ITEM_STATUS_CANCELLED)
        if handover is None or sticky is None:
            return plan.completion, None, False
        next_claim = await self._handed_over(keys, sticky.lease, handover, result)
        return (
            dataclasses.replace(plan.completion, claim=next_claim),
            None,
            handover.nested_txn is not None,
        )

    async def _handed_over(
        self, keys: Keys, lease: int, handover: _Handover, result: TxnResult
    ) -> Claim | None:
        """The claim a committed Txn made for the session, if it made one.

        A nested claim (a queued item's own Txn, last) may have failed alone.
        """
        got = None
        if result.responses is not None:
            got = result.responses[-len(handover.reads) :]
            if handover.nested_txn is not None:
                inner = typing.cast(TxnResult, result.responses[-1])
                if not inner.succeeded or inner.responses is None:
                    return None
                got = inner.responses[-len(handover.reads) :]
                found = typing.cast(list[KeyValue], inner.responses[-len(handover.reads) - 1])
                handover.run = found[0] if found else None
        return await self._assignment(
            keys,
            lease,
            handover.state,
            handover.claiming,
            result.revision,
            got,
            handover.run,
            handover.depth,
            _now_ms(),
        )

    def _claiming_queued(
        self, keys: Keys, lease: int, state: records_pb2.WorkItemState, revision: int
    ) -> _Handover:
        """A Txn (to run alone or nested) that claims a queued pending item for a session.

        It holds if the item's queue entry exists, its state is still the one written at
        ``revision``, and its run is running.
        """
        item = state.item
        handover = _Handover(state)
        handover.claiming, handover.reads = self._claiming(keys, lease, state, _now_ms())
        handover.nested_txn = Txn(
            [
                Compare.exists(keys.queue(item.run_id, item.item_id)),
                Compare.modified_at(keys.item(item.run_id, item.item_id), revision),
                Compare.value_is(keys.status(item.run_id), status_name(RUNNING)),
            ],
            [
                Delete(keys.queue(item.run_id, item.item_id)),
                *handover.claiming,
                Get(keys.run_info(item.run_id)),
                *handover.reads,
            ],
        )
        return handover

    def _remember(self, plan: _Plan, revision: int) -> None:
        """Keep the group records a Txn wrote at ``revision`` (0: forget them, unknown now).

        The next arrival in the group starts from the record instead of reading it; its
        compare on the revision tells if another replica moved it meanwhile.
        """
        for key, record in plan.groups.items():
            self._groups.pop(key, None)
            if revision and record is not None:
                self._groups[key] = (record, revision)
        while len(self._groups) > MAX_GROUPS_KEPT:  # groups of runs that stopped arriving
            del self._groups[next(iter(self._groups))]

    async def _claimed(self, keys: Keys, claim: ClaimToken) -> Snapshot:
        """Read what a completion starts from (one round trip), if the claim still stands."""
        (state_kv, state), claim_kv, run_kv = await asyncio.gather(
            self._state(keys, claim.run_id, claim.item_id),
            self.kv.get(keys.claim(claim.lease, claim.run_id, claim.item_id)),
            self.kv.get(keys.run_info(claim.run_id)),
        )
        if claim_kv is None or claim_kv.create_revision != claim.revision:
            if (
                state.status == records_pb2.ITEM_STATUS_COMPLETED
                and state.attempts == claim.attempt
            ):
                raise AlreadyExists(f"the result of item {claim.item_id!r} was already applied")
            raise ClaimLost(
                f"the claim on item {claim.item_id!r} of run {claim.run_id!r} no longer stands"
            )
        if run_kv is None:
            raise NotFound(f"run {claim.run_id!r} not found in namespace {keys.namespace!r}")
        return Snapshot(state_kv.value, state_kv.mod_revision, run_kv.value, run_kv.mod_revision)

    async def _why_not(self, keys: Keys, claim: ClaimToken) -> None:
        """After a failed completing Txn, raise if that is final; return if it may be retried.

        Final: the session ended, or the run finished. Retried: a group's counter moved by
        another replica, a pause, a stale snapshot, a lost claim (the fresh read tells).
        """
        if await self.kv.get(keys.session(claim.lease)) is None:
            raise ClaimLost(f"the session of claim on item {claim.item_id!r} has ended")
        status = await self.kv.get(keys.status(claim.run_id))
        if status is not None and status.value in {status_name(s) for s in FINISHED}:
            claim_key = keys.claim(claim.lease, claim.run_id, claim.item_id)
            await self.kv.txn(
                Txn([Compare.created_at(claim_key, claim.revision)], [Delete(claim_key)])
            )
            raise ClaimLost(
                f"run {claim.run_id!r} is {status.value.decode().lower()}: result dropped"
            )

    async def _plan(
        self,
        keys: Keys,
        definition: Definition,
        run: records_pb2.RunRecord,
        state: records_pb2.WorkItemState,
        claim: ClaimToken,
        transition: work_item_pb2.Transition,
        operations: Sequence[work_item_pb2.ContextOperation],
    ) -> _Plan:
        item = state.item
        plan = _Plan()
        now = _now_ms()
        if transition.WhichOneof("outcome") != "abort":
            try:
                step = self._route_success(definition, item, transition, operations)
            except FloxideError as exc:
                kind = work_item_pb2.ERROR_KIND_INVALID_OUTPUT
                error = work_item_pb2.NodeError(kind=kind, message=str(exc))
                plan.completion = Completion(exc.code.value, str(exc))
                await self._plan_failure(keys, definition, run, state, error, plan, now)
                return plan
            state.status = records_pb2.ITEM_STATUS_COMPLETED
            _stamp(state, "updated_at", now)
            plan.writes.append(Put(keys.item(item.run_id, item.item_id), state.SerializeToString()))
            if operations:
                stored = worker_service_pb2.StepResult(
                    run_id=item.run_id,
                    item_id=item.item_id,
                    attempt=claim.attempt,
                    context_operations=operations,
                )
                plan.writes.append(
                    Put(keys.context_ops(item.run_id, item.item_id), stored.SerializeToString())
                )
            await self._plan_step(keys, run, item, step, plan, now)
            return plan
        await self._plan_failure(keys, definition, run, state, transition.abort, plan, now)
        return plan

    def _route_success(
        self,
        definition: Definition,
        item: work_item_pb2.WorkItem,
        transition: work_item_pb2.Transition,
        operations: Sequence[work_item_pb2.ContextOperation],
    ) -> Step:
        node = definition.graph.node(item.node)
        outputs = (
            [transition.next.output]
            if transition.WhichOneof("outcome") == "next"
            else list(transition.next_all.outputs)
            if transition.WhichOneof("outcome") == "next_all"
            else []
        )
        where = f"node {node.name!r} output"
        for output in outputs:
            value = payloads.parse_json(output, self.limits.max_payload_bytes, where)
            payloads.validate(value, node.output_schema, where)
        for operation in operations:
            parsed = Operation.from_proto(operation)
            definition.context.check(parsed)
            payloads.parse_json(
                operation.value, self.limits.max_payload_bytes, f"context field {operation.field!r}"
            )
        step = route(definition.graph, item, transition)
        return step

    async def _plan_step(
        self,
        keys: Keys,
        run: records_pb2.RunRecord,
        item: work_item_pb2.WorkItem,
        step: Step,
        plan: _Plan,
        now: int,
    ) -> None:
        new_items = list(step.items)
        groups: dict[str, tuple[KeyValue | None, checkpoint_pb2.JoinGroup | None]] = {}
        for arrival in step.arrivals:
            group_id = arrival.frame.group_id
            if group_id not in groups:
                group_key = keys.group(run.run_id, group_id)
                cached = self._groups.get(group_key)
                found = (
                    KeyValue(group_key, cached[0], 0, cached[1], 0)
                    if cached is not None
                    else await self.kv.get(group_key)
                )
                groups[group_id] = (
                    found,
                    checkpoint_pb2.JoinGroup.FromString(found.value) if found else None,
                )
            found, group = groups[group_id]
            group, join = arrive(group, arrival, item, inline=False)
            groups[group_id] = (found, group)
            out = checkpoint_pb2.GroupArrival(
                index=arrival.frame.index, held=arrival.output is None
            )
            if arrival.output is not None:
                out.output.CopyFrom(arrival.output)
            out_key = keys.group_output(run.run_id, group_id, arrival.frame.index)
            plan.guards.append(Compare.missing(out_key))
            plan.writes.append(Put(out_key, out.SerializeToString()))
            if join is not None:
                new_items.append(join)
        for group_id, (found, group) in groups.items():
            assert group is not None
            group_key = keys.group(run.run_id, group_id)
            plan.guards.append(Compare.modified_at(group_key, found.mod_revision if found else 0))
            written = group.SerializeToString()
            plan.writes.append(Put(group_key, written))
            plan.groups[group_key] = written if len(group.arrivals) < group.size else None
        for new in new_items:
            _stamp(new, "created_at", now)
        if 2 * len(new_items) > self.limits.max_txn_ops - TXN_HEADROOM:
            # Too wide for one Txn (etcd's --max-txn-ops): a durable expansion record now, the
            # items in bounded Txns right after; a crash in between loses nothing (reconcile).
            record = checkpoint_pb2.Checkpoint(
                namespace=keys.namespace, run_id=run.run_id, pending=new_items
            )
            plan.writes.append(
                Put(keys.expansion(run.run_id, item.item_id), record.SerializeToString())
            )
            plan.expansions.append((run.run_id, item.item_id))
        else:
            plan.new_items.extend(new_items)
        if step.output is not None:
            run.status = records_pb2.RUN_STATUS_COMPLETED
            run.output.CopyFrom(step.output)
            _stamp(run, "finished_at", now)
            _stamp(run, "updated_at", now)
            plan.writes.append(Put(keys.run_info(run.run_id), run.SerializeToString()))
            plan.writes.append(Put(keys.status(run.run_id), status_name(run.status)))
            plan.writes.append(Delete(keys.queue(run.run_id, ""), prefix=True))
            plan.finished = True
            plan.ends_run = True

    async def release(self, namespace: str, lease: int, run_id: str, item_id: str) -> bool:
        """Re-queue an item whose session ended, as a failed attempt of kind WORKER_LOST.

        Idempotent: the claim is the guard, so several replicas may race to release it.

        Returns:
            Whether this call released it.
        """
        keys = Keys(namespace)
        claim_key = keys.claim(lease, run_id, item_id)
        for _ in range(_ATTEMPTS_ON_CONFLICT):
            claim = await self.kv.get(claim_key)
            if claim is None:
                return False
            try:
                state_kv, state = await self._state(keys, run_id, item_id)
                run = await self.get(namespace, run_id)
            except NotFound:
                await self.kv.txn(Txn([Compare.exists(claim_key)], [Delete(claim_key)]))
                return False
            if run.status in FINISHED or state.status != records_pb2.ITEM_STATUS_IN_PROGRESS:
                dropped = await self.kv.txn(
                    Txn([Compare.created_at(claim_key, claim.create_revision)], [Delete(claim_key)])
                )
                return dropped.succeeded
            definition = await self.workflows.get(namespace, run.definition_hash)
            error = work_item_pb2.NodeError(
                kind=work_item_pb2.ERROR_KIND_WORKER_LOST,
                message=f"the worker's session {lease:x} ended while it held the item",
            )
            plan = _Plan()
            await self._plan_failure(
                keys, definition, run, state, error, plan, _now_ms(), lost=True
            )
            unfinished = [
                Compare(keys.status(run_id), Target.VALUE, Op.NOT_EQUAL, status_name(s))
                for s in FINISHED
            ]
            result = await self.kv.txn(
                Txn(
                    [
                        Compare.created_at(claim_key, claim.create_revision),
                        Compare.modified_at(state_kv.key, state_kv.mod_revision),
                        *unfinished,
                        *plan.guards,
                    ],
                    [Delete(claim_key), *plan.writes, *self._new_items(keys, plan.new_items)],
                )
            )
            self._remember(plan, 0)
            if result.succeeded:
                for expanded_run, expanded_item in plan.expansions:
                    await self.expand(namespace, expanded_run, expanded_item)
                return True
        return False

    async def expand(self, namespace: str, run_id: str, item_id: str) -> None:
        """Turn an expansion record into items, in bounded idempotent Txns, then delete it."""
        keys = Keys(namespace)
        key = keys.expansion(run_id, item_id)
        found = await self.kv.get(key)
        if found is None:
            return
        items = list(checkpoint_pb2.Checkpoint.FromString(found.value).pending)
        for start in range(0, len(items), EXPANSION_CHUNK):
            chunk = items[start : start + EXPANSION_CHUNK]
            first = keys.item(run_id, chunk[0].item_id)
            await self.kv.txn(  # a chunk is written whole or not at all: its first item tells
                Txn(
                    [
                        Compare.modified_at(key, found.mod_revision),
                        Compare.missing(first),
                        *(
                            Compare(keys.status(run_id), Target.VALUE, Op.NOT_EQUAL, status_name(s))
                            for s in FINAL
                        ),
                    ],
                    self._new_items(keys, chunk),
                )
            )
        await self.kv.txn(Txn([Compare.modified_at(key, found.mod_revision)], [Delete(key)]))

    async def _plan_failure(
        self,
        keys: Keys,
        definition: Definition,
        run: records_pb2.RunRecord,
        state: records_pb2.WorkItemState,
        error: work_item_pb2.NodeError,
        plan: _Plan,
        now: int,
        *,
        lost: bool = False,
    ) -> None:
        item = state.item
        node = definition.graph.node(item.node)
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
        _stamp(record, "occurred_at", now)
        plan.writes.append(
            Put(keys.error(run.run_id, item.item_id, state.attempts), record.SerializeToString())
        )
        state.last_error.CopyFrom(error)
        _stamp(state, "updated_at", now)
        policy = (
            RetryPolicy.from_proto(node.retry_policy) if node.HasField("retry_policy") else None
        )
        item_key = keys.item(run.run_id, item.item_id)
        if lost and (policy is None or not policy.should_retry(kind, state.attempts)):
            # A lost worker says nothing about the item: retry it up to LOST_ATTEMPTS times
            # even without a policy (a node that kills its worker every time stops there).
            if state.attempts < LOST_ATTEMPTS:
                state.status = records_pb2.ITEM_STATUS_PENDING
                state.item.attempt = state.attempts + 1
                plan.writes.append(Put(item_key, state.SerializeToString()))
                plan.writes.extend(self._queue_entry(keys, state.item))
                return
            policy = None
        if policy is not None and policy.should_retry(
            kind, state.attempts, non_retryable=error.non_retryable
        ):
            due = now + int(policy.backoff_for(state.attempts).total_seconds() * 1000)
            state.status = records_pb2.ITEM_STATUS_WAITING_RETRY
            _stamp(state, "retry_at", due)
            entry = work_item_pb2.WorkItem()
            entry.CopyFrom(item)
            entry.ClearField("input")
            plan.writes.append(Put(item_key, state.SerializeToString()))
            plan.writes.append(
                Put(keys.timer(due, run.run_id, item.item_id), entry.SerializeToString())
            )
            return
        state.status = records_pb2.ITEM_STATUS_PERMANENTLY_FAILED
        state.ClearField("retry_at")
        plan.writes.append(Put(item_key, state.SerializeToString()))
        fallback = route_failure(definition.graph, item)
        if fallback is not None:
            await self._plan_step(keys, run, item, fallback, plan, now)
            return
        run.status = records_pb2.RUN_STATUS_FAILED
        plan.ends_run = True
        run.error.CopyFrom(error)
        _stamp(run, "finished_at", now)
        _stamp(run, "updated_at", now)
        plan.writes.append(Put(keys.run_info(run.run_id), run.SerializeToString()))
        plan.writes.append(Put(keys.status(run.run_id), status_name(run.status)))
        plan.writes.append(Delete(keys.queue(run.run_id, ""), prefix=True))

    # -- retention -----------------------------------------------------------------------------

    async def remove_finished(
        self, namespace: str, finished_before_ms: int, batch: int = 50
    ) -> int:
        """Remove up to ``batch`` runs finished before a time: one guarded Txn per run.

        Each Txn deletes the run's record, idempotency key, queue and expansion entries, and
        its own prefix in one range delete. Runs are scanned oldest first (their ids are
        time-ordered), stopping at the first created after the cutoff.

        Returns:
            How many runs were removed.
        """
        keys = Keys(namespace)
        found, _ = await self.kv.range(keys.run_infos, limit=batch * 4)
        removed = 0
        for kv in found:
            run = records_pb2.RunRecord.FromString(kv.value)
            if run.created_at.ToMilliseconds() >= finished_before_ms or removed >= batch:
                break
            finished = run.status in FINISHED and run.HasField("finished_at")
            if not finished or run.finished_at.ToMilliseconds() >= finished_before_ms:
                continue
            deletes: list[Request] = [
                Delete(kv.key),
                Delete(keys.run(run.run_id), prefix=True),
                Delete(keys.queue(run.run_id, ""), prefix=True),
                Delete(keys.expansion(run.run_id, ""), prefix=True),
            ]
            if run.idempotency_key:
                deletes.append(Delete(keys.idempotency(run.idempotency_key)))
            result = await self.kv.txn(Txn([Compare.modified_at(kv.key, kv.mod_revision)], deletes))
            removed += result.succeeded
        return removed

    # -- timers --------------------------------------------------------------------------------

    async def fire_timers(self, namespace: str, now_ms: int | None = None) -> int:
        """Make due retries pending again (any replica may call it); returns how many fired."""
        keys = Keys(namespace)
        now_ms = _now_ms() if now_ms is None else now_ms
        due, _ = await self.kv.range(keys.timer(), limit=256)
        fired = 0
        for timer in due:
            due_ms = int(timer.key[len(keys.timer()) :].split(b"/")[0])
            if due_ms > now_ms:
                break
            entry = work_item_pb2.WorkItem.FromString(timer.value)
            status = await self.kv.get(keys.status(entry.run_id))
            if status is not None and status.value == status_name(PAUSED):
                continue  # fires after resume
            try:
                state_kv, state = await self._state(keys, entry.run_id, entry.item_id)
            except NotFound:
                await self.kv.txn(Txn([], [Delete(timer.key)]))
                continue
            if (
                status is None
                or status.value != status_name(RUNNING)
                or state.status != records_pb2.ITEM_STATUS_WAITING_RETRY
            ):
                await self.kv.txn(Txn([Compare.exists(timer.key)], [Delete(timer.key)]))
                continue
            state.status = records_pb2.ITEM_STATUS_PENDING
            state.item.attempt = state.attempts + 1
            state.ClearField("retry_at")
            _stamp(state, "updated_at", now_ms)
            queued = work_item_pb2.WorkItem()
            queued.CopyFrom(state.item)
            queued.ClearField("input")
            result = await self.kv.txn(
                Txn(
                    [
                        Compare.exists(timer.key),
                        Compare.value_is(keys.status(entry.run_id), status_name(RUNNING)),
                        Compare.modified_at(state_kv.key, state_kv.mod_revision),
                    ],
                    [
                        Delete(timer.key),
                        Put(state_kv.key, state.SerializeToString()),
                        Put(keys.queue(entry.run_id, entry.item_id), queued.SerializeToString()),
                    ],
                )
            )
            fired += result.succeeded
        return fired


@dataclasses.dataclass
class _Handover:
    """An item a completion claims for its session: a successor, or a queued sibling."""

    state: records_pb2.WorkItemState
    claiming: list[Request] = dataclasses.field(default_factory=list)
    reads: list[Request] = dataclasses.field(default_factory=list)
    run: KeyValue | None = None
    depth: int = 0
    nested_txn: Txn | None = None

    @property
    def requests(self) -> list[Request]:
        """What the completing Txn does for it."""
        if self.nested_txn is not None:
            return [self.nested_txn]
        return [*self.claiming, *self.reads]


@dataclasses.dataclass
class _Turns:
    """Completions of one group's branches on this replica, one at a time."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


@dataclasses.dataclass
class _Plan:
    """The compares and writes of one completion, and what it means."""

    guards: list[Compare] = dataclasses.field(default_factory=list)
    writes: list[Request] = dataclasses.field(default_factory=list)
    completion: Completion = dataclasses.field(default_factory=Completion)
    finished: bool = False
    ends_run: bool = False
    """The Txn completes or fails the run."""
    expansions: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    new_items: list[work_item_pb2.WorkItem] = dataclasses.field(default_factory=list)
    """Items to create (pending and queued, or one claimed by a sticky session)."""
    groups: dict[bytes, bytes | None] = dataclasses.field(default_factory=dict)
    """Group records written (``None``: the group is complete)."""
