"""etcd behind the store's :class:`~floxide_server.store.kv.KV` interface.

The only module that talks to etcd.
It uses the etcd API bindings that ``aetcd`` ships (``aetcd.rpc``: etcd's own protos, generated)
and calls the stubs directly, because each asyncio client falls short where we need it: aetcd's
watches die when etcd restarts and it takes one endpoint; etcd3aio retries every RPC on timeout,
transactions included; neither builds nested transactions. This module owns:

- **failover** across ``--etcd a,b,c``: one channel per endpoint, the next one on UNAVAILABLE;
- **transactions that apply once** although their reply may be lost. Each is wrapped as
  ``if token missing: (the transaction, writing token=branch) else: get token``, under a unique
  token key. A lost reply is retried with the same token on any endpoint: if the first attempt
  was applied, the retry reads which branch ran instead of applying it again; so a lost reply
  never becomes a double effect or a false "claim lost". **An outcome stays unknown until it is
  known**: a transaction sent is retried through its token for as long as etcd does not answer
  (never reported as not applied), so nothing treats an applied claim as not made. Tokens are on
  no lease (a lease could end during a long silence and take the token with it): each is
  deleted once its outcome is read, with the next request, and any left behind by a process
  that died are swept a day after they were made (:data:`TOKEN_SWEEP_AFTER`);
- **group commit** (:mod:`floxide_server.group_commit`): transactions that arrive while one is
  in flight go together in the next request, each a sub-transaction with its own token;
- **watches that survive** a restart or a failover: they resume from the last revision + 1, and
  raise :class:`~floxide_server.store.kv.Compacted` when that revision is gone;
- **leases** (grant, keep-alive over one stream, revoke, and the time left as etcd's leader
  times it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from floxide_grpc.errors import FloxideError
from floxide_grpc.tls import Tls, open_channel
from floxide_server.group_commit import GroupCommit
from floxide_server.store.kv import (
    Compacted,
    Compare,
    Delete,
    Event,
    Get,
    KeyValue,
    KVUnavailable,
    Op,
    Put,
    Request,
    Target,
    Txn,
    TxnResult,
    prefix_end,
)
from floxide_server.tasks import Background

__all__ = ["EtcdKV", "crash_safe"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_PREFIX = b"/floxide/v1/txn/"
"""Where transaction tokens live: ``txn/{made_ms:013d}-{uuid}``, oldest first."""
TOKEN_SWEEP_AFTER = 86_400.0
"""Seconds after which a token is swept: longer than any unknown outcome lasts."""
TOKEN_SWEEP_EVERY = 3_600.0
"""Seconds between sweeps of old tokens."""
UNKNOWN_TOLD_EVERY = 10.0
"""Seconds between the warnings that an outcome is still unknown."""
MAX_REQUEST_OPS = 128
"""etcd's default ``--max-txn-ops``: spent tokens' deletes ride along within it."""
LEADER = (("hasleader", "true"),)
"""Sent with every call: a member that has lost its leader (cut from the others) refuses it at
once with UNAVAILABLE, and ends a watch it serves, instead of holding it: a partitioned member
answers nothing that needs its leader, and a watch on it would see no event again."""
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,  # "leader changed", "raft: stopped"
    grpc.StatusCode.INTERNAL,  # a cut connection ("RST_STREAM", "Stream removed")
}
_TARGETS = {
    Target.VERSION: rpc.Compare.VERSION,
    Target.CREATE: rpc.Compare.CREATE,
    Target.MOD: rpc.Compare.MOD,
    Target.VALUE: rpc.Compare.VALUE,
}
_FIELDS = {
    Target.VERSION: "version",
    Target.CREATE: "create_revision",
    Target.MOD: "mod_revision",
    Target.VALUE: "value",
}
_OPS = {
    Op.EQUAL: rpc.Compare.EQUAL,
    Op.NOT_EQUAL: rpc.Compare.NOT_EQUAL,
    Op.GREATER: rpc.Compare.GREATER,
    Op.LESS: rpc.Compare.LESS,
}


def _kv(message: Any) -> KeyValue:
    return KeyValue(
        message.key,
        message.value,
        message.create_revision,
        message.mod_revision,
        message.version,
        message.lease,
    )


def _token_refused(exc: grpc.aio.AioRpcError) -> bool:
    """Whether etcd refused the call's token (expired, from before a restart, or outdated).

    The call was not applied: etcd checks a token before it proposes the request.
    """
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED or _refusal(exc.details() or "")


def _refusal(text: str) -> bool:
    """Whether etcd's message (an error's, or a canceled watch's reason) refuses a token."""
    return (
        "invalid auth token" in text
        or "revision of auth store is old" in text  # users or roles changed since
    )


