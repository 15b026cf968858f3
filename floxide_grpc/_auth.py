"""Bearer tokens on the client side: every call says who makes it (docs/protocol.md, "Tokens").

The token goes in the ``authorization`` metadata of every call, as ``Bearer <token>``. Every
Python program takes it from ``FLOXIDE_TOKEN`` unless given one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["ENV", "HEADER", "Metadata", "bearer", "token_from_env"]

ENV = "FLOXIDE_TOKEN"
"""The environment variable every floxide program reads its token from."""
HEADER = "authorization"


def token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """``FLOXIDE_TOKEN``, or ``None`` when unset or empty."""
    return environ.get(ENV) or None


Metadata = tuple[tuple[str, str], ...]


def bearer(token: str | None) -> Metadata:
    """The metadata that carries ``token`` (none without one)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()
