"""TLS for a channel to a floxide server: what to trust, what to present, which name to check.

Python's gRPC cannot change a channel's certificates once it is made, so the files are read each
time a channel is made: a worker makes one per connection, a client again when a call finds the
server unreachable after its files changed (:meth:`Tls.changed`). A rotated certificate is
taken at the next reconnect, without a restart.

The commands (``floxide``, ``floxide-worker``) take the settings as flags or from the
environment (``FLOXIDE_TLS_CA``, ``FLOXIDE_TLS_CERT``, ``FLOXIDE_TLS_KEY``,
``FLOXIDE_TLS_SERVER_NAME``; ``FLOXIDE_TLS=1`` alone: TLS trusting the system's roots). The
Python classes take a :class:`Tls` and default to plain text; :meth:`Tls.of` reads the
environment for them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from floxide_grpc.errors import InvalidArgument

__all__ = [
    "ENV",
    "CaOption",
    "CertOption",
    "KeyOption",
    "NameOption",
    "Tls",
    "TlsOption",
    "explain",
    "open_channel",
]

ENV = {
    "ca": "FLOXIDE_TLS_CA",
    "cert": "FLOXIDE_TLS_CERT",
    "key": "FLOXIDE_TLS_KEY",
    "server_name": "FLOXIDE_TLS_SERVER_NAME",
}
"""The environment variable of each setting."""


@dataclasses.dataclass(frozen=True)
class Tls:
    """How a client or a worker speaks TLS to the server.

    Attributes:
        ca: PEM file of the certificates to trust; ``None``: the system's roots.
        cert: PEM file of this client's certificate, for a server that requires one (mTLS).
        key: PEM file of that certificate's private key.
        server_name: The name to check in the server's certificate when it is not the host
            of the target (a server reached by an address its certificate does not name).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("a client certificate needs its key, and a key its certificate")

    @classmethod
    def of(
        cls,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
        environ: Mapping[str, str] = os.environ,
        enabled: bool = False,
    ) -> Tls | None:
        """TLS from options, each falling back to its environment variable; ``None``: plain text.

        ``enabled`` (or ``FLOXIDE_TLS=1``) asks for TLS with none of the files given.
        """
        given = {"ca": ca, "cert": cert, "key": key, "server_name": server_name}
        found = {name: value or environ.get(ENV[name]) or None for name, value in given.items()}
        on = enabled or environ.get("FLOXIDE_TLS", "").lower() in ("1", "true", "yes", "on")
        if not on and not any(found.values()):
            return None
        return cls(
            ca=Path(found["ca"]) if found["ca"] else None,
            cert=Path(found["cert"]) if found["cert"] else None,
            key=Path(found["key"]) if found["key"] else None,
            server_name=str(found["server_name"]) if found["server_name"] else None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files as they are now.

        Raises:
            InvalidArgument: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the name to check in the server's certificate, if set."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def stamp(self) -> tuple[float, ...]:
        """When each file last changed (compare two to know whether to make a new channel)."""
        return tuple(_mtime(p) for p in (self.ca, self.cert, self.key))

    def changed(self, since: tuple[float, ...]) -> bool:
        """Whether a file changed since ``since`` (a :meth:`stamp`)."""
        return self.stamp() != since


def open_channel(
    target: str, tls: Tls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to ``target``: over TLS with ``tls`` (its files read now), else plain text."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def explain(details: str, target: str, tls: Tls | None) -> str | None:
    """What a person can do about a connection that failed on TLS; ``None``: not a TLS failure.

    ``details``: gRPC's message for an UNAVAILABLE call (it names OpenSSL's reason).
    """
    if "Hostname Verification" in details or "Peer name" in details:
        return (
            f"TLS to {target}: the server's certificate does not name the address you gave; "
            "dial a name it carries, or give --tls-server-name (FLOXIDE_TLS_SERVER_NAME)"
            f" [{details}]"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        trusted = f"the CA in {tls.ca}" if tls is not None and tls.ca else "the system's roots"
        return (
            f"TLS to {target}: the server's certificate is not signed by {trusted}, or does not "
            "name the address you gave (--tls-ca or FLOXIDE_TLS_CA, --tls-server-name)"
            f" [{details}]"
        )
    if tls is None and ("Socket closed" in details or "Connection reset" in details):
        return (
            f"{target} closed the connection: if it serves TLS, give --tls-ca (or "
            f"FLOXIDE_TLS_CA), or --tls for a certificate of a public CA [{details}]"
        )
    closed = "Socket closed" in details or "Connection reset" in details
    if tls is not None and (closed or "handshake failed" in details.lower()):
        certificate = "this client's" if tls.cert else "none (--tls-cert and --tls-key)"
        return (
            f"TLS to {target} failed: the server may require a client certificate signed by "
            f"its CA (this client presents {certificate}), or it does not serve TLS [{details}]"
        )
    return None


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the TLS file {path}: {exc.strerror}") from exc


def _mtime(path: Path | None) -> float:
    if path is None:
        return 0.0
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


# -- the same options on every command that reaches a server --------------------------------

CaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", envvar=ENV["ca"], help="PEM CA to trust for the server's certificate: TLS."
    ),
]
CertOption = Annotated[
    Path | None,
    typer.Option("--tls-cert", envvar=ENV["cert"], help="PEM client certificate (mTLS)."),
]
KeyOption = Annotated[
    Path | None, typer.Option("--tls-key", envvar=ENV["key"], help="PEM key of --tls-cert.")
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name",
        envvar=ENV["server_name"],
        help="The name to check in the server's certificate (if not the address's host).",
    ),
]
TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls",
        envvar="FLOXIDE_TLS",
        help="TLS trusting the system's roots (any --tls-* option implies TLS).",
    ),
]
