"""The one error tree of floxide-grpc.

Every error the SDK, the server or the worker raises on purpose is a :class:`FloxideError`, and
each class carries the gRPC status code it maps to, so that one interceptor on the server and one
mapping in the client translate them (domain code never imports grpc)::

    FloxideError                      INTERNAL
    ├── NotFound                      NOT_FOUND
    │   ├── WorkflowNotFound
    │   ├── NodeNotFound
    │   └── NotStarted                (resume of a run with no checkpoint)
    ├── InvalidArgument               INVALID_ARGUMENT
    │   ├── InvalidDefinition         (a malformed workflow, naming the node at fault)
    │   ├── InvalidPayload            (not JSON, NaN, or not valid for a node's type)
    │   ├── InvalidTransition         (a transition with no edge to follow)
    │   └── ContextError              (undeclared field, another strategy than the declared one)
    ├── FailedPrecondition            FAILED_PRECONDITION
    │   ├── AlreadyCompleted          (resume of a finished run)
    │   └── ClaimLost                 (a result whose claim or session no longer stands)
    ├── AlreadyExists                 ALREADY_EXISTS (idempotency key reused, result applied)
    ├── ResourceExhausted             RESOURCE_EXHAUSTED (over a size limit)
    ├── Unavailable                   UNAVAILABLE  (etcd unreachable; retry with backoff)
    ├── Unauthenticated               UNAUTHENTICATED (no token, or a wrong, expired or revoked one)
    ├── PermissionDenied              PERMISSION_DENIED (the token's role or namespaces forbid it)
    ├── SessionEnded                  ABORTED      (a worker session's lease ended: reconnect)
    ├── RunFailed                     ABORTED      (an item failed for good with no fallback)
    ├── RunCancelled                  CANCELLED
    └── RunStuck                      FAILED_PRECONDITION (no work left and no terminal output)
"""

from __future__ import annotations

import enum

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
    "RunStuck",
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
    """Base of every error floxide-grpc raises on purpose."""

    code: StatusCode = StatusCode.INTERNAL


class NotFound(FloxideError):
    """Raised when a named thing (workflow, node, run, item) does not exist."""

    code = StatusCode.NOT_FOUND


class WorkflowNotFound(NotFound):
    """Raised when no workflow has the given name (or hash)."""


class NodeNotFound(NotFound):
    """Raised when a workflow has no node of the given name."""


class NotStarted(NotFound):
    """Raised when resuming a run that has no checkpoint (floxide's ``NotStarted``)."""


class InvalidArgument(FloxideError):
    """Raised when a request or value is malformed."""

    code = StatusCode.INVALID_ARGUMENT


class InvalidDefinition(InvalidArgument):
    """Raised when a workflow definition is malformed; the message names the node at fault."""


class InvalidPayload(InvalidArgument):
    """Raised when a payload is not JSON, holds NaN or Infinity, or does not fit its type."""


class InvalidTransition(InvalidArgument):
    """Raised when a node's transition has no edge to follow (an undeclared route, say)."""


class ContextError(InvalidArgument):
    """Raised when a context operation names an undeclared field or another strategy."""


class FailedPrecondition(FloxideError):
    """Raised when the state of a run forbids the request."""

    code = StatusCode.FAILED_PRECONDITION


class AlreadyCompleted(FailedPrecondition):
    """Raised when resuming a run that has already finished (floxide's ``AlreadyCompleted``)."""


class ClaimLost(FailedPrecondition):
    """Raised when a result's claim no longer stands, or its worker's session has ended."""


class AlreadyExists(FloxideError):
    """Raised when an idempotency key is reused for another request, or a result was applied."""

    code = StatusCode.ALREADY_EXISTS


class ResourceExhausted(FloxideError):
    """Raised when a payload, context or definition is over its size limit."""

    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FloxideError):
    """Raised when the server cannot reach etcd (or is shutting down): retry with backoff."""

    code = StatusCode.UNAVAILABLE


class Unauthenticated(FloxideError):
    """Raised when a call carries no token, or one that is wrong, expired or revoked."""

    code = StatusCode.UNAUTHENTICATED


class PermissionDenied(FloxideError):
    """Raised when a token's role or namespaces do not allow a call."""

    code = StatusCode.PERMISSION_DENIED


class SessionEnded(FloxideError):
    """Raised when a worker session's lease has ended: the worker reconnects for a new one."""

    code = StatusCode.ABORTED


class RunFailed(FloxideError):
    """Raised when a run fails: an item failed for good and its node has no fallback.

    Attributes:
        node: The node whose item failed.
        kind: The error kind of the last attempt, as a ``floxide.v1.ErrorKind`` name.
        attempts: How many attempts the item used.
    """

    code = StatusCode.ABORTED

    def __init__(self, message: str, *, node: str, kind: str, attempts: int) -> None:
        super().__init__(message)
        self.node = node
        self.kind = kind
        self.attempts = attempts


class RunCancelled(FloxideError):
    """Raised when a run is cancelled before it completes."""

    code = StatusCode.CANCELLED


class RunTimedOut(FloxideError):
    """Raised when a run passes its run timeout before it completes."""

    code = StatusCode.DEADLINE_EXCEEDED


class RunStuck(FailedPrecondition):
    """Raised when a run has no work left but never reached a terminal node."""
