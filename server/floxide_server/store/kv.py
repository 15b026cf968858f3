"""The transactional key-value interface the stores are written against, and an in-memory one.

It is etcd's data model, reduced to what the stores use: keys with create/mod revisions and a
version, leases, guarded transactions (nested ones included, etcd's ``RequestOp.request_txn``),
prefix ranges and prefix watches from a revision. :class:`floxide_server.etcd.EtcdKV` implements
it on a real cluster; :class:`MemoryKV` implements the same semantics in one process, so the
store logic is written once and one behaviour suite runs against both.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import enum
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, TypeAlias

__all__ = [
    "KV",
    "Compacted",
    "Compare",
    "Delete",
    "Event",
    "Get",
    "KVUnavailable",
    "KeyValue",
    "MemoryKV",
    "Put",
    "Request",
    "Txn",
    "TxnResult",
    "prefix_end",
]


MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``, which MemoryKV enforces too."""


class KVUnavailable(Exception):
    """Raised when the store cannot be reached (every endpoint failed, or a deadline passed)."""


class Compacted(Exception):
    """Raised by a watch whose start revision was compacted: re-read, then watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


@dataclasses.dataclass(frozen=True, slots=True)
class KeyValue:
    """A key with its value and etcd's bookkeeping."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class Target(enum.Enum):
    """What a comparison looks at."""

    VERSION = "version"
    CREATE = "create"
    MOD = "mod"
    VALUE = "value"


class Op(enum.Enum):
    """How a comparison compares."""

    EQUAL = "=="
    NOT_EQUAL = "!="
    GREATER = ">"
    LESS = "<"


@dataclasses.dataclass(frozen=True, slots=True)
class Compare:
    """One guard of a transaction. A missing key has version, create and mod revision 0.

    With ``range_end``, it holds for every key in ``[key, range_end)`` (etcd's range compare);
    an empty range compares as one missing key (so "version == 0" says the range is empty).
    """

    key: bytes
    target: Target
    op: Op
    value: int | bytes
    range_end: bytes = b""

    @classmethod
    def missing(cls, key: bytes) -> Compare:
        """The key does not exist."""
        return cls(key, Target.VERSION, Op.EQUAL, 0)

    @classmethod
    def none_in(cls, start: bytes, end: bytes) -> Compare:
        """No key exists in ``[start, end)``."""
        return cls(start, Target.VERSION, Op.EQUAL, 0, end)

    @classmethod
    def exists(cls, key: bytes) -> Compare:
        """The key exists."""
        return cls(key, Target.VERSION, Op.GREATER, 0)

    @classmethod
    def value_is(cls, key: bytes, value: bytes) -> Compare:
        """The key holds this value."""
        return cls(key, Target.VALUE, Op.EQUAL, value)

    @classmethod
    def created_at(cls, key: bytes, revision: int) -> Compare:
        """The key was created at this revision (and so was not deleted and made again)."""
        return cls(key, Target.CREATE, Op.EQUAL, revision)

    @classmethod
    def modified_at(cls, key: bytes, revision: int) -> Compare:
        """The key was last written at this revision (0: it does not exist)."""
        return cls(key, Target.MOD, Op.EQUAL, revision)

    def holds(self, kv: KeyValue | None) -> bool:
        """Evaluate against the key's current state."""
        actual: int | bytes
        if self.target is Target.VALUE:
            if kv is None:
                return False  # etcd: a value comparison on a missing key fails
            actual = kv.value
        elif kv is None:
            actual = 0
        else:
            actual = {
                Target.VERSION: kv.version,
                Target.CREATE: kv.create_revision,
                Target.MOD: kv.mod_revision,
            }[self.target]
        match self.op:
            case Op.EQUAL:
                return actual == self.value
            case Op.NOT_EQUAL:
                return actual != self.value
            case Op.GREATER:
                return actual > self.value  # type: ignore[operator]
            case Op.LESS:
                return actual < self.value  # type: ignore[operator]
        return False  # pragma: no cover


