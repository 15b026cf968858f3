"""Python views of the server's records: what the client returns instead of protobuf messages."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
from typing import Any

from google.protobuf import json_format

from floxide_grpc._proto.floxide.v1 import (
    admin_service_pb2,
    records_pb2,
    work_item_pb2,
    workflow_pb2,
)

__all__ = [
    "ErrorInfo",
    "ItemInfo",
    "Role",
    "RunInfo",
    "RunMetrics",
    "RunStatus",
    "TokenInfo",
    "WorkerInfo",
]


class RunStatus(enum.StrEnum):
    """The state of a run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    TIMED_OUT = "timed_out"

    @classmethod
    def from_proto(cls, value: int) -> RunStatus:
        """Read a ``floxide.v1.RunStatus``.

        Raises:
            ValueError: the value is unspecified or unknown to this SDK.
        """
        return cls(records_pb2.RunStatus.Name(value).removeprefix("RUN_STATUS_").lower())  # type: ignore[arg-type]

    def to_proto(self) -> records_pb2.RunStatus.ValueType:
        """The ``floxide.v1.RunStatus`` value."""
        return records_pb2.RunStatus.Value(f"RUN_STATUS_{self.name}")

    @property
    def finished(self) -> bool:
        """Whether waiting for the run ends here (completed, failed, cancelled or timed out)."""
        return self in (
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.TIMED_OUT,
        )


def _time(stamp: Any, present: bool) -> datetime.datetime | None:
    return stamp.ToDatetime(tzinfo=datetime.UTC) if present else None


