"""Raw channels for tests that call the server's stubs themselves, with the session's token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from floxide_grpc._auth import bearer
from floxide_grpc._proto.floxide.v1 import orchestrator_service_pb2, orchestrator_service_pb2_grpc
from floxide_grpc._proto.floxide.v1.workflow_pb2 import WorkflowDefinition
from floxide_grpc._status import error_from_rpc

__all__ = ["authorized_channel", "register_definition"]


def authorized_channel(target: str, token: str | None = None) -> grpc.aio.Channel:
    """A plain-text channel whose every call carries ``token`` (default: ``FLOXIDE_TOKEN``)."""
    from floxide_grpc._auth import token_from_env  # noqa: PLC0415

    header = bearer(token if token is not None else token_from_env())
    return grpc.aio.insecure_channel(
        target, interceptors=[_UnaryUnary(header), _UnaryStream(header), _StreamStream(header)]
    )


async def register_definition(target: str, namespace: str, definition: WorkflowDefinition) -> str:
    """Register a definition made by hand (the client takes only a ``Workflow``); its hash.

    Raises:
        FloxideError: as the client would.
    """
    async with authorized_channel(target) as channel:
        stub = orchestrator_service_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_service_pb2.RegisterWorkflowRequest(
            namespace=namespace, definition=definition
        )
        try:
            response = await stub.RegisterWorkflow(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
    return response.definition_hash


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