@dataclasses.dataclass(frozen=True, slots=True)
class Put:
    """Write a key, attached to a lease when ``lease`` is not 0."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Delete:
    """Delete a key, or every key under it with ``prefix``.

    A ``name`` makes its response (the count deleted) readable by name (:meth:`Txn.named`).
    """

    key: bytes
    prefix: bool = False
    name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Get:
    """Read a key, or every key under it with ``prefix`` (in key order).

    A ``name`` makes its response (the key-values found) readable by name (:meth:`Txn.named`).
    """

    key: bytes
    prefix: bool = False
    name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Txn:
    """If every compare holds, run ``success``, else ``failure``; atomically.

    A ``name`` makes a nested Txn's result readable by name in its parent (:meth:`named`).
    """

    compares: Sequence[Compare]
    success: Sequence[Request]
    failure: Sequence[Request] = ()
    name: str = ""

    def named(self, result: TxnResult) -> dict[str, object]:
        """The responses of this Txn's named requests, by name, in the branch that ran.

        Results are read by name, never by position, so that adding a request to a Txn cannot
        silently shift what its reader finds. Empty when the reply was lost and recovered.
        """
        if result.responses is None:
            return {}
        branch = self.success if result.succeeded else self.failure
        return {
            request.name: response
            for request, response in zip(branch, result.responses, strict=True)
            if not isinstance(request, Put) and request.name
        }


Request: TypeAlias = Put | Delete | Get | Txn


@dataclasses.dataclass
class TxnResult:
    """The outcome of a transaction.

    Attributes:
        succeeded: Whether the compares held (the success branch ran).
        revision: The store's revision after the transaction.
        responses: One per request of the branch that ran: ``None`` for a put, the count
            deleted, the key-values got, or a nested :class:`TxnResult`. ``None`` as a whole
            when the reply was lost and the outcome was recovered from the transaction's token.
    """

    succeeded: bool
    revision: int
    responses: list[object] | None


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch: a put (``kv`` as written) or a delete (``kv.value`` empty)."""

    deleted: bool
    kv: KeyValue


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class KV(Protocol):
    """A transactional key-value store with leases and watches (etcd's model)."""

    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or ``None``."""

    async def range(
        self, prefix: bytes, *, start: bytes | None = None, limit: int = 0, reverse: bool = False
    ) -> tuple[list[KeyValue], int]:
        """Keys under ``prefix`` in key order (from ``start``, at most ``limit``); the revision."""

    async def count(self, prefix: bytes) -> int:
        """How many keys are under ``prefix`` (counted by the store: no key is sent)."""

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a guarded transaction atomically."""

    async def grant(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` seconds; returns its id."""

    async def keep_alive(self, lease: int) -> int:
        """Renew a lease to its full TTL; returns the TTL, or 0 when the lease is gone."""

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys. Idempotent."""

    async def time_to_live(self, lease: int) -> int | None:
        """The whole seconds left of a lease (rounded down), as the store's leader times them.

        ``None`` when the lease no longer exists (ended, revoked, or never granted).
        """

    def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[Event]:
        """Every change under ``prefix`` from ``start_revision`` on, in revision order.

        Raises:
            Compacted: ``start_revision`` is older than the store keeps.
        """

    async def ping(self) -> None:
        """Return when the store answers; raise :class:`KVUnavailable` when it does not."""

    async def close(self) -> None:
        """Release connections and background tasks. Idempotent."""


class MemoryKV:
    """The KV model in one process: for tests and for running without etcd.

    Revisions, versions, compares, nested transactions, leases that expire on the event loop's
    clock and watches from any past revision behave as etcd's do.
    """

    def __init__(self) -> None:
        self._data: dict[bytes, KeyValue] = {}
        self._keys: list[bytes] = []  # sorted
        self._revision = 1
        self._log: list[tuple[int, Event]] = []
        self._watchers: list[tuple[bytes, asyncio.Queue[Event]]] = []
        self._leases: dict[int, tuple[int, float, set[bytes]]] = {}  # ttl, deadline, keys
        self._lease_ids = itertools.count(0x1000)
        self._timer: asyncio.TimerHandle | None = None

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or ``None``."""
        self._expire()
        return self._data.get(key)

    async def range(
        self, prefix: bytes, *, start: bytes | None = None, limit: int = 0, reverse: bool = False
    ) -> tuple[list[KeyValue], int]:
        """Keys under ``prefix`` in key order (descending with ``reverse``)."""
        self._expire()
        keys = self._under(prefix)
        if reverse:
            keys.reverse()
            if start is not None:
                keys = [k for k in keys if k <= start]
        elif start is not None:
            keys = [k for k in keys if k >= start]
        if limit:
            keys = keys[:limit]
        return [self._data[k] for k in keys], self._revision

    async def count(self, prefix: bytes) -> int:
        """How many keys are under ``prefix``."""
        self._expire()
        return len(self._under(prefix))

    def _under(self, prefix: bytes) -> list[bytes]:
        low = bisect.bisect_left(self._keys, prefix)
        high = bisect.bisect_left(self._keys, prefix_end(prefix))
        return self._keys[low:high]

    # -- writes ----------------------------------------------------------------------------

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a guarded transaction atomically (one revision for all its writes)."""
        self._expire()
        events: list[Event] = []
        revision = self._revision + 1
        self._check_txn(txn, set())
        result = self._run(txn, revision, events)
        if events:
            self._revision = revision
            self._publish(events)
        result.revision = self._revision
        return result

    def _check_txn(self, txn: Txn, written: set[bytes]) -> None:
        """Etcd refuses a transaction whose branches write one key twice, or that is too big."""
        if max(len(txn.compares), len(txn.success), len(txn.failure)) > MAX_TXN_OPS:
            raise ValueError("too many operations in txn request")
        for branch in (txn.success, txn.failure):
            seen = set(written)
            for request in branch:
                if isinstance(request, Put):
                    if request.key in seen:
                        raise ValueError(f"duplicate key given in txn request: {request.key!r}")
                    seen.add(request.key)
                elif isinstance(request, Txn):
                    self._check_txn(request, seen)

    def _run(self, txn: Txn, revision: int, events: list[Event]) -> TxnResult:
        succeeded = all(self._holds(c) for c in txn.compares)
        responses: list[object] = []
        for request in txn.success if succeeded else txn.failure:
            if isinstance(request, Put):
                self._put(request, revision, events)
                responses.append(None)
            elif isinstance(request, Delete):
                keys = self._under(request.key) if request.prefix else [request.key]
                responses.append(sum(self._delete(k, revision, events) for k in keys))
            elif isinstance(request, Get):
                keys = self._under(request.key) if request.prefix else [request.key]
                responses.append([self._data[k] for k in keys if k in self._data])
            else:
                responses.append(self._run(request, revision, events))
        return TxnResult(succeeded, revision, responses)

    def _holds(self, compare: Compare) -> bool:
        if not compare.range_end:
            return compare.holds(self._data.get(compare.key))
        low = bisect.bisect_left(self._keys, compare.key)
        high = bisect.bisect_left(self._keys, compare.range_end)
        found = [self._data[k] for k in self._keys[low:high]]
        return all(compare.holds(kv) for kv in found) if found else compare.holds(None)

    def _put(self, request: Put, revision: int, events: list[Event]) -> None:
        if request.lease and request.lease not in self._leases:
            raise ValueError(f"requested lease not found: {request.lease:x}")
        old = self._data.get(request.key)
        if old is None:
            bisect.insort(self._keys, request.key)
            kv = KeyValue(request.key, request.value, revision, revision, 1, request.lease)
        else:
            kv = KeyValue(
                request.key,
                request.value,
                old.create_revision,
                revision,
                old.version + 1,
                request.lease,
            )
            if old.lease and old.lease in self._leases:
                self._leases[old.lease][2].discard(request.key)
        if request.lease:
            self._leases[request.lease][2].add(request.key)
        self._data[request.key] = kv
        events.append(Event(False, kv))

    def _delete(self, key: bytes, revision: int, events: list[Event]) -> int:
        old = self._data.pop(key, None)
        if old is None:
            return 0
        self._keys.remove(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease][2].discard(key)
        events.append(Event(True, KeyValue(key, b"", 0, revision, 0)))
        return 1

    # -- leases ----------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """Grant a lease that ends ``ttl`` seconds after its last renewal."""
        lease = next(self._lease_ids)
        self._leases[lease] = (ttl, asyncio.get_running_loop().time() + ttl, set())
        self._schedule()
        return lease

    async def keep_alive(self, lease: int) -> int:
        """Renew a lease; 0 when it has already ended."""
        self._expire()
        if lease not in self._leases:
            return 0
        ttl, _, keys = self._leases[lease]
        self._leases[lease] = (ttl, asyncio.get_running_loop().time() + ttl, keys)
        return ttl

    async def revoke(self, lease: int) -> None:
        """End a lease now; its keys are deleted in one revision."""
        self._end(lease)

    async def time_to_live(self, lease: int) -> int | None:
        """Whole seconds left of a lease on the event loop's clock, rounded down as etcd does."""
        self._expire()
        entry = self._leases.get(lease)
        if entry is None:
            return None
        return max(int(entry[1] - asyncio.get_running_loop().time()), 0)

    def _end(self, lease: int) -> None:
        entry = self._leases.pop(lease, None)
        if entry is None or not entry[2]:
            return
        revision = self._revision + 1
        events: list[Event] = []
        for key in sorted(entry[2]):
            self._delete(key, revision, events)
        self._revision = revision
        self._publish(events)

    def _expire(self) -> None:
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return
        for lease, (_, deadline, _) in list(self._leases.items()):
            if deadline <= now:
                self._end(lease)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._leases:
            loop = asyncio.get_running_loop()
            deadline = min(d for _, d, _ in self._leases.values())
            self._timer = loop.call_at(deadline, self._expire)

    # -- watches ---------------------------------------------------------------------------

    def _publish(self, events: list[Event]) -> None:
        for event in events:
            self._log.append((event.kv.mod_revision, event))
            for prefix, queue in self._watchers:
                if event.kv.key.startswith(prefix):
                    queue.put_nowait(event)

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[Event]:
        """Past events from ``start_revision``, then live ones, until the caller stops."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        for revision, event in self._log:
            if revision >= start_revision and event.kv.key.startswith(prefix):
                queue.put_nowait(event)
        entry = (prefix, queue)
        self._watchers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(entry)

    async def ping(self) -> None:
        """Always answers."""

    async def close(self) -> None:
        """Stop the lease timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
