"""The one boundary between the SDK's errors and gRPC statuses, both ways.

A :class:`~floxide_grpc.errors.FloxideError` leaves the server as its status code and message,
plus a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer holding one
``google.rpc.ErrorInfo``: its class's stable ``reason``, the domain ``floxide.v1``, and its fields
as ``metadata`` (AIP-193, the richer error model of gRPC). Every caller of the server (the client,
the worker, the remote checkpoint store) rebuilds the exact class from it here. A status without
it (a proxy's, grpc's own, an older server's) becomes the class of its code.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

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

__all__ = ["DOMAIN", "error_from_rpc", "trailing_metadata"]

DOMAIN = "floxide.v1"
"""``google.rpc.ErrorInfo.domain`` of every error this project sends."""

_MAX_FIELD = 1024
"""A metadata value's most characters: the whole trailer stays far under gRPC's 8 KiB default."""

_BY_CODE: dict[StatusCode, type[FloxideError]] = {
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    StatusCode.ALREADY_EXISTS: AlreadyExists,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.UNAVAILABLE: Unavailable,
    StatusCode.UNAUTHENTICATED: Unauthenticated,
    StatusCode.PERMISSION_DENIED: PermissionDenied,
}
"""The class of a status that carries no ``ErrorInfo`` of ours."""


def trailing_metadata(error: FloxideError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailer that carries ``error``'s class and fields (the server's side)."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=DOMAIN,
        metadata={key: value[:_MAX_FIELD] for key, value in error.metadata().items()},
    )
    status = status_pb2.Status(code=error.code.value, message=str(error))
    status.details.add().Pack(info)
    return tuple(rpc_status.to_status(status).trailing_metadata)


def error_from_rpc(exc: grpc.RpcError) -> FloxideError:
    """The SDK error a failed call stands for: its exact class when the server named it."""
    code = StatusCode(exc.code().value[0])
    message = exc.details() or code.name
    info = _error_info(exc)
    cls = FloxideError.by_reason.get(info.reason) if info is not None else None
    if info is not None and cls is not None and cls.code is code:
        return cls.from_metadata(message, info.metadata)
    error = _BY_CODE.get(code, FloxideError)(message)
    error.code = code
    return error


def _error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ``ErrorInfo`` of ours in the call's trailer, if any."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # a trailer that disagrees with the call's own code or message
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None