def crash_safe(version: str) -> bool:
    """Whether an etcd version keeps every applied write when a member crashes.

    etcd 3.5.0 to 3.5.2 do not: a member killed under load could skip applied entries after its
    restart and serve a state that differs from the others' (etcd's "v3.5 data inconsistency"
    postmortem; fixed in 3.5.3). Runs read from such a member stall or repeat steps.
    """
    parts = version.split(".")
    try:
        major, minor, patch = (int(p) for p in parts[:3])
    except ValueError:
        return True  # not a version we know to be affected
    return not (major == 3 and minor == 5 and patch < 3)


class EtcdKV:
    """A :class:`KV` on an etcd cluster.

    Args:
        endpoints: ``host:port`` of each member to use, tried in turn.
        timeout: The deadline of one RPC, in seconds.
        retry_for: How long an operation keeps trying other endpoints before it raises
            :class:`KVUnavailable`.
        tls: TLS to etcd (its CA; a client certificate for a cluster that requires one).
        auth: etcd's user and password, for a cluster with auth enabled.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        retry_for: float = 10.0,
        tls: Tls | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.retry_for = retry_for
        self.tls = tls
        self.auth = auth
        self._metadata: tuple[tuple[str, str], ...] = LEADER
        self._auth_token: str | None = None  # the token sent with every call, with auth
        self._authenticating: asyncio.Task[None] | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._current = 0
        self._spent: list[bytes] = []  # tokens whose outcome is read: deleted with the next request
        self._background = Background("etcd token sweep")
        self._sweeping = False
        self._closed = False
        self.group_commit = GroupCommit(self._commit)

    # -- connections ---------------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        endpoint = self.endpoints[self._current % len(self.endpoints)]
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = open_channel(
                endpoint,
                self.tls,
                [
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.keepalive_time_ms", 10_000),
                    ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1_000),
                ],
            )
            self._channels[endpoint] = channel
        return channel

    def _fail_over(self, channel: grpc.aio.Channel, *, wedged: bool = False) -> None:
        """Move off the endpoint ``channel`` is to, and drop that connection if ``wedged``.

        Calls that fail together on one member move off it once: they must not rotate back
        to it.

        A connection that lost replies (a silent network, a proxy dropping packets) can stay
        wedged until keepalive gives up on it, long after etcd answers again: an RPC past its
        deadline drops the channel it used (if no other call dropped it already), and the next
        call connects afresh.
        """
        endpoint = next((e for e, c in self._channels.items() if c is channel), None)
        if endpoint is None:
            return  # dropped already, by a call that moved on
        if wedged:
            del self._channels[endpoint]
            if not self._closed:  # its calls end by their deadlines first
                self._background.spawn(channel.close(grace=self.timeout))
        if endpoint == self.endpoints[self._current % len(self.endpoints)]:
            self._current += 1

    async def _call(
        self,
        make: Callable[[grpc.aio.Channel], Coroutine[Any, Any, T]],
        *,
        authenticated: bool = True,
    ) -> T:
        """Call on the current endpoint, moving to the next on a retryable failure.

        With :attr:`auth`, a token is got first, and again when etcd refuses it.
        """
        if authenticated:
            await self._token()
        deadline = time.monotonic() + self.retry_for
        pause = 0.05
        renewed = False  # a token got again for this call: refused again, the call fails
        while True:
            channel = self._channel()
            sent = self._auth_token
            try:
                return await make(channel)
            except asyncio.CancelledError:
                if not _closed_under(self):
                    raise  # this call was cancelled
                self._fail_over(channel)  # closed under it (a wedged one, dropped)
            except grpc.aio.AioRpcError as exc:
                if self._closed:
                    raise KVUnavailable(f"closed: {exc.details()}") from exc
                if _token_refused(exc) and self.auth is not None and authenticated and not renewed:
                    await self.authenticate(refused=sent)  # expired: a new one, the call again
                    renewed = True
                    continue
                if exc.code() not in _RETRYABLE:
                    raise
                past = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                self._fail_over(channel, wedged=past)
                if time.monotonic() + pause > deadline:
                    raise KVUnavailable(
                        f"etcd unreachable at {self.endpoints}: {exc.details()}"
                    ) from exc
                log.debug("etcd call failed on %s: %s", self.endpoints, exc.details())
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        """The key, or ``None`` (a linearizable read)."""
        response = await self._call(
            lambda ch: rpc.KVStub(ch).Range(
                rpc.RangeRequest(key=key), timeout=self.timeout, metadata=self._metadata
            )
        )
        return _kv(response.kvs[0]) if response.kvs else None

    async def range(
        self, prefix: bytes, *, start: bytes | None = None, limit: int = 0, reverse: bool = False
    ) -> tuple[list[KeyValue], int]:
        """Keys under ``prefix`` in key order (descending with ``reverse``), and the revision."""
        end = prefix_end(prefix)
        if reverse:
            key, range_end = prefix, (start + b"\0" if start is not None else end)
            order = rpc.RangeRequest.DESCEND
        else:
            key, range_end = (start if start is not None else prefix), end
            order = rpc.RangeRequest.ASCEND
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end,
            limit=limit,
            sort_order=order,
            sort_target=rpc.RangeRequest.KEY,
        )
        response = await self._call(
            lambda ch: rpc.KVStub(ch).Range(request, timeout=self.timeout, metadata=self._metadata)
        )
        return [_kv(kv) for kv in response.kvs], response.header.revision

    async def count(self, prefix: bytes) -> int:
        """How many keys are under ``prefix`` (a count-only range: etcd sends no key)."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True)
        response = await self._call(
            lambda ch: rpc.KVStub(ch).Range(request, timeout=self.timeout, metadata=self._metadata)
        )
        return int(response.count)

    # -- transactions --------------------------------------------------------------------------

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a guarded transaction exactly once, even when its reply is lost.

        Transactions submitted while another is in flight are committed together (group
        commit), each as a sub-transaction with its own guards and its own token.
        """
        return await self.group_commit.submit(txn)

    async def _commit(self, txns: Sequence[Txn]) -> list[TxnResult | BaseException]:
        """Apply transactions in one request, each wrapped with its token; until known.

        Once sent, a request is retried through its tokens for as long as etcd does not answer:
        its outcome is unknown, never "not applied", until a reply says which branch ran.
        """
        if not self._sweeping:
            self._sweeping = True
            self._background.spawn(self._sweep_tokens())
        made = f"{time.time_ns() // 1_000_000:013d}"
        tokens = [TOKEN_PREFIX + f"{made}-{uuid.uuid4().hex}".encode() for _ in txns]
        wrapped = [_wrapped(txn, token) for txn, token in zip(txns, tokens, strict=True)]
        # etcd grants a nested Txn what its parents leave of --max-txn-ops: deletes fit beside.
        room = MAX_REQUEST_OPS - len(wrapped) - max(_need(w) for w in wrapped)
        spent, self._spent = self._spent[: max(room, 0)], self._spent[max(room, 0) :]
        if len(wrapped) == 1 and not spent:
            request = wrapped[0]
        else:
            deletes = [
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=t)) for t in spent
            ]
            request = rpc.TxnRequest(
                success=[rpc.RequestOp(request_txn=w) for w in wrapped] + deletes
            )
        try:
            response = await self._until_known(request, len(txns))
        except grpc.aio.AioRpcError as exc:  # etcd answered: not applied
            self._spent.extend(spent)
            details = exc.details() or ""
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                return [exc] * len(txns)
            if len(txns) > 1:  # one of them is at fault: each alone, to tell which
                return [(await self._commit([txn]))[0] for txn in txns]
            return [ValueError(details.removeprefix("etcdserver: "))]
        except KVUnavailable as exc:  # closed while unknown
            return [exc] * len(txns)
        self._spent.extend(tokens)
        revision = response.header.revision
        if request is wrapped[0]:
            return [_unwrapped(response, revision)]
        return [_unwrapped(op.response_txn, revision) for op in response.responses[: len(txns)]]

    async def _until_known(self, request: Any, count: int) -> Any:
        """Send a Txn request until etcd answers it (the same request: its tokens tell).

        Raises:
            grpc.aio.AioRpcError: etcd refused it (not applied).
            KVUnavailable: this client closed before etcd answered.
        """
        unknown_since = told = 0.0
        while True:
            try:
                response = await self._call(
                    lambda ch: rpc.KVStub(ch).Txn(
                        request, timeout=self.timeout, metadata=self._metadata
                    )
                )
            except grpc.aio.AioRpcError as exc:
                # A refusal is "not applied" unless an attempt before it may have been: then
                # only a reply (its token read back) ends the wait. A malformed request (too
                # many operations, a duplicate key) was refused every time.
                if not unknown_since or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                log.warning("etcd refused a retry of an unknown outcome (%s); again", exc)
                await asyncio.sleep(1.0)
                continue
            except KVUnavailable as exc:
                if self._closed:
                    raise
                now = time.monotonic()
                if not unknown_since:
                    unknown_since, told = now, now - UNKNOWN_TOLD_EVERY
                if now - told >= UNKNOWN_TOLD_EVERY:
                    told = now
                    log.warning(
                        "etcd silent: %d transaction(s) of unknown outcome for %.0f s; their "
                        "tokens are read back once it answers (%s)",
                        count,
                        now - unknown_since,
                        exc,
                    )
                continue
            if unknown_since:
                log.info("outcome of %d transaction(s) known again", count)
            return response

    async def _sweep_tokens(self) -> None:
        """Delete tokens made over a day ago (those of processes that died before deleting)."""
        while not self._closed:
            cutoff = f"{(time.time() - TOKEN_SWEEP_AFTER) * 1000:013.0f}".encode()
            sweep = rpc.DeleteRangeRequest(key=TOKEN_PREFIX, range_end=TOKEN_PREFIX + cutoff)
            with contextlib.suppress(grpc.aio.AioRpcError, KVUnavailable):
                await self._call(functools.partial(self._delete_range, sweep))
            await asyncio.sleep(TOKEN_SWEEP_EVERY)

    async def _delete_range(
        self, request: rpc.DeleteRangeRequest, channel: grpc.aio.Channel
    ) -> rpc.DeleteRangeResponse:
        return await rpc.KVStub(channel).DeleteRange(
            request, timeout=self.timeout, metadata=self._metadata
        )

    # -- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` seconds."""
        response = await self._call(
            lambda ch: rpc.LeaseStub(ch).LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=self.timeout, metadata=self._metadata
            )
        )
        return int(response.ID)

    async def keep_alive(self, lease: int) -> int:
        """Renew a lease once; its TTL, or 0 when it has ended."""

        async def once(channel: grpc.aio.Channel) -> int:
            call = rpc.LeaseStub(channel).LeaseKeepAlive(
                timeout=self.timeout, metadata=self._metadata
            )
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise KVUnavailable("keep-alive stream closed")
            return int(response.TTL)

        return max(await self._call(once), 0)

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys; an unknown lease is not an error."""
        try:
            await self._call(
                lambda ch: rpc.LeaseStub(ch).LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout, metadata=self._metadata
                )
            )
        except grpc.aio.AioRpcError as exc:
            if "lease not found" not in (exc.details() or ""):
                raise

    async def time_to_live(self, lease: int) -> int | None:
        """Whole seconds left of a lease as etcd's leader times them, rounded down.

        ``None`` when the lease no longer exists (etcd answers TTL -1).
        """
        response = await self._call(
            lambda ch: rpc.LeaseStub(ch).LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease), timeout=self.timeout, metadata=self._metadata
            )
        )
        return None if response.TTL < 0 else int(response.TTL)

    # -- watches -------------------------------------------------------------------------------

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[Event]:
        """Changes under ``prefix`` from ``start_revision``, resuming across failures.

        Raises:
            Compacted: the next revision to deliver has been compacted away.
        """
        next_revision = start_revision
        pause = 0.05
        while True:
            await self._token()
            channel = self._channel()
            sent = self._auth_token
            call = rpc.WatchStub(channel).Watch(metadata=self._metadata)
            try:
                await call.write(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(
                            key=prefix, range_end=prefix_end(prefix), start_revision=next_revision
                        )
                    )
                )
                try:  # a watch that is not created in time is on a wedged connection
                    async with asyncio.timeout(self.timeout):
                        response = await call.read()
                except TimeoutError:
                    self._fail_over(channel, wedged=True)
                    raise KVUnavailable("the watch was not created in time") from None
                while response is not grpc.aio.EOF:
                    if response.compact_revision:
                        raise Compacted(response.compact_revision)
                    if response.canceled:  # a refused token too: a new one below, then again
                        raise KVUnavailable(f"watch canceled: {response.cancel_reason}")
                    pause = 0.05
                    for event in response.events:
                        kv = _kv(event.kv)
                        next_revision = kv.mod_revision + 1
                        yield Event(event.type == rpc.Event.DELETE, kv)
                    response = await call.read()
                raise KVUnavailable("watch stream ended")
            except (grpc.aio.AioRpcError, KVUnavailable, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not _closed_under(self):
                    raise  # the watch was cancelled, not its channel closed
                if self._closed:
                    return
                await self._reauthenticate_watch(prefix, exc, sent)
                log.info("etcd watch on %r broke (%s); resuming at %d", prefix, exc, next_revision)
                self._fail_over(channel)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            finally:
                call.cancel()

    async def _reauthenticate_watch(
        self, prefix: bytes, exc: BaseException, sent: str | None
    ) -> None:
        """A new token for a watch whose token was refused (it resumes after a pause anyway)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            refused = _token_refused(exc)
        else:  # a canceled watch says why in its reason
            refused = _refusal(str(exc))
        if self.auth is None or not refused:
            return
        try:
            await self.authenticate(refused=sent)
        except (KVUnavailable, FloxideError) as failed:
            log.warning("etcd watch on %r: cannot authenticate (%s)", prefix, failed)

    # -- health --------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Return when a member answers a linearizable read; else raise :class:`KVUnavailable`."""
        try:
            await self.get(b"/floxide/v1/ping")
        except grpc.aio.AioRpcError as exc:
            raise KVUnavailable(str(exc.details())) from exc

    async def authenticate(self, *, refused: str | None = None) -> None:
        """Get a token for :attr:`auth`, sent with every call from now on.

        etcd's simple tokens expire when idle, so a refused token calls this again: ``refused``
        names it, and a token another call already replaced is not replaced again (a restart
        of etcd refuses every call in flight at once). Concurrent callers share one
        Authenticate.

        Raises:
            FloxideError: etcd refused the user or password (not retried).
        """
        if self.auth is None:
            return
        if refused is not None and refused != self._auth_token:
            return  # already replaced by another call's refusal
        if self._authenticating is None or self._authenticating.done():
            self._authenticating = asyncio.ensure_future(self._authenticate(*self.auth))
        await asyncio.shield(self._authenticating)

    async def _token(self) -> None:
        """Authenticate unless a token is held (or no auth is configured)."""
        if self.auth is not None and self._auth_token is None:
            await self.authenticate()

    async def _authenticate(self, user: str, password: str) -> None:
        async def once(channel: grpc.aio.Channel) -> str:
            request = rpc.AuthenticateRequest(name=user, password=password)
            reply = await rpc.AuthStub(channel).Authenticate(request, timeout=self.timeout)
            return str(reply.token)

        try:
            token = await self._call(once, authenticated=False)
        except grpc.aio.AioRpcError as exc:
            raise FloxideError(f"etcd refused user {user!r}: {exc.details()}") from exc
        self._auth_token = token
        self._metadata = (*LEADER, ("token", token))
        log.info("authenticated to etcd as %r", user)

    async def version(self) -> str:
        """The etcd version of the member that answers (its Status)."""

        async def once(channel: grpc.aio.Channel) -> str:
            stub = rpc.MaintenanceStub(channel)
            status = await stub.Status(
                rpc.StatusRequest(), timeout=self.timeout, metadata=self._metadata
            )
            return str(status.version)

        return await self._call(once)

    async def close(self) -> None:
        """Close the channels and stop sweeping tokens."""
        self._closed = True
        try:
            try:
                await self.group_commit.close()
            finally:
                await self._background.close()
        finally:
            for channel in self._channels.values():
                await channel.close()
            self._channels.clear()


