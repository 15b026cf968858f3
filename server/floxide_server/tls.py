"""TLS on the server's port: certificate files reloaded when they change, and client certificates.

gRPC asks :meth:`ServerTls.fetch` for the certificate of each new connection (its
``dynamic_ssl_server_credentials``); it answers with the files' new contents once they change,
and connections already open keep the certificate they began with: a rotation drops no stream.
With ``client_ca``, every client must present a certificate that CA signed (mTLS): that
authenticates the transport only (who may do what is the tokens' business).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
import threading
from pathlib import Path

import grpc

__all__ = ["ServerTls", "is_loopback"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerTls:
    """The server's certificate and key, and the CA of its clients' certificates (mTLS).

    Attributes:
        cert: PEM file of the server's certificate chain.
        key: PEM file of its private key.
        client_ca: PEM file of the CA that signs clients' certificates; ``None``: no client
            certificate asked for.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    _stamp: tuple[tuple[int, int, int], ...] = dataclasses.field(
        default=(), init=False, repr=False, compare=False
    )
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def check(self) -> None:
        """Load the files as TLS would, to refuse a bad pair before anything starts.

        Raises:
            OSError: a file cannot be read.
            ssl.SSLError: the key does not match the certificate, or a file is not PEM.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that reload the files when they change (read now, once, to fail early).

        Raises:
            OSError: a file cannot be read.
            ValueError: the files do not hold a certificate and its key.
        """
        with self._lock:
            self._stamp = self._stamps()  # before reading: a change meanwhile is seen next time
            initial = self._configuration()
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self.fetch,  # type: ignore[arg-type]  # None (no change) is what gRPC expects too
            require_client_authentication=self.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The configuration for a new connection: new if the files changed, else ``None``.

        Called by gRPC's threads. A file caught half-written (or unreadable) keeps the old
        configuration; the next connection tries again.
        """
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.warning(
                    "TLS files changed but cannot be loaded (%s): keeping the old ones", exc
                )
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded from %s", self.cert)
            return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        chain, key = self.cert.read_bytes(), self.key.read_bytes()
        if b"CERTIFICATE" not in chain or b"PRIVATE KEY" not in key:
            raise ValueError(f"{self.cert} and {self.key} must be a PEM certificate and its key")
        roots = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], roots)

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        """Each file's change time, size and inode: a file renamed over it changes them."""
        stats = [p.stat() if p is not None else None for p in (self.cert, self.key, self.client_ca)]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) if s else (0, 0, 0) for s in stats)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches this machine only (plain text is the default there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
