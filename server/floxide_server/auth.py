"""Who may do what: every call of the floxide.v1 services checked against its caller's token.

One interceptor reads the bearer token (:mod:`floxide_server.tokens` checks it from memory),
refuses a role that may not call the method (the default is deny: a method missing from
:data:`ALLOWED` is an admin's only) and a namespace that is not the token's, and writes an
audit line for every call that changes something. Health and reflection stay open: probes and
tools need no token, and the API's shape is public in ``proto/`` anyway.

The worker stream names its namespace in its hello, after the call began: the worker service
checks it there (:func:`current` gives the stream's principal), and ends the stream when its
token is revoked or expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from floxide_grpc._auth import HEADER
from floxide_grpc._names import is_name
from floxide_grpc._proto.floxide.v1 import admin_service_pb2 as pb
from floxide_grpc.errors import FloxideError, PermissionDenied, Unauthenticated
from floxide_server.store.kv import KVUnavailable
from floxide_server.tokens import Principal, Tokens

__all__ = ["ALLOWED", "AuthInterceptor", "current", "role_name"]

audit_log = logging.getLogger("floxide_server.audit")

_READS = {
    "OrchestratorService": (
        "GetWorkflow ListWorkflows GetRun ListRuns ListRunErrors GetRunMetrics GetRunContext "
        "ListPendingWork ListWorkItems ListWorkers WaitForCompletion"
    ),
    "CheckpointStoreService": "LoadCheckpoint",
    "ContextStoreService": "GetContext WatchContext",
    "WorkQueueService": "ListQueuedWorkItems",
    "RunInfoStoreService": "GetRunInfo ListRunInfos WatchRunInfos",
    "MetricsStoreService": "GetMetrics",
    "ErrorStoreService": "ListErrors",
    "LivenessStoreService": "GetWorkerHealth ListWorkerHealth",
    "WorkItemStateStoreService": "GetWorkItemState ListWorkItemStates WatchWorkItemStates",
}
_STARTS = {"OrchestratorService": "StartRun"}
_OPERATES = {
    "OrchestratorService": "CancelRun PauseRun ResumeRun",
    "CheckpointStoreService": "SaveCheckpoint DeleteCheckpoint",
    "ContextStoreService": "ApplyContextOperations",
    "WorkQueueService": "EnqueueWorkItem",
    "ErrorStoreService": "RecordError",
}
_WORKS = {
    "OrchestratorService": "RegisterWorkflow GetWorkflow ListWorkflows",
    "WorkerService": "Connect",
}


def _methods(*groups: dict[str, str]) -> frozenset[str]:
    return frozenset(
        f"/floxide.v1.{service}/{name}"
        for group in groups
        for service, names in group.items()
        for name in names.split()
    )


READS = _methods(_READS)
ALLOWED: dict[int, frozenset[str]] = {
    pb.ROLE_READER: READS,
    pb.ROLE_CLIENT: _methods(_READS, _STARTS),
    pb.ROLE_OPERATOR: _methods(_READS, _STARTS, _OPERATES),
    pb.ROLE_WORKER: _methods(_WORKS),
}
"""The methods each role may call; an admin may call every method (PromoteWorkflow and the
AdminService are an admin's only)."""

CONNECT = "/floxide.v1.WorkerService/Connect"

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "floxide_principal", default=None
)


def current() -> Principal | None:
    """The principal of the call being served; ``None`` when auth is off."""
    return _principal.get()


def role_name(role: int) -> str:
    """``reader``, ``client``, ... (as the CLI and the audit lines spell roles)."""
    return pb.Role.Name(role).removeprefix("ROLE_").lower()  # type: ignore[arg-type]


