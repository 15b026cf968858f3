"""Bearer tokens in etcd, and each replica's copy of them, kept by a watch.

A token is a random string shown once; etcd keeps only its SHA-256, at
``/floxide/v1/tokens/{id}`` (the id: the hash's first 16 hex digits, which audit lines name).
Every replica holds every token in memory, loaded at start and kept by a watch of that prefix,
so a call is checked without a read; a revoked token stops working on each replica as soon as
its watch says so, and its open worker streams end (:meth:`Tokens.ended`).

The first admin token: the operator's (``--admin-token-file`` or ``FLOXIDE_ADMIN_TOKEN``),
stored if missing at every start; or, on a store where none was ever made, one made and printed
once, by the one replica whose guarded Txn marks the store as initialised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import secrets
import sys
import time

from floxide_grpc._names import check_name
from floxide_grpc._proto.floxide.v1 import admin_service_pb2 as pb
from floxide_grpc.errors import InvalidArgument, Unauthenticated, Unavailable
from floxide_server._proto.floxide.storage.v1 import storage_pb2
from floxide_server.store.kv import KV, Compare, Delete, Put, Txn
from floxide_server.store.records import now_ms
from floxide_server.tasks import Ready
from floxide_server.watch import RESYNC, Watches

__all__ = ["INITIALISED", "PREFIX", "Principal", "Tokens", "token_id"]

log = logging.getLogger(__name__)

PREFIX = b"/floxide/v1/tokens/"
INITIALISED = b"/floxide/v1/auth/initialised"
"""Put by the Txn that made the first admin token: no replica prints another."""
TOKEN_BYTES = 32
MIN_GIVEN = 32
"""The fewest characters of an admin token the operator gives (a guessable one is refused)."""
LOAD_WAIT = 5.0
"""Seconds a call waits for a starting replica's tokens before UNAVAILABLE."""


def token_id(token: str) -> str:
    """A token's public id: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a call comes from: a token in force, as the server knows it.

    Attributes:
        token_id: The token's id (never its secret).
        name: Its name.
        role: Its role.
        namespaces: The namespaces it may name; ``None``: every one (an admin).
        expires_ms: When it stops working (wall clock, ms); 0: never.
    """

    token_id: str
    name: str
    role: pb.Role.ValueType
    namespaces: frozenset[str] | None
    expires_ms: int = 0

    @classmethod
    def of(cls, info: pb.TokenInfo) -> Principal:
        """The principal of a stored token."""
        admin = info.role == pb.ROLE_ADMIN
        return cls(
            info.id,
            info.name,
            info.role,
            None if admin else frozenset(info.namespaces),
            info.expires_at.ToMilliseconds() if info.HasField("expires_at") else 0,
        )

    def may_name(self, namespace: str) -> bool:
        """Whether this token may act in ``namespace``."""
        return self.namespaces is None or namespace in self.namespaces

    def expired(self, now: int) -> bool:
        """Whether the token has expired at ``now`` (wall clock, ms)."""
        return bool(self.expires_ms) and now >= self.expires_ms


