"""Child runs: what a nested workflow's run is to the item of its parent that it runs.

A ``NODE_KIND_SUBWORKFLOW`` node is not a call: each attempt of its item is a run of its own, a
*child* run, on the server as in the local runner. Both derive the child's id and read its end
the same way, from here:

- the id is derived from the parent's run, the item and the attempt (:func:`child_run_id`), so
  a step applied twice starts one child, and a retry starts another;
- it starts from a copy of the parent's context (:meth:`ContextSchema.inherit
  <floxide_grpc.context.ContextSchema.inherit>`), which stays its own, as floxide's
  ``CompositeNode`` clones the outer context;
- its end is its parent item's outcome (:func:`outcome`): a completed child's output is the
  node's output (``Next``), a failed or timed-out one is a failed attempt (``Abort``), so the
  node's retry policy and fallback edge apply as to any node.
"""

from __future__ import annotations

import hashlib
import uuid

from floxide_grpc._proto.floxide.v1 import records_pb2, work_item_pb2

__all__ = ["child_run_id", "outcome"]


def child_run_id(run_id: str, item_id: str, attempt: int) -> str:
    """The id of the child run of ``attempt`` of a subworkflow node's item.

    UUID-shaped (version 8, RFC 9562): the first 48 bits are the parent's (a UUIDv7's creation
    time), so children sort with their parent; the rest is a hash of parent, item and attempt.
    """
    digest = int.from_bytes(
        hashlib.blake2b(f"{run_id}/{item_id}/{attempt}".encode(), digest_size=16).digest()
    )
    try:
        prefix = uuid.UUID(run_id).int >> 80
    except ValueError:  # a local run named by its caller: the hash alone
        prefix = digest >> 80
    value = (
        prefix << 80 | 0x8 << 76 | (digest >> 64 & 0xFFF) << 64 | 0b10 << 62 | digest & (2**62 - 1)
    )
    return str(uuid.UUID(int=value))


def outcome(run: records_pb2.RunRecord) -> work_item_pb2.Transition | None:
    """What a child run's end is to its parent's item (``None``: it has not ended so).

    Completed: ``Next`` with its output. Failed: ``Abort`` with its error's kind (a stuck child's
    as GENERIC, STUCK being a run's kind) and ``non_retryable``. Timed out: ``Abort`` of kind
    TIMEOUT. A cancelled child cancels its parent instead: no outcome.
    """
    if run.status == records_pb2.RUN_STATUS_COMPLETED:
        return work_item_pb2.Transition(next=work_item_pb2.Transition.Next(output=run.output))
    if run.status == records_pb2.RUN_STATUS_FAILED:
        kind = run.error.kind
        if kind in (work_item_pb2.ERROR_KIND_STUCK, work_item_pb2.ERROR_KIND_UNSPECIFIED):
            kind = work_item_pb2.ERROR_KIND_GENERIC
        what = f"child run {run.run_id} of {run.workflow!r} failed: {run.error.message}"
    elif run.status == records_pb2.RUN_STATUS_TIMED_OUT:
        kind = work_item_pb2.ERROR_KIND_TIMEOUT
        what = f"child run {run.run_id} of {run.workflow!r} timed out: {run.error.message}"
    else:
        return None
    error = work_item_pb2.NodeError(
        kind=kind,
        message=what,
        error_type=run.error.error_type,
        details=run.error.details,
        non_retryable=run.error.non_retryable,
    )
    return work_item_pb2.Transition(abort=error)
