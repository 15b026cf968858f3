"""Raw channels for tests that call the server's stubs themselves, with the session's token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from floxide_grpc.auth import bearer

__all__ = ["authorized_channel"]


def authorized_channel(target: str, token: str | None = None) -> grpc.aio.Channel:
    """A plain-text channel whose every call carries ``token`` (default: ``FLOXIDE_TOKEN``)."""
    from floxide_grpc.auth import token_from_env  # noqa: PLC0415

    header = bearer(token if token is not None else token_from_env())
    return grpc.aio.insecure_channel(
        target, interceptors=[_UnaryUnary(header), _UnaryStream(header), _StreamStream(header)]
    )


class _Adding:
    def __init__(self, header: tuple[tuple[str, str], ...]) -> None:
        self.header = header

    def _with(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_Adding, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with(details), request)


class _UnaryStream(_Adding, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with(details), request)


class _StreamStream(_Adding, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._with(details), requests)