def _closed_under(kv: EtcdKV) -> bool:
    """Whether a CancelledError came from a channel closed under a call, not from a cancel.

    grpc raises CancelledError in the calls of a channel that is closed (as a wedged one is,
    after its grace); a real cancellation of the task is counted by ``cancelling()``.
    """
    task = asyncio.current_task()
    return not kv._closed and task is not None and task.cancelling() == 0


def _compare(compare: Compare) -> Any:
    message = rpc.Compare(key=compare.key, target=_TARGETS[compare.target], result=_OPS[compare.op])
    setattr(message, _FIELDS[compare.target], compare.value)
    if compare.range_end:
        message.range_end = compare.range_end
    return message


def _request(request: Request) -> Any:
    if isinstance(request, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=request.key, value=request.value, lease=request.lease)
        )
    if isinstance(request, Delete):
        end = prefix_end(request.key) if request.prefix else b""
        return rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=request.key, range_end=end)
        )
    if isinstance(request, Get):
        end = prefix_end(request.key) if request.prefix else b""
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=request.key, range_end=end))
    return rpc.RequestOp(request_txn=_txn_request(request))


def _txn_request(
    txn: Txn, success_extra: Sequence[Any] = (), failure_extra: Sequence[Any] = ()
) -> Any:
    return rpc.TxnRequest(
        compare=[_compare(c) for c in txn.compares],
        success=[_request(r) for r in txn.success] + list(success_extra),
        failure=[_request(r) for r in txn.failure] + list(failure_extra),
    )


