"""Retry policies: how many attempts, how long to wait between them, which errors qualify.

The same arithmetic serves the local runner (which waits in-process) and the server (which turns
the wait into a durable timer in etcd). Unlike floxide's fixed jitter, jitter here is random full
jitter: the wait is drawn uniformly from ``[0, backoff]``, which spreads retries of many items
that failed together (the AWS architecture blog's "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable
from datetime import timedelta

from google.protobuf import duration_pb2

from floxide_grpc._proto.floxide.v1 import workflow_pb2
from floxide_grpc.errors import InvalidDefinition
from floxide_grpc.transition import ErrorKind

__all__ = ["Backoff", "RetryPolicy"]

_LONGEST_WAIT = 365 * 24 * 3600.0
"""Waits are capped at a year, so that an uncapped exponential policy never overflows."""


class Backoff(enum.Enum):
    """How the wait grows from one attempt to the next."""

    FIXED = workflow_pb2.BACKOFF_STRATEGY_FIXED
    LINEAR = workflow_pb2.BACKOFF_STRATEGY_LINEAR
    EXPONENTIAL = workflow_pb2.BACKOFF_STRATEGY_EXPONENTIAL


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a node's failed attempts are retried.

    Attributes:
        max_attempts: The most attempts in all, the first included (1 means no retry).
        initial_backoff: The base wait before a retry.
        max_backoff: The cap on the wait; ``None`` means no cap.
        backoff: How the wait grows: after attempt ``n``, FIXED waits ``initial``, LINEAR
            ``initial * n``, EXPONENTIAL ``initial * 2**(n-1)``.
        jitter: Draw the wait uniformly from ``[0, capped wait]``.
        retry_on: The :class:`ErrorKind` names retried; empty retries every kind.
    """

    max_attempts: int = 3
    initial_backoff: timedelta = timedelta(seconds=1)
    max_backoff: timedelta | None = timedelta(seconds=60)
    backoff: Backoff = Backoff.EXPONENTIAL
    jitter: bool = True
    retry_on: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidDefinition(
                f"retry policy: max_attempts must be >= 1, not {self.max_attempts}"
            )
        if self.initial_backoff < timedelta(0):
            raise InvalidDefinition("retry policy: initial_backoff must not be negative")
        if self.max_backoff is not None and self.max_backoff < timedelta(0):
            raise InvalidDefinition("retry policy: max_backoff must not be negative")
        unknown = set(self.retry_on) - set(ErrorKind.ALL)
        if unknown:
            raise InvalidDefinition(f"retry policy: unknown error kinds {sorted(unknown)}")
        object.__setattr__(self, "retry_on", frozenset(self.retry_on))

    def backoff_for(self, attempt: int, rand: Callable[[], float] = random.random) -> timedelta:
        """The wait after failed attempt ``attempt`` (1-based), capped, then jittered."""
        n = max(attempt, 1)
        factor = {Backoff.FIXED: 1.0, Backoff.LINEAR: float(n)}.get(
            self.backoff, 2.0 ** min(n - 1, 1023)
        )
        seconds = min(self.initial_backoff.total_seconds() * factor, _LONGEST_WAIT)
        if self.max_backoff is not None:
            seconds = min(seconds, self.max_backoff.total_seconds())
        if self.jitter:
            seconds *= rand()
        return timedelta(seconds=seconds)

    def should_retry(self, kind: str, attempt: int, *, non_retryable: bool = False) -> bool:
        """Whether failed attempt ``attempt`` (1-based) of error kind ``kind`` gets another try."""
        if non_retryable or attempt >= self.max_attempts:
            return False
        return not self.retry_on or kind in self.retry_on

    def to_proto(self) -> workflow_pb2.RetryPolicy:
        """The policy as a ``floxide.v1.RetryPolicy``."""
        message = workflow_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            strategy=self.backoff.value,
            jitter=self.jitter,
            retry_on=[ErrorKind.to_proto(k) for k in sorted(self.retry_on)],
        )
        message.initial_backoff.FromTimedelta(self.initial_backoff)
        if self.max_backoff is not None:
            message.max_backoff.FromTimedelta(self.max_backoff)
        return message

    @classmethod
    def from_proto(cls, message: workflow_pb2.RetryPolicy) -> RetryPolicy:
        """Read a ``floxide.v1.RetryPolicy``.

        Raises:
            InvalidDefinition: the strategy or an error kind is unspecified or unknown.
        """
        try:
            backoff = Backoff(message.strategy)
            kinds = frozenset(ErrorKind.from_proto(k) for k in message.retry_on)
        except ValueError as exc:
            raise InvalidDefinition(f"retry policy: {exc}") from exc
        return cls(
            max_attempts=max(message.max_attempts, 1),
            initial_backoff=_duration(message.initial_backoff),
            max_backoff=(
                _duration(message.max_backoff) if message.HasField("max_backoff") else None
            ),
            backoff=backoff,
            jitter=message.jitter,
            retry_on=kinds,
        )


def _duration(value: duration_pb2.Duration) -> timedelta:
    return value.ToTimedelta()
