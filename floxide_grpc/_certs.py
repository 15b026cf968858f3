"""A development CA: a CA, a server certificate and a client certificate, made with cryptography.

For ``floxide certs`` and ``floxide dev --tls``, and for tests: enough to run the whole stack
over TLS and mTLS on machines of one's own. In production, certificates come from the
organisation's CA; nothing here rotates or revokes them.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Authority", "Issued", "make_authority"]

VALID = datetime.timedelta(days=365)


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Authority:
    """A CA whose certificate and key are PEM files in ``directory``."""

    directory: Path
    name: str = "floxide development CA"

    @property
    def cert(self) -> Path:
        """The CA's certificate: what clients and servers trust."""
        return self.directory / "ca.pem"

    @property
    def key(self) -> Path:
        """The CA's private key (readable by its owner only)."""
        return self.directory / "ca-key.pem"

    def issue(
        self, name: str, *, hosts: Iterable[str] = (), client: bool = False, stem: str = ""
    ) -> Issued:
        """A certificate signed by this CA, written as ``{stem}.pem`` and ``{stem}-key.pem``.

        ``hosts``: DNS names and IP addresses, as subject alternative names (what a client
        checks a server's certificate against). ``client``: for client authentication (mTLS)
        rather than a server's.
        """
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _base(name, key.public_key(), ca_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        names = [_general_name(h) for h in hosts]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        stem = stem or ("client" if client else "server")
        issued = Issued(self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem")
        _write(issued.key, _pem_key(key), private=True)
        _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        return issued


def make_authority(
    directory: Path, name: str = "floxide development CA", *, reuse: bool = False
) -> Authority:
    """Make a new CA in ``directory`` (``ca.pem``, and ``ca-key.pem`` readable by its owner).

    ``reuse``: keep the CA already there, if there is one (a new CA would orphan every
    certificate the old one signed).
    """
    existing = Authority(directory, name)
    if reuse and existing.cert.exists() and existing.key.exists():
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _base(name, key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    authority = Authority(directory, name)
    _write(authority.key, _pem_key(key), private=True)
    _write(authority.cert, cert.public_bytes(serialization.Encoding.PEM))
    return authority


def _base(
    name: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a little clock skew
        .not_valid_after(now + VALID)
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` whole: a new temporary file renamed over ``path`` (readers see old or new).

    The temporary file is made afresh (never one already there, nor a link), readable by its
    owner only until it says otherwise.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
