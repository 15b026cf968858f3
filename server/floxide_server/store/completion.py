"""Completion: a worker's result applied once, fenced by its claim, in one Txn.

The completing Txn deletes the claim and writes what :mod:`floxide_server.store.planning`
decided, if the claim key holds the token whole, the session lives, the run is not
finished, and the item's state and the run's record are still those of the claim's
:class:`~floxide_server.store.claims.Snapshot` (so it needs no read before its Txn). A *sticky*
completion also claims, in the same Txn, a successor for the same session (it is never queued),
or else a queued sibling in a nested Txn of its own: a chain costs one Txn a step.

Nothing is trusted that a compare does not check: a result races its session's expiry, a
cancel, a pause or another replica, and loses cleanly. A Txn that fails is retried from fresh
reads; one whose failure is final (the session ended, the run finished) says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
from collections.abc import Callable, Sequence

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_grpc.errors import AlreadyExists, ClaimLost, Unavailable
from floxide_server.store import fanout, planning, settling, stuck
from floxide_server.store.claims import (
    ATTEMPTS_ON_CONFLICT,
    Claim,
    Claims,
    ClaimToken,
    Handover,
    Snapshot,
)
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, Request, Txn, TxnResult
from floxide_server.store.lineage import Lineage, Resolution, nest
from floxide_server.store.payloads import Limits
from floxide_server.store.queue import new_items
from floxide_server.store.records import (
    FINISHED,
    RUNNING,
    fresh_state,
    now_ms,
    status_name,
    unfinished,
)
from floxide_server.store.workflows import WorkflowStore

__all__ = ["MAX_CHAIN", "Completion", "Completions", "Sticky"]

MAX_CHAIN = 16
"""Successors a session may claim in a row with its completions (sticky), before the queue."""

_CHILDREN_TURN = "\0children"
"""The turn, in a parent run, of the steps that may end one of its children."""
Queued = tuple[work_item_pb2.WorkItem, int]
"""A queue entry as dispatch holds it: the item and the entry's revision."""


@dataclasses.dataclass(frozen=True)
class Sticky:
    """A session that may take a successor of the step it completes, in the completing Txn.

    Attributes:
        lease: The session's lease.
        serves: Whether the session runs an item's node.
        take: When the result has no successor for the session: a fresh queued item to claim in
            the same Txn instead, if it is still there.
        give_back: Returns a taken item that no Txn tried to claim.
    """

    lease: int
    serves: Callable[[work_item_pb2.WorkItem], bool]
    take: Callable[[], Queued | None] = lambda: None
    give_back: Callable[[Queued], None] = lambda queued: None


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
    reason: str = ""