def _json(payload: work_item_pb2.Payload) -> Any:
    return json.loads(payload.data) if payload.data else None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A run as the server records it."""

    run_id: str
    namespace: str
    workflow: str
    definition_hash: str
    status: RunStatus
    input: Any
    output: Any
    error: str | None
    created_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    run_timeout: datetime.timedelta | None = None
    parent_run_id: str = ""
    """For a child run (a nested workflow's): its parent run."""
    parent_item_id: str = ""
    """For a child run: the parent's item it runs."""
    error_kind: str = ""
    """The kind of the error that ended the run (``"GENERIC"``, ``"TIMEOUT"``, ``"STUCK"``, ...)."""
    error_details: str = ""
    """Its detail: the failed node's stack trace, say."""
    failed_node: str = ""
    """For a run failed by an item that failed for good: the item's node."""
    failed_item_id: str = ""
    """That item."""
    failed_attempts: int = 0
    """How many attempts that item used."""

    @classmethod
    def from_proto(cls, record: records_pb2.RunRecord) -> RunInfo:
        """Read a ``floxide.v1.RunRecord``."""
        return cls(
            run_id=record.run_id,
            namespace=record.namespace,
            workflow=record.workflow,
            definition_hash=record.definition_hash,
            status=RunStatus.from_proto(record.status),
            input=_json(record.input),
            output=_json(record.output) if record.HasField("output") else None,
            error=record.error.message if record.HasField("error") else None,
            created_at=_time(record.created_at, record.HasField("created_at")),
            finished_at=_time(record.finished_at, record.HasField("finished_at")),
            run_timeout=(
                record.run_timeout.ToTimedelta() if record.HasField("run_timeout") else None
            ),
            parent_run_id=record.parent.run_id,
            parent_item_id=record.parent.item_id,
            error_kind=(
                work_item_pb2.ErrorKind.Name(record.error.kind).removeprefix("ERROR_KIND_")
                if record.HasField("error")
                else ""
            ),
            error_details=record.error.details,
            failed_node=record.failed_item.node,
            failed_item_id=record.failed_item.item_id,
            failed_attempts=record.failed_item.attempts,
        )


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """Counts of a run's items."""

    total_work_items: int
    completed: int
    failed: int
    retries: int
    pending: int
    in_progress: int
    waiting_retry: int
    worker_lost: int
    cancelled: int = 0
    """Items stopped because their run ended (0 in flight once a run is finished)."""

    @classmethod
    def from_proto(cls, metrics: records_pb2.RunMetrics) -> RunMetrics:
        """Read a ``floxide.v1.RunMetrics``."""
        return cls(**{f.name: getattr(metrics, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    """One failed attempt."""

    item_id: str
    node: str
    attempt: int
    kind: str
    message: str
    occurred_at: datetime.datetime | None
    details: str = ""
    """Further detail, such as the node's stack trace."""
    worker_id: str = ""
    """The worker that ran the attempt; empty when none did."""

    @classmethod
    def from_proto(cls, record: records_pb2.ErrorRecord) -> ErrorInfo:
        """Read a ``floxide.v1.ErrorRecord``."""
        return cls(
            item_id=record.item_id,
            node=record.node,
            attempt=record.attempt,
            kind=work_item_pb2.ErrorKind.Name(record.error.kind).removeprefix("ERROR_KIND_"),
            message=record.error.message,
            occurred_at=_time(record.occurred_at, record.HasField("occurred_at")),
            details=record.error.details,
            worker_id=record.worker_id,
        )


@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """A work item and its state."""

    item_id: str
    node: str
    status: str
    attempts: int
    last_error: str | None
    child_run_id: str = ""
    """A nested workflow's item: the child run of its latest attempt."""

    @classmethod
    def from_proto(cls, state: records_pb2.WorkItemState) -> ItemInfo:
        """Read a ``floxide.v1.WorkItemState``."""
        return cls(
            item_id=state.item.item_id,
            node=state.item.node,
            status=records_pb2.ItemStatus.Name(state.status).removeprefix("ITEM_STATUS_").lower(),
            attempts=state.attempts,
            last_error=state.last_error.message if state.HasField("last_error") else None,
            child_run_id=state.child_run_id,
        )


@dataclasses.dataclass(frozen=True)
class WorkflowInfo:
    """A registered definition of a workflow.

    Attributes:
        current: Whether runs that name no hash start on it.
        served_by: The connected workers serving a node of it.
    """

    name: str
    definition_hash: str
    current: bool
    registered_at: datetime.datetime | None
    served_by: tuple[str, ...] = ()
    definition: dict[str, Any] | None = None
    """The ``floxide.v1.WorkflowDefinition`` in protobuf's JSON mapping (the proto's field
    names), as any language reads it; ``None`` in lists."""

    @classmethod
    def from_proto(cls, record: workflow_pb2.RegisteredWorkflow) -> WorkflowInfo:
        """Read a ``floxide.v1.RegisteredWorkflow``."""
        return cls(
            name=record.name or record.definition.name,
            definition_hash=record.definition_hash,
            current=record.current,
            registered_at=_time(record.registered_at, record.HasField("registered_at")),
            served_by=tuple(record.served_by),
            definition=(
                json_format.MessageToDict(record.definition, preserving_proto_field_name=True)
                if record.HasField("definition")
                else None
            ),
        )


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker session: a connected one, or one that ended (liveness ``dead``).

    Attributes:
        liveness: ``alive``, ``stale`` (its lease was not renewed for two heartbeat intervals)
            or ``dead`` (ended; listed with ``include_dead``).
        in_flight: How many items it holds now (its claims).
        last_heartbeat: When its replica last renewed its lease, by that replica's clock.
        ended_at: When its session ended, by the clock of the replica that saw it end.
    """

    session_id: str
    worker_id: str
    status: str
    liveness: str
    slots: int
    in_flight: int
    last_heartbeat: datetime.datetime | None
    ended_at: datetime.datetime | None = None
    nodes: tuple[tuple[str, str, str], ...] = ()
    """The nodes it serves: (workflow, node, definition hash; "" for every definition)."""

    @classmethod
    def from_proto(cls, record: records_pb2.WorkerRecord) -> WorkerInfo:
        """Read a ``floxide.v1.WorkerRecord``."""
        return cls(
            session_id=record.session_id,
            worker_id=record.worker_id,
            status=records_pb2.WorkerStatus.Name(record.status)
            .removeprefix("WORKER_STATUS_")
            .lower(),
            liveness=records_pb2.LivenessStatus.Name(record.liveness)
            .removeprefix("LIVENESS_STATUS_")
            .lower(),
            slots=record.slots,
            in_flight=len(record.current_items),
            last_heartbeat=_time(record.last_heartbeat, record.HasField("last_heartbeat")),
            ended_at=_time(record.ended_at, record.HasField("ended_at")),
            nodes=tuple((n.workflow, n.node, n.definition_hash) for n in record.nodes),
        )


class Role(enum.StrEnum):
    """What a token may do (docs/protocol.md, "Tokens and roles")."""

    READER = "reader"
    CLIENT = "client"
    OPERATOR = "operator"
    WORKER = "worker"
    ADMIN = "admin"

    def to_proto(self) -> int:
        """The ``floxide.v1.Role`` value."""
        return int(admin_service_pb2.Role.Value(f"ROLE_{self.name}"))

    @classmethod
    def from_proto(cls, value: int) -> Role:
        """Read a ``floxide.v1.Role`` value."""
        return cls[admin_service_pb2.Role.Name(value).removeprefix("ROLE_")]  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A token in force, without its secret.

    Attributes:
        id: Its public id (what audit lines and ``revoke_token`` name).
        namespaces: The namespaces it may name; empty for an admin (every one).
        expires_at: When it stops working; ``None``: never.
    """

    id: str
    name: str
    role: Role
    namespaces: tuple[str, ...]
    created_at: datetime.datetime | None
    expires_at: datetime.datetime | None = None

    @classmethod
    def from_proto(cls, info: admin_service_pb2.TokenInfo) -> TokenInfo:
        """Read a ``floxide.v1.TokenInfo``."""
        return cls(
            id=info.id,
            name=info.name,
            role=Role.from_proto(info.role),
            namespaces=tuple(info.namespaces),
            created_at=_time(info.created_at, info.HasField("created_at")),
            expires_at=_time(info.expires_at, info.HasField("expires_at")),
        )