class Tokens:
    """The tokens in force: made, listed, revoked, and checked from memory.

    Args:
        kv: The store.
        watches: The replica's shared watches (the token prefix is one).
        admin_token: The operator's first admin token, if given.
    """

    def __init__(self, kv: KV, watches: Watches, admin_token: str | None = None) -> None:
        if admin_token is not None and len(admin_token) < MIN_GIVEN:
            raise InvalidArgument(
                f"the given admin token is shorter than {MIN_GIVEN} characters: make one with, "
                "say, `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        self.kv = kv
        self.watches = watches
        self.admin_token = admin_token
        self._by_id: dict[str, tuple[Principal, bytes]] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._changed: dict[str, int] = {}  # id -> the revision of the change last applied
        self._loaded = asyncio.Event()

    # -- the replica's copy --------------------------------------------------------------------

    async def run(self, ready: Ready[None]) -> None:
        """Make the first admin token if needed, load every token, then follow the prefix."""
        await self._bootstrap()
        subscription = await self.watches.open(PREFIX)
        try:
            await self._load()
            ready.set_result(None)
            while True:
                event = await subscription.next()
                if event is RESYNC:
                    await self._load()
                elif event.deleted:
                    id_ = event.kv.key[len(PREFIX) :].decode()
                    self._forget(id_, event.kv.mod_revision)
                else:
                    record = storage_pb2.TokenRecord.FromString(event.kv.value)
                    self._remember(record, event.kv.mod_revision)
        finally:
            subscription.close()

    async def _load(self) -> None:
        found, revision = await self.kv.range(PREFIX)
        records = {storage_pb2.TokenRecord.FromString(kv.value).info.id: kv for kv in found}
        for gone in set(self._by_id) - set(records):
            self._forget(gone, revision)
        for kv in records.values():
            self._remember(storage_pb2.TokenRecord.FromString(kv.value), kv.mod_revision)
        self._loaded.set()

    def _newer(self, id_: str, revision: int) -> bool:
        """Whether a change of ``revision`` is newer than what this copy has of the token.

        This replica's own writes are applied at once, and its watch tells of them again later:
        an older event must not undo a newer change (a revoked token seen again as made).
        """
        if revision <= self._changed.get(id_, 0):
            return False
        self._changed[id_] = revision
        return True

    def _remember(self, record: storage_pb2.TokenRecord, revision: int) -> None:
        if self._newer(record.info.id, revision):
            self._by_id[record.info.id] = (Principal.of(record.info), record.secret_sha256)

    def _forget(self, id_: str, revision: int) -> None:
        if not self._newer(id_, revision):
            return
        self._by_id.pop(id_, None)
        ended = self._ended.pop(id_, None)
        if ended is not None:
            ended.set()

    # -- checks --------------------------------------------------------------------------------

    async def check(self, token: str | None) -> Principal:
        """The principal of a bearer token.

        Raises:
            Unauthenticated: no token, or one that is wrong, expired or revoked.
        """
        if not token:
            raise Unauthenticated("no token: send 'authorization: Bearer <token>'")
        if not self._loaded.is_set():
            try:
                await asyncio.wait_for(self._loaded.wait(), LOAD_WAIT)
            except TimeoutError:
                raise Unavailable("the server has not loaded its tokens yet: retry") from None
        found = self._by_id.get(token_id(token))
        digest = hashlib.sha256(token.encode()).digest()
        if found is None or not hmac.compare_digest(found[1], digest):
            raise Unauthenticated("the token is not valid (wrong, or revoked)")
        principal = found[0]
        if principal.expired(now_ms()):
            raise Unauthenticated(f"the token {principal.token_id} has expired")
        return principal

    async def ended(self, principal: Principal) -> None:
        """Return once ``principal``'s token is revoked or expires (for streams it opened)."""
        event = self._ended.setdefault(principal.token_id, asyncio.Event())
        if principal.token_id not in self._by_id:
            event.set()
        timeout = None
        if principal.expires_ms:
            timeout = max((principal.expires_ms - now_ms()) / 1000, 0)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return

    # -- management ----------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        role: pb.Role.ValueType,
        namespaces: list[str],
        expires_ms: int = 0,
    ) -> tuple[str, pb.TokenInfo]:
        """Make a token: its secret (shown once) and what is kept of it.

        Raises:
            InvalidArgument: no role, a malformed name or namespace, no namespace for a role
                other than admin, or an expiry in the past.
        """
        if role not in pb.Role.values() or role == pb.ROLE_UNSPECIFIED:
            raise InvalidArgument("a token needs a role: reader, client, operator, worker or admin")
        if not 1 <= len(name) <= 128:
            raise InvalidArgument("a token's name is 1 to 128 characters")
        for namespace in namespaces:
            check_name("namespace", namespace)
        if role != pb.ROLE_ADMIN and not namespaces:
            raise InvalidArgument("a token other than an admin's needs at least one namespace")
        if expires_ms and expires_ms <= now_ms():
            raise InvalidArgument("the token's expiry is in the past")
        token = "fxt_" + secrets.token_urlsafe(TOKEN_BYTES)
        info = await self._put(
            token, name, role, [] if role == pb.ROLE_ADMIN else namespaces, expires_ms
        )
        return token, info

    async def infos(self) -> list[pb.TokenInfo]:
        """Every token in force, by id (read from etcd, not this replica's copy)."""
        found, _ = await self.kv.range(PREFIX)
        return [storage_pb2.TokenRecord.FromString(kv.value).info for kv in found]

    async def revoke(self, id_: str) -> bool:
        """Revoke a token; whether it was in force."""
        result = await self.kv.txn(
            Txn([Compare.exists(PREFIX + id_.encode())], [Delete(PREFIX + id_.encode())])
        )
        if result.succeeded:
            self._forget(id_, result.revision)  # at once here; elsewhere when their watch says
        return result.succeeded

    async def _put(
        self,
        token: str,
        name: str,
        role: pb.Role.ValueType,
        namespaces: list[str],
        expires_ms: int,
        *,
        guards: list[Compare] | None = None,
        more: list[Put] | None = None,
    ) -> pb.TokenInfo:
        info = pb.TokenInfo(id=token_id(token), name=name, role=role, namespaces=namespaces)
        info.created_at.FromMilliseconds(now_ms())
        if expires_ms:
            info.expires_at.FromMilliseconds(expires_ms)
        record = storage_pb2.TokenRecord(
            info=info, secret_sha256=hashlib.sha256(token.encode()).digest()
        )
        key = PREFIX + info.id.encode()
        result = await self.kv.txn(
            Txn(
                [Compare.missing(key), *(guards or [])],
                [Put(key, record.SerializeToString()), *(more or [])],
            )
        )
        if not result.succeeded:
            raise InvalidArgument("that token exists already")
        self._remember(record, result.revision)  # at once here; elsewhere when watched
        return info

    async def _bootstrap(self) -> None:
        """The first admin token: the operator's, stored if missing; or one printed once."""
        marker = Put(INITIALISED, str(time.time_ns() // 1_000_000).encode())
        if self.admin_token:
            key = PREFIX + token_id(self.admin_token).encode()
            if await self.kv.get(key) is None:
                try:
                    await self._put(
                        self.admin_token,
                        "admin (given at start)",
                        pb.ROLE_ADMIN,
                        [],
                        0,
                        more=[marker],
                    )
                    log.info("stored the given admin token %s", token_id(self.admin_token))
                except InvalidArgument:
                    pass  # another replica stored it meanwhile
            return
        if await self.kv.get(INITIALISED) is not None:
            return
        token = "fxt_" + secrets.token_urlsafe(TOKEN_BYTES)
        try:
            await self._put(
                token, "admin (first start)", pb.ROLE_ADMIN, [], 0,
                guards=[Compare.missing(INITIALISED)], more=[marker],
            )  # fmt: skip
        except InvalidArgument:
            return  # another replica made the first one
        # Printed, not logged: shown once to whoever started the server, kept in no log store.
        print(
            f"floxide-server: the first admin token (shown once, keep it): {token}\n"
            f"  export FLOXIDE_TOKEN={token}",
            file=sys.stderr,
            flush=True,
        )
