"""The one error tree of floxide-grpc.

Every error the SDK, the server or the worker raises on purpose is a :class:`FloxideError`. Each
class carries the gRPC status code it maps to and a stable ``reason`` (UPPER_SNAKE), sent with its
fields in a ``google.rpc.ErrorInfo`` (domain ``floxide.v1``), so that the one boundary in
``floxide_grpc._status`` rebuilds the exact class on the other side (domain code never imports
grpc)::

    FloxideError                      INTERNAL
    ├── NotFound                      NOT_FOUND
    │   ├── WorkflowNotFound
    │   ├── NodeNotFound
    │   ├── RunNotFound
    │   └── NotStarted                (resume of a run with no checkpoint, or unknown)
    ├── InvalidArgument               INVALID_ARGUMENT
    │   ├── InvalidDefinition         (a malformed workflow, naming the node at fault)
    │   ├── InvalidPayload            (not JSON, NaN, or not valid for a node's type)
    │   ├── InvalidTransition         (a transition with no edge to follow)
    │   └── ContextError              (undeclared field, another strategy than the declared one)
    ├── FailedPrecondition            FAILED_PRECONDITION
    │   ├── AlreadyCompleted          (resume of a completed, cancelled or timed-out run)
    │   ├── ClaimLost                 (a result whose claim or session no longer stands)
    │   └── RunStuck                  (no work left and no terminal output)
    ├── AlreadyExists                 ALREADY_EXISTS (idempotency key reused, result applied)
    ├── ResourceExhausted             RESOURCE_EXHAUSTED (over a size limit)
    ├── Unavailable                   UNAVAILABLE  (etcd unreachable; retry with backoff)
    ├── Unauthenticated               UNAUTHENTICATED (no token, or a wrong, expired or revoked one)
    ├── PermissionDenied              PERMISSION_DENIED (the token's role or namespaces forbid it)
    ├── SessionEnded                  ABORTED      (a worker session's lease ended: reconnect)
    ├── RunFailed                     ABORTED      (an item failed for good with no fallback)
    ├── RunCancelled                  CANCELLED
    └── RunTimedOut                   DEADLINE_EXCEEDED (the run passed its run timeout)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import ClassVar, Self

__all__ = [
    "AlreadyCompleted",
    "AlreadyExists",
    "ClaimLost",
    "ContextError",
    "FailedPrecondition",
    "FloxideError",
    "InvalidArgument",
    "InvalidDefinition",
    "InvalidPayload",
    "InvalidTransition",
    "NodeNotFound",
    "NotFound",
    "NotStarted",
    "PermissionDenied",
    "ResourceExhausted",
    "RunCancelled",
    "RunFailed",
    "RunNotFound",
    "RunStuck",
    "RunTimedOut",
    "SessionEnded",
    "StatusCode",
    "Unauthenticated",
    "Unavailable",
    "WorkflowNotFound",
]


class StatusCode(enum.IntEnum):
    """gRPC status codes (google.rpc.Code numbering), without importing grpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class FloxideError(Exception):
    """Base of every error floxide-grpc raises on purpose.

    Attributes:
        run_id: The run the error is about, when there is one.
    """

    code: StatusCode = StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    """The stable name sent as ``google.rpc.ErrorInfo.reason``; never reused for another class."""

    by_reason: ClassVar[dict[str, type[FloxideError]]] = {}
    """Every class by its reason."""

    def __init__(self, message: str = "", *, run_id: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "reason" not in cls.__dict__:
            return  # crosses the wire as its nearest parent with a reason
        if cls.reason in FloxideError.by_reason:
            raise TypeError(f"reason {cls.reason} is {FloxideError.by_reason[cls.reason]}'s")
        FloxideError.by_reason[cls.reason] = cls

    @property
    def message(self) -> str:
        """The message, as given."""
        return str(self.args[0]) if self.args else ""

    def metadata(self) -> dict[str, str]:
        """The fields sent as ``google.rpc.ErrorInfo.metadata`` (only those set)."""
        return {"run_id": self.run_id} if self.run_id else {}

    @classmethod
    def from_metadata(cls, message: str, metadata: Mapping[str, str]) -> Self:
        """The error again from its message and :meth:`metadata`; unknown keys are ignored."""
        return cls(message, run_id=metadata.get("run_id", ""))


class NotFound(FloxideError):
    """Raised when a named thing (workflow, node, run, item) does not exist."""

    reason = "NOT_FOUND"
    code = StatusCode.NOT_FOUND


class WorkflowNotFound(NotFound):
    """Raised when no workflow has the given name (or hash)."""

    reason = "WORKFLOW_NOT_FOUND"


class NodeNotFound(NotFound):
    """Raised when a workflow has no node of the given name."""

    reason = "NODE_NOT_FOUND"


class RunNotFound(NotFound):
    """Raised when no run has the given id in the namespace."""

    reason = "RUN_NOT_FOUND"


class NotStarted(NotFound):
    """Raised when resuming a run with no checkpoint or record (floxide's ``NotStarted``)."""

    reason = "NOT_STARTED"


class InvalidArgument(FloxideError):
    """Raised when a request or value is malformed."""

    reason = "INVALID_ARGUMENT"
    code = StatusCode.INVALID_ARGUMENT


class InvalidDefinition(InvalidArgument):
    """Raised when a workflow definition is malformed; the message names the node at fault."""

    reason = "INVALID_DEFINITION"


class InvalidPayload(InvalidArgument):
    """Raised when a payload is not JSON, holds NaN or Infinity, or does not fit its type."""

    reason = "INVALID_PAYLOAD"


class InvalidTransition(InvalidArgument):
    """Raised when a node's transition has no edge to follow (an undeclared route, say)."""

    reason = "INVALID_TRANSITION"


class ContextError(InvalidArgument):
    """Raised when a context operation names an undeclared field or another strategy."""

    reason = "CONTEXT_ERROR"


class FailedPrecondition(FloxideError):
    """Raised when the state of a run forbids the request."""

    reason = "FAILED_PRECONDITION"
    code = StatusCode.FAILED_PRECONDITION


class AlreadyCompleted(FailedPrecondition):
    """Raised when resuming a completed, cancelled or timed-out run (``AlreadyCompleted``)."""

    reason = "ALREADY_COMPLETED"


class ClaimLost(FailedPrecondition):
    """Raised when a result's claim no longer stands, or its worker's session has ended."""

    reason = "CLAIM_LOST"


class AlreadyExists(FloxideError):
    """Raised when an idempotency key is reused for another request, or a result was applied."""

    reason = "ALREADY_EXISTS"
    code = StatusCode.ALREADY_EXISTS


class ResourceExhausted(FloxideError):
    """Raised when a payload, context or definition is over its size limit."""

    reason = "RESOURCE_EXHAUSTED"
    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FloxideError):
    """Raised when the server cannot reach etcd (or is shutting down): retry with backoff."""

    reason = "UNAVAILABLE"
    code = StatusCode.UNAVAILABLE


