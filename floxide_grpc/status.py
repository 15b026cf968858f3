"""gRPC statuses back into the SDK's errors: the client side of the server's interceptor."""

from __future__ import annotations

import grpc

from floxide_grpc.errors import (
    AlreadyExists,
    FailedPrecondition,
    FloxideError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StatusCode,
    Unauthenticated,
    Unavailable,
)

__all__ = ["error_from_status"]

_ERRORS: dict[StatusCode, type[FloxideError]] = {
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    StatusCode.ALREADY_EXISTS: AlreadyExists,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.UNAVAILABLE: Unavailable,
    StatusCode.UNAUTHENTICATED: Unauthenticated,
    StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def error_from_status(exc: grpc.aio.AioRpcError) -> FloxideError:
    """The SDK error a gRPC status stands for, with the server's message."""
    code = StatusCode(exc.code().value[0])
    error = _ERRORS.get(code, FloxideError)(exc.details() or code.name)
    error.code = code
    return error