class Completions:
    """Applying workers' results."""

    def __init__(
        self,
        kv: KV,
        workflows: WorkflowStore,
        claims: Claims,
        groups: fanout.GroupCache,
        limits: Limits,
        lineage: Lineage,
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.claims = claims
        self.groups = groups
        self.limits = limits
        self.turns = fanout.GroupTurns()
        self.lineage = lineage

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
        reported = _Reported(keys, claim, transition, operations)
        async with contextlib.AsyncExitStack() as turns:
            for turn in await self._turns(keys, snapshot, transition):
                await turns.enter_async_context(self.turns.turn(namespace, *turn))
            return await self._complete(reported, snapshot, sticky)

    async def _turns(
        self, keys: Keys, snapshot: Snapshot | None, transition: work_item_pb2.Transition
    ) -> list[tuple[str, str]]:
        """The turns a completion takes on this replica, as (run, key), always in this order.

        A fan-out branch's, in its group (arrivals rewrite the group's record); and a step
        that may end a child run, in its parent (the child's end takes its parent's item's
        step, which sibling children's ends would race for).
        """
        if snapshot is None:
            return []
        state = records_pb2.WorkItemState.FromString(snapshot.state)
        stack = state.item.group_stack
        turns = [(state.item.run_id, stack[-1].group_id)] if stack else []
        run = records_pb2.RunRecord.FromString(snapshot.run)
        if run.HasField("parent"):
            graph = (await self.workflows.get(keys.namespace, run.definition_hash)).graph
            if transition.WhichOneof("outcome") == "abort" or graph.is_terminal(state.item.node):
                turns.append((run.parent.run_id, _CHILDREN_TURN))
        return turns

    async def _complete(
        self, reported: _Reported, snapshot: Snapshot | None, sticky: Sticky | None
    ) -> Completion:
        taken: list[Queued] = []  # a sibling, taken once, kept
        tried = False
        try:
            for attempt in range(ATTEMPTS_ON_CONFLICT):
                done, tried = await self._attempt(reported, snapshot, sticky, taken)
                if done is not None:
                    return done
                snapshot = None  # anything else moved: retry from fresh reads
                if attempt:  # another replica keeps winning: back off, with jitter
                    await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.1)))
        finally:
            if taken and not tried and sticky is not None:
                sticky.give_back(taken[0])
        # The claim still stands: the worker sends the result again (never dropped).
        item_id = reported.claim.item_id
        raise Unavailable(f"item {item_id!r}: too much contention, send the result again")

    async def _attempt(
        self,
        reported: _Reported,
        snapshot: Snapshot | None,
        sticky: Sticky | None,
        taken: list[Queued],
    ) -> tuple[Completion | None, bool]:
        """One completing Txn.

        Returns:
            The completion if the Txn committed, else ``None``; and whether a Txn tried the
            sibling in ``taken`` (taken from ``sticky`` at most once, kept across attempts).
        """
        keys, claim = reported.keys, reported.claim
        namespace = keys.namespace
        claim_key = keys.claim(claim.lease, claim.run_id, claim.item_id)
        if snapshot is None:
            snapshot = await self._claimed(keys, claim)
        run = records_pb2.RunRecord.FromString(snapshot.run)
        definition = await self.workflows.get(namespace, run.definition_hash)
        basis = planning.Basis(
            keys, definition, snapshot.run, snapshot.state, self.limits, now_ms()
        )
        plan = await self.lineage.plan(basis, functools.partial(_plan_result, reported))
        guards = [
            Compare.value_is(claim_key, claim.bytes),  # the whole token, one compare
            Compare.exists(keys.session(claim.lease)),
            *unfinished(keys, claim.run_id),
            Compare.modified_at(keys.item(claim.run_id, claim.item_id), snapshot.state_revision),
            Compare.modified_at(keys.run_info(claim.run_id), snapshot.run_revision),
            *plan.guards,
        ]
        successor, handover = None, None
        # Nothing more for a run this Txn ends: and a nested claim's compares would read the
        # run as it was before it (etcd evaluates every compare of a Txn first).
        # A branch that ends takes nothing either: it may be the run's last.
        if sticky is not None and not (plan.ends_run or plan.ends_branch) and run.status == RUNNING:
            successor = next((i for i in plan.new_items if sticky.serves(i)), None)
            if successor is not None:  # claimed here, never queued
                guards.append(Compare.value_is(keys.status(claim.run_id), status_name(RUNNING)))
                handover = self.claims.successor(keys, sticky.lease, successor, snapshot)
            else:
                handover = self._sibling(keys, claim, sticky, taken)
        writes: list[Request] = [
            Delete(claim_key),
            *plan.writes,
            *new_items(keys, [i for i in plan.new_items if i is not successor]),
        ]
        if handover is not None:
            writes.extend(handover.in_txn)
        parents = await self._parents(basis, plan, claim, guards, writes)
        txn = Txn(guards, writes)
        result = await self.kv.txn(txn)
        self.groups.remember(plan.groups, result.revision if result.succeeded else 0)
        if not result.succeeded:
            for parent in parents:
                self.lineage.forget(parent)
            await self._why_not(keys, claim)
            return None, False
        await self._ended(keys, plan, claim, txn, result, parents)
        completion = Completion(plan.code, plan.message, reason=plan.reason)
        if handover is None:
            return completion, False
        next_claim = await self.claims.handed_over(keys, handover, txn, result)
        return dataclasses.replace(completion, claim=next_claim), handover.nested is not None

    async def _parents(
        self,
        basis: planning.Basis,
        plan: planning.Plan,
        claim: ClaimToken,
        guards: list[Compare],
        writes: list[Request],
    ) -> tuple[Resolution | None, Resolution | None]:
        """Add to the Txn what ends the run (a stuck one), and its parent's item step if any.

        A child run that the Txn ends completes or fails its parent's item in it; the stuck
        Txn nested in a branch-ending step does so in its own writes. Returns both.
        """
        keys = basis.keys
        parent = await self.lineage.join(plan.ended, basis.now_ms, guards, writes)
        stuck_parent = None
        if plan.ends_branch and await self._maybe_last(keys, claim):
            # Fails the run in the same Txn if no other item is live then.
            nodes = await stuck.ended_at(self.kv, keys, claim.run_id)
            stuck_txn, failed_run = planning.stuck(basis, nodes)
            # In the nested Txn's own compares and writes: made apart, then nested.
            stuck_guards: list[Compare] = []
            stuck_writes: list[Request] = list(writes)
            stuck_parent = await self.lineage.join(
                failed_run, basis.now_ms, stuck_guards, stuck_writes
            )
            writes.append(nest(stuck_txn, stuck_parent))
        return parent, stuck_parent

    async def _ended(
        self,
        keys: Keys,
        plan: planning.Plan,
        claim: ClaimToken,
        txn: Txn,
        result: TxnResult,
        parents: tuple[Resolution | None, Resolution | None],
    ) -> None:
        """What follows a committed completing Txn: expansions, settling, parents' steps."""
        parent, stuck_parent = parents
        await self.lineage.after(parent, result.revision)
        for run_id, item_id in plan.expansions:
            await self.lineage.expand(keys.namespace, run_id, item_id)
        if not (plan.settle or plan.ends_branch):  # a chain's step: the run goes on
            return
        nested = txn.named(result)
        alone = nested.get(settling.SETTLING)  # no other item was live: nothing to settle
        if plan.settle and not (isinstance(alone, TxnResult) and alone.succeeded):
            await settling.settle(self.kv, keys, claim.run_id, self.limits.max_txn_ops)
        failed = nested.get(stuck.STUCK)
        if isinstance(failed, TxnResult) and failed.succeeded:
            await stuck.name_all(self.kv, keys, claim.run_id, result.revision)
            await self.lineage.after(stuck_parent, result.revision)
        else:
            self.lineage.forget(stuck_parent)

    async def _maybe_last(self, keys: Keys, claim: ClaimToken) -> bool:
        """Whether at most one other item of the run is live.

        Only then is a branch's end worth a compare over the run's live markers (etcd reads
        every key such a compare covers). Two last branches at once each see the other; more
        at once are left to the reconciler.
        """
        found, _ = await self.kv.range(keys.live(claim.run_id), limit=3)
        return len([kv for kv in found if kv.key != keys.live(claim.run_id, claim.item_id)]) <= 1

    def _sibling(
        self, keys: Keys, claim: ClaimToken, sticky: Sticky, taken: list[Queued]
    ) -> Handover | None:
        """A fresh queued item for the session to claim in a nested Txn, if there is one.

        Taken from ``sticky`` at most once, and kept in ``taken`` across attempts.
        """
        if not taken and (sibling := sticky.take()) is not None:
            taken.append(sibling)
            if (sibling[0].run_id, sibling[0].item_id) == (claim.run_id, claim.item_id):
                taken.clear()  # a stale entry of this very item: nothing to claim
        if not taken:
            return None
        sibling_item, revision = taken[0]
        return self.claims.queued(keys, sticky.lease, fresh_state(sibling_item), revision)

    async def _claimed(self, keys: Keys, claim: ClaimToken) -> Snapshot:
        """Read what a completion starts from (one round trip), if the claim still stands.

        Raises:
            ClaimLost: no claim holds this token (it names no item or run, or another claim).
            AlreadyExists: the claim's result was applied.
        """
        state_kv, claim_kv, run_kv = await asyncio.gather(
            self.kv.get(keys.item(claim.run_id, claim.item_id)),
            self.kv.get(keys.claim(claim.lease, claim.run_id, claim.item_id)),
            self.kv.get(keys.run_info(claim.run_id)),
        )
        if state_kv is None or run_kv is None:
            raise ClaimLost(
                f"claim token names item {claim.item_id!r} of run {claim.run_id!r}, which "
                f"namespace {keys.namespace!r} does not hold: it names no claim"
            )
        state = records_pb2.WorkItemState.FromString(state_kv.value)
        holds = (
            claim_kv is not None
            and claim_kv.value == claim.bytes
            and state.status == records_pb2.ITEM_STATUS_IN_PROGRESS
            and state.attempts == claim.attempt
        )
        if not holds:
            if (
                state.status == records_pb2.ITEM_STATUS_COMPLETED
                and state.attempts == claim.attempt
            ):
                raise AlreadyExists(f"the result of item {claim.item_id!r} was already applied")
            if state.status == records_pb2.ITEM_STATUS_CANCELLED:
                raise ClaimLost(
                    f"item {claim.item_id!r} of run {claim.run_id!r} was cancelled "
                    f"({state.last_error.message}): result dropped"
                )
            raise ClaimLost(
                f"the claim on item {claim.item_id!r} of run {claim.run_id!r} no longer stands"
            )
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
            await self.kv.txn(Txn([Compare.value_is(claim_key, claim.bytes)], [Delete(claim_key)]))
            state = status.value.decode().lower().replace("_", " ")  # "timed out"
            raise ClaimLost(f"run {claim.run_id!r} is {state}: result dropped")


def _plan_result(reported: _Reported, basis: planning.Basis) -> planning.Plan:
    return planning.plan_result(
        basis, reported.claim.attempt, reported.transition, reported.operations
    )


@dataclasses.dataclass(frozen=True)
class _Reported:
    """A result as a worker reported it, with the claim its token names."""

    keys: Keys
    claim: ClaimToken
    transition: work_item_pb2.Transition
    operations: Sequence[work_item_pb2.ContextOperation]
