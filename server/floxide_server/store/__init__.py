"""The server's state: every store of the contracts, over a transactional key-value store.

One module per role; :class:`Store` wires them on one KV:

| module | what it does |
|---|---|
| ``kv`` | the KV interface (etcd's model) and an in-memory one |
| ``keys`` | every key the server writes, and why it is laid out so |
| ``format`` | the storage-format version, checked at start |
| ``records`` | run and item records: statuses, stamps, fresh states, run ids |
| ``workflows`` | registered definitions by hash, the current one of each name |
| ``reads`` | runs, items, errors, metrics and contexts as they stand |
| ``lifecycle`` | start, cancel, pause, resume (a failed run whole), enqueue |
| ``queue`` | how an item becomes ready, and what is ready |
| ``claims`` | claim tokens, claiming for a session, releasing lost claims |
| ``completion`` | a result applied once in one fenced Txn (sticky chains) |
| ``children`` | pure: a nested workflow's item started as a child run in the Txn that readies it |
| ``lineage`` | a child's end resolves its parent's item; cancels cross the link; wide expansions |
| ``planning`` | pure: from a snapshot and a result to the Txn and what the step decides |
| ``fanout`` | groups, arrivals and joins; wide fan-outs expanded |
| ``timers`` | durable timers (retries, run timeouts): delays, never due times; their Txns |
| ``settling`` | a finished run's other items settled: nothing left in flight |
| ``stuck`` | a run with nothing left to run fails as STUCK |
| ``contexts`` | context operations stored and folded |
| ``retention`` | finished runs removed after their period |
| ``payloads`` | limits, JSON parsing and schema checks, pages |
"""

from __future__ import annotations

import dataclasses

from floxide_server.store.claims import Claims
from floxide_server.store.completion import Completions
from floxide_server.store.fanout import GroupCache
from floxide_server.store.kv import KV
from floxide_server.store.lifecycle import RunLifecycle
from floxide_server.store.lineage import Lineage
from floxide_server.store.payloads import Limits
from floxide_server.store.reads import RunReads
from floxide_server.store.workflows import WorkflowStore

__all__ = ["Store"]


@dataclasses.dataclass(frozen=True)
class Store:
    """The store's roles on one KV, wired once (see the table above)."""

    kv: KV
    limits: Limits
    workflows: WorkflowStore
    reads: RunReads
    lifecycle: RunLifecycle
    claims: Claims
    completions: Completions
    lineage: Lineage

    @classmethod
    def open(cls, kv: KV, limits: Limits, workflows: WorkflowStore | None = None) -> Store:
        """Wire every role on ``kv`` (``workflows`` shared with another store, if given)."""
        workflows = workflows or WorkflowStore(kv, limits)
        reads = RunReads(kv, workflows)
        groups = GroupCache()
        lineage = Lineage(kv, workflows, groups, limits)
        claims = Claims(kv, workflows, groups, limits, lineage)
        return cls(
            kv=kv,
            limits=limits,
            workflows=workflows,
            reads=reads,
            lifecycle=RunLifecycle(kv, workflows, reads, limits, lineage),
            claims=claims,
            completions=Completions(kv, workflows, claims, groups, limits, lineage),
            lineage=lineage,
        )
