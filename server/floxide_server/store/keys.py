"""Every key the server writes, in one place.

These keys are the whole cluster's, under ``/floxide/v1/``:

| key | value | why |
|---|---|---|
| ``storage-format`` | decimal number | the layout of every key and value here (store.format) |
| ``namespaces/{namespace}`` | empty | the namespaces that registered a workflow, to tend |
| ``election/{name}/{lease}`` | server id | a candidate, on its lease; the first created leads |

Everything else lives under ``/floxide/v1/ns/{namespace}/``. What belongs to one run lives under
its own prefix (``run/{run}/``), so retention removes it with one range delete; the run's record
is apart (``runinfo/{run}``) so that listing runs reads records only. Run ids are time-ordered
(UUIDv7), so ``runinfo/`` and ``queue/`` are in creation order. No key is rewritten by every step
of a run: items, context operations and join arrivals each have a key of their own. A value is a
floxide.v1 message where the contracts define that record (RunRecord and WorkItemState are
returned as stored; JoinGroup is the local runner's too), else one of the server's own
floxide.storage.v1 (``proto/floxide/storage/v1``), which only the storage format binds.

| key | value | why |
|---|---|---|
| ``wf/def/{hash}`` | RegisteredWorkflow | definitions are immutable, by content hash |
| ``wf/cur/{name}`` | hash | the definition new runs of a name use |
| ``idem/{sha256(key)}`` | run id + request fingerprint | StartRun idempotency, per namespace |
| ``runinfo/{run}`` | RunRecord | status, output, error; listed newest first |
| ``run/{run}/status`` | status name | the small key every step's Txn compares |
| ``run/{run}/ctx/init`` | JSON object | the context a run started with |
| ``run/{run}/ctx/ops/{item}`` | ContextOperationsRecord | an item's context operations, in order |
| ``run/{run}/item/{item}`` | WorkItemState | each item's state, attempts, last error |
| ``run/{run}/group/{group}`` | JoinGroup | a fan-out group and the indexes arrived |
| ``run/{run}/group/{group}/out/{index}`` | GroupArrival | one branch's output, not copied |
| ``run/{run}/err/{item}/{attempt}`` | ErrorRecord | every failed attempt |
| ``run/{run}/live/{item}`` | empty | an item not done, or its fan-out not expanded: none, stuck |
| ``run/{run}/ended/{node}`` | empty | a node that ended a branch with no successor: says why |
| ``run/{run}/child/{child}`` | item id | a child run of the run (a nested workflow's attempt) |
| ``queue/{run}/{item}`` | WorkItem (no input) | ready to dispatch; deleted by the claim |
| ``expand/{run}/{item}`` | ExpansionRecord | a fan-out wider than one Txn, expanding |
| ``settle/{run}`` | status name | a finished run whose leftovers are being settled |
| ``running/{run}`` | empty | a run StartRun started, running or paused: counted for the quota |
| ``timer/{run}/{item}`` | TimerRecord | a durable retry: a delay, never a due time |
| ``timer/{run}`` | TimerRecord | the run's timeout, likewise |
| ``timer-clock`` | decimal ms | the timer clock, advanced and written by the elected replica |
| ``session/{lease}`` | WorkerRecord | a worker stream; the only key on a lease |
| ``claim/{lease}/{run}/{item}`` | claim token | the whole token, which its result must equal |
| ``worker/{lease}`` | WorkerRecord | a session, kept (no lease) with ``ended_at`` once it ends |
| ``checkpoint/{run}`` | Checkpoint | checkpoints of local runs (CheckpointStoreService) |
"""

from __future__ import annotations

import hashlib

__all__ = ["ELECTIONS", "NAMESPACES", "ROOT", "STORAGE_FORMAT_KEY", "Keys", "election"]

ROOT = b"/floxide/v1/ns/"
NAMESPACES = b"/floxide/v1/namespaces/"
"""One key per namespace that has registered a workflow: the replicas' list of what to tend."""
STORAGE_FORMAT_KEY = b"/floxide/v1/storage-format"
"""The storage-format version of everything under ``/floxide/v1/`` (see store.format)."""
ELECTIONS = b"/floxide/v1/election/"
"""Leader elections among replicas (see :mod:`floxide_server.election`)."""


def _b(text: str) -> bytes:
    return text.encode()


def election(name: str, lease: int | None = None) -> bytes:
    """A candidate's key in the election ``name`` (or, without ``lease``, the prefix of all)."""
    key = ELECTIONS + _b(name) + b"/"
    return key if lease is None else key + _b(f"{lease:016x}")