class Unauthenticated(FloxideError):
    """Raised when a call carries no token, or one that is wrong, expired or revoked."""

    reason = "UNAUTHENTICATED"
    code = StatusCode.UNAUTHENTICATED


class PermissionDenied(FloxideError):
    """Raised when a token's role or namespaces do not allow a call."""

    reason = "PERMISSION_DENIED"
    code = StatusCode.PERMISSION_DENIED


class SessionEnded(FloxideError):
    """Raised when a worker session's lease has ended: the worker reconnects for a new one."""

    reason = "SESSION_ENDED"
    code = StatusCode.ABORTED


class RunFailed(FloxideError):
    """Raised when a run fails: an item failed for good and its node has no fallback.

    Attributes:
        node: The node whose item failed.
        kind: The error kind of the last attempt, as a ``floxide.v1.ErrorKind`` name
            without its prefix (``"GENERIC"``, ``"TIMEOUT"``, ...).
        attempts: How many attempts the item used.
        details: The last attempt's detail, such as the node's stack trace.
    """

    reason = "RUN_FAILED"
    code = StatusCode.ABORTED

    def __init__(
        self,
        message: str,
        *,
        node: str,
        kind: str,
        attempts: int,
        details: str = "",
        run_id: str = "",
    ) -> None:
        super().__init__(message, run_id=run_id)
        self.node = node
        self.kind = kind
        self.attempts = attempts
        self.details = details

    def metadata(self) -> dict[str, str]:
        """The run, node, kind, attempts and details."""
        fields = {"node": self.node, "kind": self.kind, "attempts": str(self.attempts)}
        if self.details:
            fields["details"] = self.details
        return {**super().metadata(), **fields}

    @classmethod
    def from_metadata(cls, message: str, metadata: Mapping[str, str]) -> Self:
        """The error again from its message and :meth:`metadata`."""
        attempts = metadata.get("attempts", "0")
        return cls(
            message,
            node=metadata.get("node", ""),
            kind=metadata.get("kind", ""),
            attempts=int(attempts) if attempts.isdigit() else 0,
            details=metadata.get("details", ""),
            run_id=metadata.get("run_id", ""),
        )


class RunCancelled(FloxideError):
    """Raised when a run is cancelled before it completes."""

    reason = "RUN_CANCELLED"
    code = StatusCode.CANCELLED


class RunTimedOut(FloxideError):
    """Raised when a run passes its run timeout before it completes."""

    reason = "RUN_TIMED_OUT"
    code = StatusCode.DEADLINE_EXCEEDED


class RunStuck(FailedPrecondition):
    """Raised when a run has no work left but never reached a terminal node."""

    reason = "RUN_STUCK"
