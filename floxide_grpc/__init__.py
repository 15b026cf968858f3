"""floxide-grpc: distributed workflows over gRPC, with etcd as the only state.

The SDK shared by the orchestrator server and the workers, and a local runner for development
and tests. The wire contracts live in ``proto/floxide/v1``; their generated code, in
``floxide_grpc._proto``, is private: this package's API speaks Python types.
"""

from importlib.metadata import version as _version

from floxide_grpc.context import Merge, NodeContext
from floxide_grpc.errors import (
    AlreadyCompleted,
    AlreadyExists,
    ClaimLost,
    ContextError,
    FailedPrecondition,
    FloxideError,
    InvalidArgument,
    InvalidDefinition,
    InvalidPayload,
    InvalidTransition,
    NodeNotFound,
    NotFound,
    NotStarted,
    PermissionDenied,
    ResourceExhausted,
    RunCancelled,
    RunFailed,
    RunNotFound,
    RunStuck,
    RunTimedOut,
    SessionEnded,
    StatusCode,
    Unauthenticated,
    Unavailable,
    WorkflowNotFound,
)
from floxide_grpc.graph import Graph
from floxide_grpc.helpers import batch, split
from floxide_grpc.node import Node, node, subworkflow
from floxide_grpc.retry import Backoff, RetryPolicy
from floxide_grpc.runner import LocalRunner
from floxide_grpc.stores import CheckpointStore, FileCheckpointStore, InMemoryCheckpointStore
from floxide_grpc.transition import Abort, ErrorKind, Hold, Next, NextAll, Transition
from floxide_grpc.workflow import Workflow

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "AlreadyCompleted",
    "AlreadyExists",
    "Backoff",
    "CheckpointStore",
    "ClaimLost",
    "ContextError",
    "ErrorKind",
    "FailedPrecondition",
    "FileCheckpointStore",
    "FloxideError",
    "Graph",
    "Hold",
    "InMemoryCheckpointStore",
    "InvalidArgument",
    "InvalidDefinition",
    "InvalidPayload",
    "InvalidTransition",
    "LocalRunner",
    "Merge",
    "Next",
    "NextAll",
    "Node",
    "NodeContext",
    "NodeNotFound",
    "NotFound",
    "NotStarted",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunNotFound",
    "RunStuck",
    "RunTimedOut",
    "SessionEnded",
    "StatusCode",
    "Transition",
    "Unauthenticated",
    "Unavailable",
    "Workflow",
    "WorkflowNotFound",
    "__version__",
    "batch",
    "node",
    "split",
    "subworkflow",
]

__version__: str = _version("floxide-grpc")
"""The installed distribution's version."""

PROTOCOL_VERSION: int = 1
"""The worker-stream protocol version this SDK speaks (``Hello.protocol_version``)."""
