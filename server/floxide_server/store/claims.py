"""Claims: an item held by a worker's session, fenced by a token; and claims lost with it.

A claim is one Txn: delete the item's queue entry, write ``claim/{lease}/{run}/{item}``
(holding the claim's whole token, :class:`ClaimToken`, which its result must equal) and mark
the item IN_PROGRESS, if the entry still exists, the item's state is the one read, the run is
RUNNING and the session's key exists. The same
Txn reads what the assignment needs (the context, a join's outputs), so a claim is one round
trip; it returns a :class:`Snapshot` so that the completion needs no read before its own Txn.

A completion may claim too (a *handover*): its successor for the same session (sticky chains),
or a queued sibling in a nested Txn of its own (:meth:`Claims.queued`).

**Claim loss.** When a session's lease ends, its claims are released (:meth:`Claims.release`):
each item is re-queued as a failed attempt of kind WORKER_LOST, or fails by its policy, in one
Txn guarded by the claim itself, so replicas racing to release it do it once; and a late result
of the lost claim is refused (its claim key is gone). A claim past its deadline ends the same
way, as a failed attempt of kind TIMEOUT (:meth:`Claims.time_out`, which
:mod:`floxide_server.deadlines` calls).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
import typing
from collections.abc import Sequence

from floxide_grpc._proto.floxide.v1 import checkpoint_pb2, records_pb2, work_item_pb2
from floxide_grpc._routing import join_input
from floxide_grpc.errors import ClaimLost, SessionEnded
from floxide_server.store import contexts, fanout, planning, settling
from floxide_server.store.keys import Keys
from floxide_server.store.kv import (
    KV,
    Compare,
    Delete,
    Get,
    KeyValue,
    Put,
    Request,
    Txn,
    TxnResult,
)
from floxide_server.store.lineage import Lineage
from floxide_server.store.payloads import Limits
from floxide_server.store.queue import live, new_items
from floxide_server.store.reads import read_state
from floxide_server.store.records import (
    FINISHED,
    RUNNING,
    fresh_state,
    now_ms,
    stamp,
    status_name,
    unfinished,
)
from floxide_server.store.workflows import WorkflowStore

__all__ = ["ATTEMPTS_ON_CONFLICT", "Claim", "ClaimToken", "Claims", "Handover", "Snapshot"]

ATTEMPTS_ON_CONFLICT = 16
"""Txns a release (or a completion) tries while other writers keep moving its keys."""


_NONCE = re.compile(r"^[0-9a-f]{16}$")


@dataclasses.dataclass(frozen=True)
class ClaimToken:
    """A claim's fencing token, opaque to workers; the server parses it only here.

    ``{session}:{nonce}:{attempt}:{run}:{item}``: it names the session's lease, a nonce drawn
    for this very claim, the attempt and the item. The claim key holds the token whole, and a
    result is applied only if its token equals it (one compare in the completing Txn): a token
    with any field changed, or of an earlier claim of the item, names no claim.
    """

    lease: int
    nonce: str
    attempt: int
    run_id: str
    item_id: str

    def __str__(self) -> str:
        return f"{self.lease:x}:{self.nonce}:{self.attempt}:{self.run_id}:{self.item_id}"

    @classmethod
    def new(cls, lease: int, attempt: int, run_id: str, item_id: str) -> ClaimToken:
        """The token of a claim being made now (its nonce drawn afresh)."""
        return cls(lease, secrets.token_hex(8), attempt, run_id, item_id)

    @classmethod
    def parse(cls, token: str) -> ClaimToken:
        """Read a token.

        Raises:
            ClaimLost: it is malformed, so it names no claim (FAILED_PRECONDITION: a forged
                token must not fail anyone's item, as INVALID_ARGUMENT would).
        """
        try:
            lease, nonce, attempt, run_id, item_id = token.split(":")
            parsed = cls(int(lease, 16), nonce, int(attempt), run_id, item_id)
        except ValueError:
            parsed = None
        if (
            parsed is None
            or not (_NONCE.fullmatch(parsed.nonce) and parsed.attempt > 0 and run_id and item_id)
            or str(parsed) != token  # one spelling only: "0x1f" or " 1" name no claim
        ):
            raise ClaimLost(f"claim token {token[:200]!r} is malformed: it names no claim")
        return parsed

    @property
    def bytes(self) -> bytes:
        """The token as its claim key holds it."""
        return str(self).encode()


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
        timeout_ms: How long the attempt may take, measured from when it is sent (0: no limit).
        snapshot: What its completion may start from (none after a lost reply).
        revision: The revision of the Txn that made it.
    """

    token: str
    item: work_item_pb2.WorkItem
    context: work_item_pb2.Payload
    timeout_ms: int
    snapshot: Snapshot | None = None
    revision: int = 0


# The names of a claim's reads in its Txn (results are read by name, never by position).
_INIT, _OPS, _OUTPUTS, _RUN, _NESTED = "context_init", "context_ops", "outputs", "run", "claim"


@dataclasses.dataclass
class Handover:
    """An item claimed for a session inside a Txn: alone, or nested in a completion's Txn.

    Attributes:
        lease: The session's lease.
        state: The item's state as the claim writes it.
        written: That state, serialized (what the snapshot holds).
        token: The claim's token, which its key holds.
        requests: The claim's writes and named reads, as the Txn runs them.
        run: The run's record as the claim sees it (a successor's: the completion's snapshot).
        depth: How many claims in a row of this chain were made by completions.
        nested: The claim's own Txn, when it is nested (a queued item's guards are its own).
    """

    lease: int
    state: records_pb2.WorkItemState
    written: bytes
    token: ClaimToken
    requests: list[Request]
    run: KeyValue | None = None
    depth: int = 0
    nested: Txn | None = None

    @classmethod
    def of(cls, keys: Keys, lease: int, state: records_pb2.WorkItemState, now: int) -> Handover:
        """Mark an item in progress for a session.

        The writes come first, then the reads its assignment needs: a Txn sees its own writes
        (as etcd's does).
        """
        item = state.item
        attempt = max(item.attempt, 1)
        state.status = records_pb2.ITEM_STATUS_IN_PROGRESS
        state.attempts = attempt
        state.session_id = f"{lease:x}"
        stamp(state, "updated_at", now)
        written = state.SerializeToString()
        token = ClaimToken.new(lease, attempt, item.run_id, item.item_id)
        requests: list[Request] = [
            Put(keys.claim(lease, item.run_id, item.item_id), token.bytes),
            Put(keys.item(item.run_id, item.item_id), written),
            Get(keys.context_init(item.run_id), name=_INIT),
            Get(keys.context_ops(item.run_id), prefix=True, name=_OPS),
        ]
        if item.join_group_id:
            requests.append(
                Get(keys.group_outputs(item.run_id, item.join_group_id), prefix=True, name=_OUTPUTS)
            )
        return cls(lease, state, written, token, requests)

    @property
    def in_txn(self) -> list[Request]:
        """What the enclosing Txn does for it."""
        return [self.nested] if self.nested is not None else self.requests


class Claims:
    """Claiming queued items for sessions, and releasing the claims of ended sessions."""

    def __init__(
        self,
        kv: KV,
        workflows: WorkflowStore,
        groups: fanout.GroupCache,
        limits: Limits,
        lineage: Lineage,
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.groups = groups
        self.limits = limits
        self.lineage = lineage

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
            The claim, or ``None`` if another session got it first or the run is not running.

        Raises:
            SessionEnded: the session's key is gone (its lease ended): the item is still queued,
                for another session.
        """
        keys = Keys(namespace)
        if queued is not None and queued[0].HasField("input"):
            state, revision = fresh_state(queued[0]), queued[1]
        else:
            found, state = await read_state(self.kv, keys, run_id, item_id)
            revision = found.mod_revision
        if state.status != records_pb2.ITEM_STATUS_PENDING:
            return None
        # The same guarded claim a completion nests to take a sibling, under the session's guard.
        handover = self.queued(keys, lease, state, revision)
        assert handover.nested is not None
        txn = Txn([Compare.exists(keys.session(lease))], [handover.nested])
        result = await self.kv.txn(txn)
        if not result.succeeded:
            raise SessionEnded(f"session {lease:016x} ended before it could claim {item_id}")
        return await self.handed_over(keys, handover, txn, result)

    def queued(
        self, keys: Keys, lease: int, state: records_pb2.WorkItemState, revision: int
    ) -> Handover:
        """A nested Txn that claims a queued pending item for a session.

        It holds if the item's queue entry exists, its state is still the one written at
        ``revision``, and its run is running.
        """
        item = state.item
        handover = Handover.of(keys, lease, state, now_ms())
        handover.nested = Txn(
            [
                Compare.exists(keys.queue(item.run_id, item.item_id)),
                Compare.modified_at(keys.item(item.run_id, item.item_id), revision),
                Compare.value_is(keys.status(item.run_id), status_name(RUNNING)),
            ],
            [
                Delete(keys.queue(item.run_id, item.item_id)),
                Get(keys.run_info(item.run_id), name=_RUN),
                *handover.requests,
            ],
            name=_NESTED,
        )
        return handover

    def successor(
        self, keys: Keys, lease: int, item: work_item_pb2.WorkItem, snapshot: Snapshot
    ) -> Handover:
        """A successor claimed in its predecessor's completing Txn (never queued)."""
        handover = Handover.of(keys, lease, records_pb2.WorkItemState(item=item), now_ms())
        handover.requests.insert(0, live(keys, item))  # a new item, never queued
        handover.run = KeyValue(b"", snapshot.run, 0, snapshot.run_revision, 0)
        handover.depth = snapshot.depth + 1
        return handover

    async def handed_over(
        self, keys: Keys, handover: Handover, txn: Txn, result: TxnResult
    ) -> Claim | None:
        """The claim a committed Txn made for the session, if it made one.

        A nested claim (a queued item's own Txn) may have failed alone. When the Txn's reply
        was lost and recovered, what it read is read again, as it would have been.
        """
        reads = txn.named(result)
        run = handover.run
        revision = result.revision
        if handover.nested is not None and result.responses is not None:
            inner = typing.cast(TxnResult, reads[_NESTED])
            if not inner.succeeded:
                return None
            reads = handover.nested.named(inner)
            found = typing.cast(list[KeyValue], reads[_RUN])
            run = found[0] if found else None
        return await self._assignment(keys, handover, revision, reads, run)

    async def _assignment(
        self,
        keys: Keys,
        handover: Handover,
        revision: int,
        reads: dict[str, object],
        run: KeyValue | None,
    ) -> Claim | None:
        """The claim of an item that a Txn made of a handover's writes and reads."""
        state, lease = handover.state, handover.lease
        item = state.item
        run_id, item_id = item.run_id, item.item_id
        definition = await self.workflows.get(keys.namespace, item.definition_hash)
        snapshot = None
        if not reads:  # the reply was lost: read again what the Txn read
            claim = await self.kv.get(keys.claim(lease, run_id, item_id))
            if claim is None or claim.value != handover.token.bytes:
                return None
            revision = claim.create_revision
            init = await self.kv.get(keys.context_init(run_id))
            ops, _ = await self.kv.range(keys.context_ops(run_id))
            outputs: Sequence[KeyValue] = []
            if item.join_group_id:
                outputs, _ = await self.kv.range(keys.group_outputs(run_id, item.join_group_id))
        else:
            found_init = typing.cast(list[KeyValue], reads[_INIT])
            init = found_init[0] if found_init else None
            ops = typing.cast(list[KeyValue], reads[_OPS])
            outputs = typing.cast(list[KeyValue], reads.get(_OUTPUTS, []))
            if run is not None:
                snapshot = Snapshot(
                    handover.written, revision, run.value, run.mod_revision, handover.depth
                )
        if item.join_group_id:
            arrivals = [checkpoint_pb2.GroupArrival.FromString(kv.value) for kv in outputs]
            item.input.CopyFrom(join_input([a.output for a in arrivals if not a.held]))
        node = definition.graph.node(item.node)
        timeout = (
            node.timeout.ToMilliseconds()
            if node.HasField("timeout")
            else self.limits.default_node_timeout_ms
        )
        return Claim(
            token=str(handover.token),
            item=item,
            context=contexts.payload(contexts.fold(definition, init, ops)),
            timeout_ms=timeout,
            snapshot=snapshot,
            revision=revision,
        )

    async def release(self, namespace: str, lease: int, run_id: str, item_id: str) -> bool:
        """Re-queue an item whose session ended, as a failed attempt of kind WORKER_LOST.

        Idempotent: the claim is the guard, so several replicas may race to release it.

        Returns:
            Whether this call released it (not a claim of a run that ended, only dropped).
        """
        plan = functools.partial(planning.plan_lost, lease=lease)
        return await self._end_claim(namespace, lease, run_id, item_id, None, plan)

    async def time_out(
        self, namespace: str, token: ClaimToken, timeout_ms: int, grace_ms: int
    ) -> bool:
        """End a claim that passed its deadline: a failed attempt of kind TIMEOUT.

        The node's retry policy decides what follows, as for any failed attempt. Guarded by the
        claim itself: a result applied first wins, and a result sent later is refused.

        Returns:
            Whether this call ended it (``False``: its result, or its run's end, came first).
        """
        plan = functools.partial(planning.plan_timed_out, timeout_ms=timeout_ms, grace_ms=grace_ms)
        return await self._end_claim(
            namespace, token.lease, token.run_id, token.item_id, token.bytes, plan
        )

    async def release_unreceived(self, namespace: str, token: ClaimToken) -> bool:
        """Re-queue an item whose assignment its worker never received, using no attempt.

        Guarded by the claim itself, as :meth:`time_out` is.

        Returns:
            Whether this call released it.
        """
        return await self._end_claim(
            namespace,
            token.lease,
            token.run_id,
            token.item_id,
            token.bytes,
            planning.plan_unreceived,
        )

    async def _end_claim(
        self,
        namespace: str,
        lease: int,
        run_id: str,
        item_id: str,
        token: bytes | None,
        plan: typing.Callable[[planning.Basis], planning.Plan],
    ) -> bool:
        """End a claim as a failed attempt (``token``: only the claim that holds it)."""
        keys = Keys(namespace)
        claim_key = keys.claim(lease, run_id, item_id)
        for _ in range(ATTEMPTS_ON_CONFLICT):
            claim = await self.kv.get(claim_key)
            if claim is None or token not in (None, claim.value):
                return False
            state_kv = await self.kv.get(keys.item(run_id, item_id))
            run_kv = await self.kv.get(keys.run_info(run_id))
            if state_kv is None or run_kv is None:
                await self.kv.txn(Txn([Compare.exists(claim_key)], [Delete(claim_key)]))
                return False
            state = records_pb2.WorkItemState.FromString(state_kv.value)
            run = records_pb2.RunRecord.FromString(run_kv.value)
            if run.status in FINISHED or state.status != records_pb2.ITEM_STATUS_IN_PROGRESS:
                # A leftover of a run that ended: dropped, no attempt recorded.
                await self.kv.txn(
                    Txn([Compare.created_at(claim_key, claim.create_revision)], [Delete(claim_key)])
                )
                return False
            definition = await self.workflows.get(namespace, run.definition_hash)
            basis = planning.Basis(
                keys, definition, run_kv.value, state_kv.value, self.limits, now_ms()
            )
            planned = await self.lineage.plan(basis, plan)
            guards = [
                Compare.created_at(claim_key, claim.create_revision),
                Compare.modified_at(state_kv.key, state_kv.mod_revision),
                # The run as planned from: the record it may rewrite, the status a child starts in.
                Compare.modified_at(run_kv.key, run_kv.mod_revision),
                *unfinished(keys, run_id),
                *planned.guards,
            ]
            writes = [Delete(claim_key), *planned.writes, *new_items(keys, planned.new_items)]
            # A child run this failure ends fails its parent's item in the same Txn.
            parent = await self.lineage.join(planned.ended, basis.now_ms, guards, writes)
            result = await self.kv.txn(Txn(guards, writes))
            self.groups.remember(planned.groups, 0)
            if not result.succeeded:
                self.lineage.forget(parent)
                continue
            await self.lineage.after(parent, result.revision)
            for expanded_run, expanded_item in planned.expansions:
                await self.lineage.expand(namespace, expanded_run, expanded_item)
            if planned.settle:  # the lost item failed its run: the rest is settled
                await settling.settle(self.kv, keys, run_id, self.limits.max_txn_ops)
            return True
        return False