def _wrapped(txn: Txn, token: bytes) -> Any:
    """``if token missing: (txn, writing token = branch) else: get token``."""

    def put(value: bytes) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=token, value=value))

    return rpc.TxnRequest(
        compare=[_compare(Compare.missing(token))],
        success=[
            rpc.RequestOp(
                request_txn=_txn_request(txn, success_extra=[put(b"1")], failure_extra=[put(b"0")])
            )
        ],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=token))],
    )


def _need(txn: Any) -> int:
    """The --max-txn-ops a TxnRequest needs: its widest branch, plus what its nested ones need.

    etcd checks each nested Txn against what its parents' widths leave of the limit.
    """
    width = max(len(txn.compare), len(txn.success), len(txn.failure))
    nested = [
        _need(op.request_txn)
        for op in (*txn.success, *txn.failure)
        if op.WhichOneof("request") == "request_txn"
    ]
    return width + max(nested, default=0)


def _unwrapped(response: Any, revision: int) -> TxnResult:
    """The result of a wrapped transaction: its own, or the branch its token recorded."""
    if response.succeeded:
        return _txn_result(response.responses[0].response_txn, revision, drop_token=True)
    # A retry found the token: the first attempt was applied; report its branch.
    kvs = response.responses[0].response_range.kvs
    if not kvs:  # pragma: no cover - the token exists, or the compare would have held
        raise KVUnavailable("transaction token vanished")
    return TxnResult(kvs[0].value == b"1", kvs[0].mod_revision, None)


def _txn_result(response: Any, revision: int, *, drop_token: bool = False) -> TxnResult:
    responses: list[object] = []
    for op in response.responses:
        kind = op.WhichOneof("response")
        if kind == "response_put":
            responses.append(None)
        elif kind == "response_delete_range":
            responses.append(int(op.response_delete_range.deleted))
        elif kind == "response_range":
            responses.append([_kv(kv) for kv in op.response_range.kvs])
        elif kind == "response_txn":
            responses.append(_txn_result(op.response_txn, revision))
    if drop_token:
        responses.pop()  # the put of the transaction's token
    return TxnResult(bool(response.succeeded), revision, responses)
