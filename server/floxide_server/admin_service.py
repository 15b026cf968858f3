"""``AdminService``: tokens made, listed and revoked over gRPC (an admin's calls only).

The interceptor (:mod:`floxide_server.auth`) admits the caller and writes the call's audit
line; this adds what the token operation was about (the token's id, never its secret).
"""

from __future__ import annotations

import logging
from typing import Any

from floxide_grpc._proto.floxide.v1 import admin_service_pb2 as pb
from floxide_grpc._proto.floxide.v1 import admin_service_pb2_grpc
from floxide_server.auth import current, role_name
from floxide_server.tokens import Tokens

__all__ = ["AdminService"]

audit_log = logging.getLogger("floxide_server.audit")


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    """The AdminService on one replica's token store."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Any
    ) -> pb.CreateTokenResponse:
        """Make a token (see the proto)."""
        expires = request.expires_at.ToMilliseconds() if request.HasField("expires_at") else 0
        token, info = await self.tokens.create(
            request.name, request.role, list(request.namespaces), expires
        )
        _said(
            "made",
            info.id,
            f"role={role_name(info.role)} namespaces={','.join(info.namespaces) or '*'}",
        )
        return pb.CreateTokenResponse(token=token, info=info)

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Any
    ) -> pb.ListTokensResponse:
        """Every token in force (see the proto)."""
        return pb.ListTokensResponse(tokens=await self.tokens.infos())

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Any
    ) -> pb.RevokeTokenResponse:
        """Revoke a token (see the proto)."""
        found = await self.tokens.revoke(request.id)
        _said("revoked" if found else "not found, to revoke:", request.id)
        return pb.RevokeTokenResponse(found=found)


def _said(what: str, token_id: str, more: str = "") -> None:
    by = current()
    audit_log.info(
        "audit token %s %s by=%s %s", token_id, what, by.token_id if by else "-", more,
        extra={"audit": {"token": by.token_id if by else "-", "target": token_id, "what": what}},
    )  # fmt: skip
