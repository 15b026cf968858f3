"""Lineage: what crosses the link between a child run and its parent's item, in the right Txn.

:mod:`.children` starts a child in the Txn that makes its item ready; this module does the
reads that takes (:meth:`Lineage.plan`, :meth:`Lineage.readied`) and the rest of the link:

- **A child's end** completes or fails its parent's item in the child's own ending Txn
  (:meth:`Lineage.resolve`): the child's outcome (:func:`floxide_grpc._children.outcome`) is
  planned as any result of the item (:func:`.planning.plan_result`: its retry policy and its
  fallback apply), guarded by the item (still IN_PROGRESS for this very child) and the
  parent's record. A parent ended so resolves its own parent's item in the same Txn, up the
  tree. A resolution whose guards fail fails the whole Txn, which is retried from fresh reads.
- **A child that ended unseen** (its parent was failed then, as a resume requeues) is taken
  once the parent runs (:meth:`Lineage.catch_up`: the resume, and the stuck reconciler).
- **Cancelling a child** cancels its ancestors whose item waits for it, in the same Txn
  (:meth:`Lineage.ancestors`); their settling cancels their other children (:mod:`.settling`).
- **A wide fan-out** of nested workflows is expanded with each chunk's children started from
  the context as that chunk's Txn sees it (:meth:`Lineage.expand`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

from floxide_grpc._children import outcome
from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2
from floxide_server.store import children, fanout, planning, settling
from floxide_server.store.keys import Keys
from floxide_server.store.kv import KV, Compare, Delete, KeyValue, Request, Txn
from floxide_server.store.payloads import Limits
from floxide_server.store.queue import new_items
from floxide_server.store.records import (
    FINAL,
    FINISHED,
    fresh_state,
    now_ms,
    status_name,
    unfinished,
)
from floxide_server.store.workflows import WorkflowStore

__all__ = ["Lineage", "Resolution", "nest"]

Planner = Callable[[planning.Basis], planning.Plan]
CATCH_UP_ATTEMPTS = 16
"""Txns :meth:`Lineage.catch_up` tries for one child while other writers move its parent."""


@dataclasses.dataclass
class Resolution:
    """A parent's item step (and its ancestors', if it ends the parent) for a child's ending Txn.

    Attributes:
        guards: Compares the ending Txn adds.
        writes: Writes it adds.
        steps: Each resolved item's run and plan, innermost parent first (what follows the Txn).
    """

    guards: list[Compare] = dataclasses.field(default_factory=list)
    writes: list[Request] = dataclasses.field(default_factory=list)
    steps: list[tuple[Keys, str, planning.Plan]] = dataclasses.field(default_factory=list)


class Lineage:
    """Child runs and their parents' items, across every namespace."""

    def __init__(
        self, kv: KV, workflows: WorkflowStore, groups: fanout.GroupCache, limits: Limits
    ) -> None:
        self.kv = kv
        self.workflows = workflows
        self.groups = groups
        self.limits = limits

    async def plan(self, basis: planning.Basis, planner: Planner) -> planning.Plan:
        """Plan a step, reading what it needs first: group records, the run's context."""
        plan = await self.groups.planned(self.kv, functools.partial(_with, basis, planner))
        if plan.needs_context:
            run_id = records_pb2.WorkItemState.FromString(basis.state).item.run_id
            context = await children.inherited(self.kv, basis.keys, basis.definition, run_id)
            basis = dataclasses.replace(basis, context=context)
            plan = await self.groups.planned(self.kv, functools.partial(_with, basis, planner))
        return plan

    async def readied(
        self,
        keys: Keys,
        run: records_pb2.RunRecord,
        states: Sequence[records_pb2.WorkItemState],
        now: int,
        *,
        fresh: bool = False,
    ) -> tuple[list[Compare], list[Request]]:
        """Guards and writes that make items of ``run`` ready (``states`` as to be written).

        Nested workflows' items start their child runs, from the run's context read now.
        """
        if not states:
            return [], []
        definition = await self.workflows.get(keys.namespace, run.definition_hash)
        guards: list[Compare] = []
        context = None
        if any(children.is_nested(definition, s.item.node) for s in states):
            read = await children.inherited(self.kv, keys, definition, run.run_id)
            guards.append(read.guard)
            context = read.context
        writes = [
            w
            for state in states
            for w in children.readied(keys, definition, run, state, context, now, fresh=fresh)
        ]
        return guards, writes

    async def join(
        self,
        ended: records_pb2.RunRecord | None,
        now: int,
        guards: list[Compare],
        writes: list[Request],
    ) -> Resolution | None:
        """Add to an ending Txn (``guards``, ``writes``) its run's parent item step, if any.

        ``ended``: the run as the Txn ends it. The step may take what ``writes`` leaves of
        etcd's operations. Returns the resolution, for :meth:`after` or :meth:`forget`.
        """
        if ended is None or not ended.HasField("parent"):
            return None
        left = max(self.limits.max_txn_ops - len(writes) - 2, 0)
        resolution = await self.resolve(ended, now, left)
        if resolution is not None:
            guards.extend(resolution.guards)
            writes.extend(resolution.writes)
        return resolution

    async def nested(self, keys: Keys, item: work_item_pb2.WorkItem) -> bool:
        """Whether an item runs a nested workflow (it starts a child run when made ready)."""
        definition = await self.workflows.get(keys.namespace, item.definition_hash)
        return children.is_nested(definition, item.node)

    async def resolve(
        self, child: records_pb2.RunRecord, now: int, budget: int
    ) -> Resolution | None:
        """The parent's item step that ``child``'s end (as its ending Txn writes it) takes.

        ``budget``: the Txn operations the step may take (a wider fan-out is expanded after).
        ``None``: the child has no parent, or its parent no longer waits for it, or it was
        cancelled (a cancelled child cancels its parent: :meth:`ancestors`).
        """
        transition = outcome(child)
        if not child.HasField("parent") or transition is None:
            return None
        keys = Keys(child.namespace)
        ref = child.parent
        run_kv = await self.kv.get(keys.run_info(ref.run_id))
        state_kv = await self.kv.get(keys.item(ref.run_id, ref.item_id))
        if run_kv is None or state_kv is None:
            return None
        state = records_pb2.WorkItemState.FromString(state_kv.value)
        parent = records_pb2.RunRecord.FromString(run_kv.value)
        if not _waits(state_kv, child.run_id) or parent.status in FINISHED:
            return None
        definition = await self.workflows.get(keys.namespace, parent.definition_hash)
        limits = dataclasses.replace(self.limits, max_txn_ops=budget)
        basis = planning.Basis(keys, definition, run_kv.value, state_kv.value, limits, now)
        plan = await self.plan(
            basis,
            functools.partial(
                planning.plan_result, attempt=state.attempts, transition=transition, operations=()
            ),
        )
        resolution = Resolution(
            [
                Compare.modified_at(state_kv.key, state_kv.mod_revision),
                Compare.modified_at(run_kv.key, run_kv.mod_revision),
                *unfinished(keys, ref.run_id),
                *plan.guards,
            ],
            # Unnamed: the child's own Txn reads its nested Txns by name (its settling, say);
            # the parent's are settled after the Txn regardless (``after``).
            [_unnamed(w) for w in [*plan.writes, *new_items(keys, plan.new_items)]],
            [(keys, ref.run_id, plan)],
        )
        if child.status == records_pb2.RUN_STATUS_FAILED:  # final now: its item took it
            resolution.writes.append(Delete(keys.timer(child.run_id)))
        # A branch of the parent ended with no successor: the reconciler fails it if stuck.
        if plan.ended is not None and plan.ended.HasField("parent"):
            upper = await self.resolve(plan.ended, now, budget // 2)
            if upper is not None:
                resolution.guards.extend(upper.guards)
                resolution.writes.extend(upper.writes)
                resolution.steps.extend(upper.steps)
        return resolution

    async def catch_up(self, namespace: str, run_id: str) -> int:
        """Take, now, the end of each child of a run whose item still waits for it.

        A child that ended while its parent was failed (a resume requeues before the parent
        runs again) found no step to take; the resume (and the reconciler, as a backstop) calls
        this once the parent runs. Returns how many items it took.
        """
        keys = Keys(namespace)
        links, _ = await self.kv.range(keys.child(run_id), limit=1)
        if not links:
            return 0  # no child ever: nothing to read
        items, _ = await self.kv.range(keys.item(run_id))
        waiting = [
            state.child_run_id
            for state in (records_pb2.WorkItemState.FromString(kv.value) for kv in items)
            if state.status == records_pb2.ITEM_STATUS_IN_PROGRESS and state.child_run_id
        ]
        taken = 0
        for child_id in waiting:
            found = await self.kv.get(keys.run_info(child_id))
            child = records_pb2.RunRecord.FromString(found.value) if found else None
            if child is None or outcome(child) is None:
                continue  # running, paused, or cancelled (which cancelled the parent with it)
            for _ in range(CATCH_UP_ATTEMPTS):
                resolution = await self.resolve(child, now_ms(), self.limits.max_txn_ops - 8)
                if resolution is None:
                    break  # the item does not wait for it (taken, or an earlier attempt's)
                result = await self.kv.txn(Txn(resolution.guards, resolution.writes))
                if result.succeeded:
                    await self.after(resolution, result.revision)
                    taken += 1
                    break
                self.forget(resolution)
        return taken

    async def after(self, resolution: Resolution | None, revision: int) -> None:
        """What follows a committed Txn that held ``resolution`` (``revision``: its own)."""
        if resolution is None:
            return
        for keys, run_id, plan in resolution.steps:
            self.groups.remember(plan.groups, revision)
            for expanded_run, item_id in plan.expansions:
                await self.expand(keys.namespace, expanded_run, item_id)
            if plan.settle:
                await settling.settle(self.kv, keys, run_id, self.limits.max_txn_ops)

    def forget(self, resolution: Resolution | None) -> None:
        """A Txn that held ``resolution`` failed: its group records are unknown now."""
        for _, _, plan in resolution.steps if resolution is not None else ():
            self.groups.remember(plan.groups, 0)

    async def ancestors(
        self, keys: Keys, run: records_pb2.RunRecord, now: int
    ) -> tuple[list[Compare], list[Request], list[str]]:
        """What cancels the ancestors of a run being cancelled, in its cancelling Txn.

        Returns its guards (each ancestor's record and waiting item as read), its writes, and
        the ancestors it cancels (to settle after it). The climb stops at an ancestor already
        finished, or whose item no longer waits for the run below (an earlier attempt's child,
        whose end the item already took).
        """
        guards: list[Compare] = []
        writes: list[Request] = []
        cancelled: list[str] = []
        below = run
        while below.HasField("parent"):
            found = await self.kv.get(keys.run_info(below.parent.run_id))
            item = await self.kv.get(keys.item(below.parent.run_id, below.parent.item_id))
            if found is None or item is None:
                break
            parent = records_pb2.RunRecord.FromString(found.value)
            if parent.status in FINAL or not _waits(item, below.run_id):
                break
            guards.append(Compare.modified_at(item.key, item.mod_revision))
            error = work_item_pb2.NodeError(
                kind=work_item_pb2.ERROR_KIND_CANCELLED,
                message=f"its child run {below.run_id} was cancelled ({run.error.message})",
            )
            guards.append(Compare.modified_at(found.key, found.mod_revision))
            cancelled_status = records_pb2.RUN_STATUS_CANCELLED
            writes.extend(settling.ending(keys, parent, cancelled_status, now, error))
            cancelled.append(parent.run_id)
            below = parent
        return guards, writes, cancelled

    async def expand(self, namespace: str, run_id: str, item_id: str) -> None:
        """Expand a wide fan-out; each chunk starts its children from the context it sees.

        A chunk fits one Txn: etcd's operations, and its request size with the contexts its
        children copy.
        """
        keys = Keys(namespace)
        found = await self.kv.get(keys.run_info(run_id))
        if found is None:  # its Txns' guards on the run's status make nothing of it
            await fanout.expand(self.kv, namespace, run_id, item_id)
            return
        run = records_pb2.RunRecord.FromString(found.value)
        definition = await self.workflows.get(namespace, run.definition_hash)
        size = (await children.inherited(self.kv, keys, definition, run_id)).size
        ops = self.limits.max_txn_ops - 8  # the chunk's guards' share

        def share(item: work_item_pb2.WorkItem) -> float:
            weight = children.weight(definition, item.node) / ops
            return max(weight, children.size(definition, item, size) / settling.MAX_BATCH_BYTES)

        async def readied(
            chunk: Sequence[work_item_pb2.WorkItem],
        ) -> tuple[list[Compare], list[Request]]:
            now = await self.kv.get(keys.run_info(run_id))
            current = records_pb2.RunRecord.FromString(now.value) if now is not None else run
            fresh = [fresh_state(item) for item in chunk]
            guards, writes = await self.readied(keys, current, fresh, now_ms(), fresh=True)
            if any(s.child_run_id for s in fresh):  # children start paused under a paused run
                guards.append(Compare.value_is(keys.status(run_id), status_name(current.status)))
            return guards, writes

        await fanout.expand(self.kv, namespace, run_id, item_id, readied, share)


def _waits(item: KeyValue, child_run_id: str) -> bool:
    """Whether a parent's item still waits for this child run (its latest attempt's)."""
    state = records_pb2.WorkItemState.FromString(item.value)
    return (
        state.status == records_pb2.ITEM_STATUS_IN_PROGRESS and state.child_run_id == child_run_id
    )


def nest(txn: Txn, resolution: Resolution | None) -> Txn:
    """A nested Txn that also takes ``resolution`` (the stuck Txn of a child's last branch)."""
    if resolution is None:
        return txn
    return dataclasses.replace(
        txn,
        compares=[*txn.compares, *resolution.guards],
        success=[*txn.success, *resolution.writes],
    )


def _unnamed(request: Request) -> Request:
    return dataclasses.replace(request, name="") if isinstance(request, Txn) else request


def _with(
    basis: planning.Basis, planner: Planner, known: Mapping[bytes, KeyValue | None]
) -> planning.Plan:
    return planner(dataclasses.replace(basis, groups=known))
