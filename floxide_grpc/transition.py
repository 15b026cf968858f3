"""Transitions: a node's outcome, deciding where the workflow goes next.

A node returns one of :class:`Next`, :class:`NextAll`, :class:`Hold` or :class:`Abort`; a plain
return value means ``Next(value)``. On the wire each is one case of the ``Transition`` oneof.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Generic, TypeAlias, TypeVar

from floxide_grpc._proto.floxide.v1 import work_item_pb2

__all__ = ["Abort", "ErrorKind", "Hold", "Next", "NextAll", "Transition"]

T = TypeVar("T")


class ErrorKind:
    """Names of ``floxide.v1.ErrorKind`` values, for :class:`Abort` and retry filters."""

    GENERIC = "GENERIC"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    INVALID_INPUT = "INVALID_INPUT"
    INVALID_OUTPUT = "INVALID_OUTPUT"
    STUCK = "STUCK"
    """A run's error only (no work left, no terminal reached): never an attempt's."""

    ALL = (GENERIC, TIMEOUT, CANCELLED, WORKER_LOST, INVALID_INPUT, INVALID_OUTPUT)
    """The kinds an attempt can fail with (and a retry policy filter by)."""

    @staticmethod
    def to_proto(kind: str) -> work_item_pb2.ErrorKind.ValueType:
        """The proto enum value of a kind name."""
        return work_item_pb2.ErrorKind.Value(f"ERROR_KIND_{kind}")

    @staticmethod
    def from_proto(value: int) -> str:
        """The kind name of a proto enum value.

        Raises:
            ValueError: the value is not a known kind.
        """
        name = work_item_pb2.ErrorKind.Name(value)  # type: ignore[arg-type]
        if name == "ERROR_KIND_UNSPECIFIED":
            return ErrorKind.GENERIC
        return name.removeprefix("ERROR_KIND_")


@dataclasses.dataclass(frozen=True)
class Next(Generic[T]):
    """Continue to the node's successors with ``output``.

    Attributes:
        output: The value every successor receives.
        route: Selects the routed edges with this label; ``None`` follows the direct edges (or,
            for a node routed by variant, the edge of the output's class).
    """

    output: T
    route: str | None = None


@dataclasses.dataclass(frozen=True)
class NextAll(Generic[T]):
    """Fan out: one item per output and successor, all in one new group.

    An empty list fires the successors' join with ``[]``.
    """

    outputs: Sequence[T]


@dataclasses.dataclass(frozen=True)
class Hold:
    """End this branch without output; inside a fan-out it counts as an arrival with no value."""


@dataclasses.dataclass(frozen=True)
class Abort:
    """Fail this attempt on purpose.

    Retried by the node's retry policy, then routed to its fallback edge with the item's
    original input; without a fallback the run fails.

    Attributes:
        message: Why, for people.
        kind: An :class:`ErrorKind` name, for retry filters.
        non_retryable: Skip the retry policy: retrying cannot help.
    """

    message: str
    kind: str = ErrorKind.GENERIC
    non_retryable: bool = False


Transition: TypeAlias = Next[T] | NextAll[T] | Hold | Abort
"""Any of the four outcomes of a node whose output type is ``T``."""
