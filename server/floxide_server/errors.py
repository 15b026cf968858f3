"""One interceptor maps the domain's errors to gRPC statuses, as etcd's ``v3rpc/util.go`` does.

Domain code raises :class:`~floxide_grpc.errors.FloxideError` subclasses, each carrying its
status code and reason, and never imports grpc. Here they become statuses with their message and
the ``google.rpc.ErrorInfo`` trailer that names their class (:mod:`floxide_grpc._status`); the
store being unreachable becomes UNAVAILABLE; anything else is INTERNAL, logged with its traceback,
and its details are not sent to the caller.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from floxide_grpc._status import trailing_metadata
from floxide_grpc.errors import FloxideError, Unavailable
from floxide_server.store.kv import KVUnavailable

__all__ = ["ErrorInterceptor", "error_of"]

log = logging.getLogger(__name__)


def error_of(exc: BaseException) -> FloxideError:
    """The error a failed call reports."""
    if isinstance(exc, FloxideError):
        return exc
    if isinstance(exc, KVUnavailable):
        return Unavailable(f"the store is unavailable: {exc}")
    log.exception("internal error", exc_info=exc)
    return FloxideError("internal error (logged by the server)")


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


async def _abort(context: Any, exc: BaseException) -> None:
    error = error_of(exc)
    await context.abort(_BY_VALUE[error.code.value], str(error), trailing_metadata(error))


def _unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: Any) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def _streaming(
    behavior: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            # Closed here, not left to the garbage collector, when the call is cancelled.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wrap every handler so that a raised error becomes its status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Return the handler with its behaviour wrapped."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_unary(handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_streaming(handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_streaming(handler.stream_stream))
        return handler
