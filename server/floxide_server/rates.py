"""Per-token rates and counts on one replica: starts per second, and open worker streams.

Kept in this replica's memory, not in etcd: a token used through several replicas gets each
replica's allowance (docs/protocol.md says so). A start over the rate, or a stream over the
count, is refused RESOURCE_EXHAUSTED before anything is written.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from floxide_grpc.errors import ResourceExhausted

__all__ = ["Buckets", "Counts"]


class Buckets:
    """A token bucket per key: ``rate`` per second, up to a second's worth at once (at least 1)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._level: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str, what: str) -> None:
        """Take one from ``key``'s bucket.

        Raises:
            ResourceExhausted: the bucket is empty (``what`` names the limit).
        """
        if self.rate <= 0:
            return
        now = self.clock()
        most = max(self.rate, 1.0)
        tokens, when = self._level.get(key, (most, now))
        tokens = min(most, tokens + (now - when) * self.rate)
        if tokens < 1:
            self._level[key] = (tokens, now)
            raise ResourceExhausted(f"{what} is over its limit of {self.rate:g} per second")
        self._level[key] = (tokens - 1, now)


class Counts:
    """How many of something each key holds open, up to ``most`` (0: no limit)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._open: collections.Counter[str] = collections.Counter()

    def open(self, key: str, what: str) -> None:
        """Count one more for ``key``.

        Raises:
            ResourceExhausted: ``key`` has ``most`` open (``what`` names the limit).
        """
        if self.most and self._open[key] >= self.most:
            raise ResourceExhausted(f"{what} has {self.most} open, its limit")
        self._open[key] += 1

    def close(self, key: str) -> None:
        """Count one fewer for ``key``."""
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
