"""The shared context of a run: declared fields, each merged by its own strategy.

floxide merges whole contexts with a user ``Merge`` monoid, which double-counts anything that is
not idempotent when a step runs twice. Here a step reports *operations* on single fields ("add 3
to ``total``"), and the store applies each step's operations once, atomically with its
transition, in commit order. The local runner and the server use the same :func:`apply`.

A context is declared as a dataclass (or msgspec Struct) whose fields all have defaults, with the
strategy in ``Annotated`` metadata (no metadata means :attr:`Merge.REPLACE`)::

    @dataclass
    class Totals:
        count: Annotated[int, Merge.ADD] = 0
        seen: Annotated[list[str], Merge.UNION] = field(default_factory=list)
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import typing
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from floxide_grpc import _codec as codec
from floxide_grpc._proto.floxide.v1 import work_item_pb2, workflow_pb2
from floxide_grpc.errors import ContextError, InvalidDefinition, InvalidPayload

__all__ = ["ContextSchema", "Merge", "NodeContext", "Operation", "apply"]


class Merge(enum.Enum):
    """How operations on a context field combine with its value."""

    REPLACE = work_item_pb2.MERGE_STRATEGY_REPLACE
    """The value replaces the field."""
    APPEND = work_item_pb2.MERGE_STRATEGY_APPEND
    """The value's elements are appended to the field's list."""
    ADD = work_item_pb2.MERGE_STRATEGY_ADD
    """The value is added to the field (a number)."""
    MAX = work_item_pb2.MERGE_STRATEGY_MAX
    """The field keeps the larger of itself and the value."""
    MIN = work_item_pb2.MERGE_STRATEGY_MIN
    """The field keeps the smaller of itself and the value."""
    UNION = work_item_pb2.MERGE_STRATEGY_UNION
    """The value's elements not yet in the field's list are appended, in order."""
    DEEP_MERGE = work_item_pb2.MERGE_STRATEGY_DEEP_MERGE
    """The value (an object) is merged into the field recursively."""
    FIXED = work_item_pb2.MERGE_STRATEGY_FIXED
    """The field keeps its first non-null value; later operations are ignored."""
    EVENT_LOG = work_item_pb2.MERGE_STRATEGY_EVENT_LOG
    """The value is appended as ``{"id": event_id, "event": value}`` once per event id."""


@dataclasses.dataclass(frozen=True)
class Operation:
    """One change to one context field, as a step reports it."""

    field: str
    strategy: Merge
    value: Any
    event_id: str = ""

    def to_proto(self) -> work_item_pb2.ContextOperation:
        """The operation as a ``floxide.v1.ContextOperation``."""
        return work_item_pb2.ContextOperation(
            field=self.field,
            strategy=self.strategy.value,
            value=codec.to_payload(self.value, where=f"context field {self.field!r}"),
            event_id=self.event_id,
        )

    @classmethod
    def from_proto(cls, message: work_item_pb2.ContextOperation) -> Operation:
        """Read a ``floxide.v1.ContextOperation``.

        Raises:
            ContextError: the strategy is unspecified or unknown.
            InvalidPayload: the value is not valid JSON.
        """
        try:
            strategy = Merge(message.strategy)
        except ValueError as exc:
            raise ContextError(
                f"context field {message.field!r}: unknown merge strategy {message.strategy}"
            ) from exc
        value = codec.from_payload(message.value, where=f"context field {message.field!r}")
        return cls(message.field, strategy, value, message.event_id)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    strategy: Merge
    initial: Any
    schema: str


class ContextSchema:
    """The declared fields of a workflow's context, and the type that views them."""

    def __init__(self, fields: Iterable[_Field], type_: Any = None) -> None:
        self._fields = {f.name: f for f in fields}
        self.type = type_

    @classmethod
    def empty(cls) -> ContextSchema:
        """A context with no fields: every operation is refused."""
        return cls(())

    @classmethod
    def from_type(cls, type_: Any) -> ContextSchema:
        """Read the fields of a context dataclass or msgspec Struct.

        Raises:
            InvalidDefinition: the type cannot be built with no arguments (every field needs a
                default), or its defaults are not JSON.
        """
        name = getattr(type_, "__name__", repr(type_))
        try:
            initial = codec.to_builtins(type_(), where=f"context {name}")
        except TypeError as exc:
            raise InvalidDefinition(f"context {name}: every field needs a default ({exc})") from exc
        if not isinstance(initial, dict):
            raise InvalidDefinition(f"context {name}: must be a dataclass or Struct")
        hints = typing.get_type_hints(type_, include_extras=True)
        fields = []
        for field_name, value in initial.items():
            hint = hints.get(field_name, codec.ANY)
            strategy = Merge.REPLACE
            if typing.get_origin(hint) is typing.Annotated:
                marks = [m for m in hint.__metadata__ if isinstance(m, Merge)]
                if len(marks) > 1:
                    raise InvalidDefinition(
                        f"context {name}: field {field_name!r} has two strategies"
                    )
                strategy = marks[0] if marks else Merge.REPLACE
                hint = typing.get_args(hint)[0]
            fields.append(_Field(field_name, strategy, value, codec.json_schema(hint)))
        return cls(fields, type_)

    @classmethod
    def from_proto(cls, fields: Iterable[workflow_pb2.ContextField]) -> ContextSchema:
        """Read the context fields of a ``WorkflowDefinition``.

        Raises:
            InvalidDefinition: a field has no name, a duplicate name or an unknown strategy.
        """
        parsed = []
        for message in fields:
            if not message.name:
                raise InvalidDefinition("context: a field has no name")
            try:
                strategy = Merge(message.strategy)
            except ValueError as exc:
                raise InvalidDefinition(
                    f"context: field {message.name!r} has no valid merge strategy"
                ) from exc
            initial = (
                codec.from_payload(message.initial, where=f"context field {message.name!r}")
                if message.HasField("initial")
                else None
            )
            parsed.append(_Field(message.name, strategy, initial, message.schema))
        names = [f.name for f in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidDefinition(f"context: duplicate fields {duplicates}")
        return cls(parsed)

    def to_proto(self) -> list[workflow_pb2.ContextField]:
        """The fields as ``floxide.v1.ContextField`` messages, in declaration order."""
        return [
            workflow_pb2.ContextField(
                name=f.name,
                strategy=f.strategy.value,
                initial=codec.to_payload(f.initial, where=f"context field {f.name!r}"),
                schema=f.schema,
            )
            for f in self._fields.values()
        ]

    @property
    def names(self) -> list[str]:
        """The declared field names, in declaration order."""
        return list(self._fields)

    def initial(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A new run's context: declared initial values, with ``overrides`` applied on top.

        Raises:
            ContextError: an override names an undeclared field.
        """
        context = {name: copy.deepcopy(f.initial) for name, f in self._fields.items()}
        for name, value in (overrides or {}).items():
            self._field(name)
            context[name] = value
        return context

    def inherit(self, parent: Mapping[str, Any]) -> dict[str, Any]:
        """A child run's context: a copy of its parent's, and this schema's other fields.

        As floxide's ``CompositeNode`` clones the outer context: every field of the parent is
        copied (a field both declare merges and validates alike, see ``Graph.validate``), one
        only the child declares starts at its initial value, and nothing the child changes
        flows back.
        """
        context = {name: copy.deepcopy(f.initial) for name, f in self._fields.items()}
        context.update(copy.deepcopy(dict(parent)))
        return context

    def strategy(self, name: str) -> Merge:
        """The declared strategy of a field.

        Raises:
            ContextError: the field is not declared.
        """
        return self._field(name).strategy

    def check(self, operation: Operation) -> None:
        """Refuse an operation on an undeclared field or with another strategy than declared.

        Raises:
            ContextError: naming the field and both strategies.
        """
        declared = self.strategy(operation.field)
        if operation.strategy is not declared:
            raise ContextError(
                f"context field {operation.field!r} is declared {declared.name}, "
                f"not {operation.strategy.name}"
            )
        if operation.strategy is Merge.EVENT_LOG and not operation.event_id:
            raise ContextError(f"context field {operation.field!r}: an event needs an id")

    def view(self, context: Mapping[str, Any]) -> Any:
        """The context as its declared type (a plain dict when no type was declared)."""
        if self.type is None:
            return copy.deepcopy(dict(context))
        return codec.convert(dict(context), self.type, where="context")

    def _field(self, name: str) -> _Field:
        try:
            return self._fields[name]
        except KeyError:
            raise ContextError(
                f"context field {name!r} is not declared (declared: {self.names})"
            ) from None


def apply(context: dict[str, Any], operations: Iterable[Operation], schema: ContextSchema) -> None:
    """Apply operations to a context in place, in order, checking each against the schema.

    Operations are checked before any is applied, so a refused batch changes nothing.

    Raises:
        ContextError: an operation is refused, or its value does not fit the field (an ``ADD`` of
            a string, say).
    """
    operations = list(operations)
    for operation in operations:
        schema.check(operation)
    staged = copy.deepcopy(context)
    for operation in operations:
        staged[operation.field] = _merge(staged.get(operation.field), operation)
    context.clear()
    context.update(staged)


def _merge(current: Any, op: Operation) -> Any:  # noqa: PLR0911 - one case per strategy
    value, where = op.value, f"context field {op.field!r} ({op.strategy.name})"
    match op.strategy:
        case Merge.REPLACE:
            return value
        case Merge.APPEND:
            return _list(current, where) + _list(value, where)
        case Merge.ADD:
            return _number(current, where, default=0) + _number(value, where, default=0)
        case Merge.MAX | Merge.MIN:
            if current is None:
                return _number(value, where, default=None)
            pick = max if op.strategy is Merge.MAX else min
            return pick(_number(current, where, None), _number(value, where, None))
        case Merge.UNION:
            merged = _list(current, where)
            for element in _list(value, where):
                if element not in merged:
                    merged.append(element)
            return merged
        case Merge.DEEP_MERGE:
            return _deep_merge(current, value)
        case Merge.FIXED:
            return value if current is None else current
        case Merge.EVENT_LOG:
            log = _list(current, where)
            if any(isinstance(e, dict) and e.get("id") == op.event_id for e in log):
                return log
            return [*log, {"id": op.event_id, "event": value}]
    raise ContextError(f"{where}: unknown strategy")  # pragma: no cover - the match is total


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ContextError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _number(value: Any, where: str, default: Any) -> Any:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContextError(f"{where}: expected a number, got {type(value).__name__}")
    return value


def _deep_merge(current: Any, value: Any) -> Any:
    if isinstance(current, dict) and isinstance(value, dict):
        merged = dict(current)
        for key, item in value.items():
            merged[key] = _deep_merge(merged.get(key), item)
        return merged
    return copy.deepcopy(value)


class NodeContext:
    """What a node sees of its run: the context as dispatched plus its own operations.

    Writes are recorded as operations and applied by the runner (or the server) together with
    the node's transition, once. Reads see the context as it was when the item was dispatched,
    with this attempt's own operations applied.

    Attributes:
        run_id: The run.
        item_id: The item being run.
        node: The node's name.
        attempt: This attempt, counting from 1.
    """

    def __init__(
        self,
        schema: ContextSchema,
        context: Mapping[str, Any],
        *,
        run_id: str,
        item_id: str,
        node: str,
        attempt: int,
        cancelled: asyncio.Event | None = None,
    ) -> None:
        self._schema = schema
        self._data = copy.deepcopy(dict(context))
        self._operations: list[Operation] = []
        self._cancelled = cancelled or asyncio.Event()
        self.run_id = run_id
        self.item_id = item_id
        self.node = node
        self.attempt = attempt

    @property
    def state(self) -> Any:
        """The context as the workflow's declared type (a dict without one). A copy."""
        return self._schema.view(self._data)

    @property
    def operations(self) -> list[Operation]:
        """The operations this attempt recorded, in order."""
        return list(self._operations)

    @property
    def cancelled(self) -> bool:
        """Whether this attempt has been asked to stop."""
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        """Return once this attempt has been asked to stop."""
        await self._cancelled.wait()

    def set(self, field: str, value: Any) -> None:
        """Replace a ``REPLACE`` field."""
        self._record(field, Merge.REPLACE, value)

    def append(self, field: str, *values: Any) -> None:
        """Append values to an ``APPEND`` field."""
        self._record(field, Merge.APPEND, list(values))

    def add(self, field: str, amount: int | float) -> None:
        """Add to an ``ADD`` field."""
        self._record(field, Merge.ADD, amount)

    def max(self, field: str, value: Any) -> None:
        """Raise a ``MAX`` field to ``value`` if it is larger."""
        self._record(field, Merge.MAX, value)

    def min(self, field: str, value: Any) -> None:
        """Lower a ``MIN`` field to ``value`` if it is smaller."""
        self._record(field, Merge.MIN, value)

    def union(self, field: str, *values: Any) -> None:
        """Add values not already in a ``UNION`` field."""
        self._record(field, Merge.UNION, list(values))

    def deep_merge(self, field: str, value: Mapping[str, Any]) -> None:
        """Merge an object into a ``DEEP_MERGE`` field."""
        self._record(field, Merge.DEEP_MERGE, dict(value))

    def fix(self, field: str, value: Any) -> None:
        """Set a ``FIXED`` field unless it already has a value."""
        self._record(field, Merge.FIXED, value)

    def log_event(self, field: str, event: Any, event_id: str | None = None) -> str:
        """Append an event to an ``EVENT_LOG`` field once per id; returns the id."""
        event_id = event_id or uuid.uuid4().hex
        self._record(field, Merge.EVENT_LOG, event, event_id)
        return event_id

    def _record(self, field: str, strategy: Merge, value: Any, event_id: str = "") -> None:
        where = f"node {self.node!r}: context field {field!r}"
        try:
            operation = Operation(field, strategy, codec.to_builtins(value, where=where), event_id)
            codec.encode(operation.value, where=where)
            apply(self._data, [operation], self._schema)
        except (ContextError, InvalidPayload) as exc:
            raise ContextError(f"node {self.node!r}: {exc}") from exc
        self._operations.append(operation)