class Keys:
    """The keys of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = ROOT + _b(namespace) + b"/"

    @property
    def index(self) -> bytes:
        """This namespace's entry in the namespace index."""
        return NAMESPACES + _b(self.namespace)

    # workflows
    def workflow_def(self, definition_hash: str) -> bytes:
        """A registered definition."""
        return self.prefix + b"wf/def/" + _b(definition_hash)

    @property
    def workflow_defs(self) -> bytes:
        """Prefix of every registered definition."""
        return self.prefix + b"wf/def/"

    def workflow_current(self, name: str) -> bytes:
        """The hash new runs of ``name`` use."""
        return self.prefix + b"wf/cur/" + _b(name)

    @property
    def workflows(self) -> bytes:
        """Prefix of every workflow name's current hash."""
        return self.prefix + b"wf/cur/"

    # runs
    def idempotency(self, key: str) -> bytes:
        """A StartRun idempotency key (hashed: keys may hold any characters)."""
        return self.prefix + b"idem/" + _b(hashlib.sha256(_b(key)).hexdigest())

    def run_info(self, run_id: str) -> bytes:
        """A run's record."""
        return self.prefix + b"runinfo/" + _b(run_id)

    @property
    def run_infos(self) -> bytes:
        """Prefix of every run record."""
        return self.prefix + b"runinfo/"

    def run(self, run_id: str) -> bytes:
        """Prefix of everything a run owns."""
        return self.prefix + b"run/" + _b(run_id) + b"/"

    def status(self, run_id: str) -> bytes:
        """A run's status name, compared by every step."""
        return self.run(run_id) + b"status"

    def context_init(self, run_id: str) -> bytes:
        """A run's initial context."""
        return self.run(run_id) + b"ctx/init"

    def context_ops(self, run_id: str, item_id: str = "") -> bytes:
        """One item's context operations (or, without ``item_id``, their prefix)."""
        return self.run(run_id) + b"ctx/ops/" + _b(item_id)

    def item(self, run_id: str, item_id: str = "") -> bytes:
        """An item's state (or, without ``item_id``, the prefix of every item)."""
        return self.run(run_id) + b"item/" + _b(item_id)

    def group(self, run_id: str, group_id: str) -> bytes:
        """A fan-out group's record."""
        return self.run(run_id) + b"group/" + _b(group_id)

    def group_output(self, run_id: str, group_id: str, index: int) -> bytes:
        """One branch's arrival in its group."""
        return self.group(run_id, group_id) + b"/out/" + _b(f"{index:08d}")

    def group_outputs(self, run_id: str, group_id: str) -> bytes:
        """Prefix of a group's arrivals, in index order."""
        return self.group(run_id, group_id) + b"/out/"

    def running(self, run_id: str = "") -> bytes:
        """A run started by StartRun and not ended (or the prefix of all): the quota's count."""
        return self.prefix + b"running/" + _b(run_id)

    def live(self, run_id: str, item_id: str = "") -> bytes:
        """An item still to be done (or the prefix of a run's)."""
        return self.run(run_id) + b"live/" + _b(item_id)

    def ended(self, run_id: str, node: str = "") -> bytes:
        """A node that ended a branch without a successor (or the prefix of a run's)."""
        return self.run(run_id) + b"ended/" + _b(node)

    def child(self, run_id: str, child_run_id: str = "") -> bytes:
        """A child run of the run (or the prefix of its children)."""
        return self.run(run_id) + b"child/" + _b(child_run_id)

    def error(self, run_id: str, item_id: str = "", attempt: int | None = None) -> bytes:
        """A failed attempt (or a prefix: a run's errors, or an item's)."""
        key = self.run(run_id) + b"err/"
        if item_id:
            key += _b(item_id) + b"/"
            if attempt is not None:
                key += _b(f"{attempt:08d}")
        return key

    # dispatch
    def queue(self, run_id: str = "", item_id: str = "") -> bytes:
        """A ready item (or a prefix: every ready item, or a run's)."""
        key = self.prefix + b"queue/"
        if run_id:
            key += _b(run_id) + b"/" + _b(item_id)
        return key

    def expansion(self, run_id: str = "", item_id: str = "") -> bytes:
        """A fan-out too wide for one Txn, still being turned into items (or the prefix of all)."""
        key = self.prefix + b"expand/"
        if run_id:
            key += _b(run_id) + b"/" + _b(item_id)
        return key

    def settle(self, run_id: str = "") -> bytes:
        """A finished run whose other items are being settled (or the prefix of all)."""
        return self.prefix + b"settle/" + _b(run_id)

    def timer(self, run_id: str = "", item_id: str | None = None) -> bytes:
        """A run's timeout (or with ``item_id``, an item's retry; with nothing, every timer).

        A run's timeout key is also the prefix of all its timers (run ids have one length).
        """
        key = self.prefix + b"timer/"
        if run_id:
            key += _b(run_id)
            if item_id is not None:
                key += b"/" + _b(item_id)
        return key

    @property
    def timer_clock(self) -> bytes:
        """The namespace's timer clock (see floxide_server.firing)."""
        return self.prefix + b"timer-clock"

    def session(self, lease: int | None = None) -> bytes:
        """A worker session (or the prefix of every session)."""
        key = self.prefix + b"session/"
        return key if lease is None else key + _b(f"{lease:016x}")

    @property
    def claims(self) -> bytes:
        """The prefix of every session's claims."""
        return self.prefix + b"claim/"

    def claim(self, lease: int, run_id: str = "", item_id: str = "") -> bytes:
        """A claim of an item by a session (or the prefix of a session's claims)."""
        key = self.claims + _b(f"{lease:016x}") + b"/"
        if run_id:
            key += _b(run_id) + b"/" + _b(item_id)
        return key

    def worker(self, lease: int | None = None) -> bytes:
        """A session's durable record, kept after it ends (or the prefix of every one)."""
        key = self.prefix + b"worker/"
        return key if lease is None else key + _b(f"{lease:016x}")

    def checkpoint(self, run_id: str) -> bytes:
        """A local run's checkpoint."""
        return self.prefix + b"checkpoint/" + _b(run_id)
