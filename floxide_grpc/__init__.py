"""floxide-grpc: distributed workflows over gRPC, with etcd as the only state.

The SDK shared by the orchestrator server and the workers: workflows and nodes, a local runner
for development and tests, and the client of a server. Everything public is here; modules
whose names start with ``_`` are shared by the server and the worker and are not API. The wire
contracts live in ``proto/floxide/v1``; their generated code, in ``floxide_grpc._proto``, is
private: this package's API speaks Python types.
"""

from floxide_grpc._version import PROTOCOL_VERSION, __version__
from floxide_grpc.client import OrchestratorClient, SyncOrchestratorClient
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
from floxide_grpc.helpers import batch, split
from floxide_grpc.node import Node, node, subworkflow
from floxide_grpc.records import (
    ErrorInfo,
    ItemInfo,
    Role,
    RunInfo,
    RunMetrics,
    RunStatus,
    TokenInfo,
    WorkerInfo,
    WorkflowInfo,
)
from floxide_grpc.retry import Backoff, RetryPolicy
from floxide_grpc.runner import LocalRunner
from floxide_grpc.stores import (
    CheckpointStore,
    FileCheckpointStore,
    InMemoryCheckpointStore,
    RemoteCheckpointStore,
)
from floxide_grpc.tls import Tls
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
    "ErrorInfo",
    "ErrorKind",
    "FailedPrecondition",
    "FileCheckpointStore",
    "FloxideError",
    "Hold",
    "InMemoryCheckpointStore",
    "InvalidArgument",
    "InvalidDefinition",
    "InvalidPayload",
    "InvalidTransition",
    "ItemInfo",
    "LocalRunner",
    "Merge",
    "Next",
    "NextAll",
    "Node",
    "NodeContext",
    "NodeNotFound",
    "NotFound",
    "NotStarted",
    "OrchestratorClient",
    "PermissionDenied",
    "RemoteCheckpointStore",
    "ResourceExhausted",
    "RetryPolicy",
    "Role",
    "RunCancelled",
    "RunFailed",
    "RunInfo",
    "RunMetrics",
    "RunNotFound",
    "RunStatus",
    "RunStuck",
    "RunTimedOut",
    "SessionEnded",
    "StatusCode",
    "SyncOrchestratorClient",
    "Tls",
    "TokenInfo",
    "Transition",
    "Unauthenticated",
    "Unavailable",
    "WorkerInfo",
    "Workflow",
    "WorkflowInfo",
    "WorkflowNotFound",
    "__version__",
    "batch",
    "node",
    "split",
    "subworkflow",
]