def allowed(principal: Principal, method: str) -> bool:
    """Whether ``principal``'s role may call ``method`` (its full gRPC name)."""
    return principal.role == pb.ROLE_ADMIN or method in ALLOWED.get(principal.role, frozenset())


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admit each call of the floxide.v1 services by its token, role and namespace."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Return the handler, wrapped to admit its caller first."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/floxide.v1."):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, token, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._streaming(method, token, handler.unary_stream)
            )
        if handler.stream_stream is not None:
            return handler._replace(
                stream_stream=self._streaming(method, token, handler.stream_stream)
            )
        return handler  # no client-streaming RPC in floxide.v1

    async def _admit(self, method: str, token: str | None, request: Any, who: _Who) -> Principal:
        principal = who.principal = await self.tokens.check(token)  # named by a refusal's audit
        if not allowed(principal, method):
            raise PermissionDenied(
                f"a {role_name(principal.role)} token may not call {method.rsplit('/', 1)[1]}"
            )
        for namespace in who.namespaces:
            if not principal.may_name(namespace):
                raise PermissionDenied(f"the token may not act in namespace {namespace!r}")
        return principal

    def _unary(
        self, method: str, token: str | None, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            with _audited(method, request) as who:
                principal = await self._admit(method, token, request, who)
                reset = _principal.set(principal)
                try:
                    return await behavior(request, context)
                finally:
                    _principal.reset(reset)

        return wrapper

    def _streaming(
        self, method: str, token: str | None, behavior: Callable[..., AsyncGenerator[Any, None]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            with _audited(method, request) as who:
                # A stream of requests names its namespace later (the worker's hello).
                principal = await self._admit(method, token, request, who)
                _principal.set(principal)  # this call's own task: nothing else sees it
                ended = self._ending(principal, method)
                try:
                    # Closed here, not left to the garbage collector, when it is cancelled.
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                except asyncio.CancelledError:
                    if ended is not None and ended.done() and not ended.cancelled():
                        raise Unauthenticated(
                            f"the token {principal.token_id} was revoked or has expired"
                        ) from None
                    raise
                finally:
                    if ended is not None:
                        ended.cancel()

        return wrapper

    def _ending(self, principal: Principal, method: str) -> asyncio.Future[None] | None:
        """End this call's stream when its token is revoked or expires.

        Not the worker stream's: it ends itself, closing its session in order.
        """
        if method == CONNECT:
            return None
        call = asyncio.current_task()
        ended = asyncio.ensure_future(self.tokens.ended(principal))
        if call is not None:
            ended.add_done_callback(lambda done: None if done.cancelled() else call.cancel())
        return ended


class _Who:
    """A call as its audit line tells it: who made it (once known), and where."""

    def __init__(self, namespaces: set[str]) -> None:
        self.namespaces = namespaces
        self.principal: Principal | None = None


@contextlib.contextmanager
def _audited(method: str, request: Any) -> Iterator[_Who]:
    """One audit line for a call that changes something: who, what, where, the outcome."""
    who = _Who(_namespaces(request))  # read once: for the check and for the line
    outcome = "OK"
    try:
        yield who
    except grpc.aio.AbortError:
        outcome = "ABORTED"
        raise
    except FloxideError as exc:
        outcome = exc.code.name
        raise
    except KVUnavailable:
        outcome = "UNAVAILABLE"
        raise
    except asyncio.CancelledError:
        outcome = "CANCELLED"
        raise
    except BaseException:
        outcome = "INTERNAL"
        raise
    finally:
        if method not in READS:
            named = sorted(who.namespaces)
            # A name the request made up is not written as it came: no line can be forged.
            namespace = ",".join(n if is_name(n) else "(invalid)" for n in named)
            principal = who.principal
            fields = {
                "token": principal.token_id if principal else "-",
                "role": role_name(principal.role) if principal else "-",
                "method": method.rsplit("/", 1)[1],
                "namespace": namespace,
                "outcome": outcome,
            }
            audit_log.info(
                "audit %s", " ".join(f"{k}={v or '-'}" for k, v in fields.items()),
                extra={"audit": fields},
            )  # fmt: skip


def _namespaces(request: Any, depth: int = 0) -> set[str]:
    """Every namespace a request names: its own, and its messages' (a checkpoint's, its items').

    ``""`` names ``"default"``, as everywhere. A stream of requests names none here (the
    worker stream names its namespace in its hello, checked there).
    """
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None or depth > 3:
        return set()
    found = set()
    if "namespace" in descriptor.fields_by_name:
        found.add(request.namespace or "default")
    for field in descriptor.fields:
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for each in getattr(request, field.name):
                found |= _namespaces(each, depth + 1)
        elif request.HasField(field.name):
            found |= _namespaces(getattr(request, field.name), depth + 1)
    return found


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None
