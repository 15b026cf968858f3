"""The ``floxide-server`` command: an orchestrator replica on etcd (a cluster, or embedded)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import grpc
import typer

from floxide_grpc import _loop as event_loop
from floxide_grpc._version import __version__
from floxide_grpc.errors import FloxideError
from floxide_grpc.tls import Tls
from floxide_server.app import Server, ServerConfig
from floxide_server.embedded import EmbeddedEtcd
from floxide_server.etcd import EtcdKV, crash_safe
from floxide_server.sessions import SessionConfig
from floxide_server.store.kv import KVUnavailable
from floxide_server.store.payloads import Limits
from floxide_server.tasks import first_done
from floxide_server.tls import ServerTls, is_loopback

__all__ = ["app", "main"]

app = typer.Typer(name="floxide-server", add_completion=False)
log = logging.getLogger("floxide_server")

DEFAULT_PORT = 50051


async def serve(
    endpoints: list[str],
    config: ServerConfig,
    ready_file: Path | None,
    grace: timedelta,
    etcd_retry: float = 10.0,
    *,
    embedded: bool = False,
    etcd_tls: Tls | None = None,
    etcd_auth: tuple[str, str] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Raises:
        Exception: the failure that stopped the server (a server-wide task failed).
    """
    kv = EtcdKV(endpoints, retry_for=etcd_retry, tls=etcd_tls, auth=etcd_auth)
    server = Server(kv, config)
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    try:
        port = await server.start()
        if ready_file is not None:
            await asyncio.to_thread(ready_file.write_text, f"{config.host}:{port}\n")
        log.info("serving floxide.v1 on %s:%d (etcd %s)", config.host, port, ",".join(endpoints))
        if not embedded:
            await _check_version(kv)
        stopped = asyncio.ensure_future(server.wait())
        if stopped in await first_done([stopped, asyncio.ensure_future(signalled.wait())]):
            stopped.exception()  # a failure: stop() below raises it
        else:
            log.info("shutting down")
    finally:
        try:
            await server.stop(grace)
        finally:
            await kv.close()


def _check_transport(
    host: str, cert: Path | None, key: Path | None, client_ca: Path | None, *, insecure: bool
) -> None:
    """Refuse TLS options that do not go together, and plain text off loopback unless asked."""
    if (cert is None) != (key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise typer.BadParameter("--tls-client-ca needs --tls-cert and --tls-key (TLS first)")
    if cert is not None and key is not None:
        try:
            ServerTls(cert, key, client_ca).check()
        except (OSError, ssl.SSLError) as exc:
            raise typer.BadParameter(
                f"the TLS files do not load ({exc}): --tls-cert must be a PEM certificate "
                "(chain), --tls-key its key, --tls-client-ca a PEM CA",
                param_hint="--tls-cert",
            ) from exc
    if cert is None and not is_loopback(host) and not insecure:
        raise typer.BadParameter(
            f"serving {host} in plain text: give --tls-cert and --tls-key, or --insecure to do "
            "so on purpose",
            param_hint="--host",
        )


def _limits(given: list[str], **fixed: int) -> Limits:
    """The limits, with each ``NAME=VALUE`` of ``--limit`` (a field of :class:`Limits`)."""
    fields = {f.name: f.type for f in dataclasses.fields(Limits)}
    chosen: dict[str, float | int] = {}
    for entry in given:
        name, _, value = entry.partition("=")
        if name not in fields or name in fixed or name == "max_txn_ops":
            known = ", ".join(n for n in fields if n not in fixed and n != "max_txn_ops")
            raise typer.BadParameter(f"--limit {entry!r}: no such limit (limits: {known})")
        try:
            number = float(value) if "float" in str(fields[name]) else int(value)
        except ValueError as exc:
            raise typer.BadParameter(f"--limit {entry!r}: {value!r} is not a number") from exc
        if not math.isfinite(number) or number < 0:
            raise typer.BadParameter(f"--limit {entry!r}: a limit is a finite number, 0 or more")
        chosen[name] = number
    return Limits(**fixed, **chosen)  # type: ignore[arg-type]


def _check_auth(auth: str, host: str) -> bool:
    """Whether calls need tokens: ``--auth off`` only on loopback, and said loudly."""
    if auth not in ("on", "off"):
        raise typer.BadParameter("--auth is on or off")
    if auth == "off" and not is_loopback(host):
        raise typer.BadParameter(f"--auth off serves {host} to anyone: loopback only")
    if auth == "off":
        log.warning("AUTH OFF: any caller of %s may do anything, in every namespace", host)
    return auth == "on"


def _secret(path: Path | None, variable: str) -> str:
    """A secret from a file, else from an environment variable ("" if neither)."""
    if path is None:
        return os.environ.get(variable, "")
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from exc


def _admin_token(path: Path | None) -> str | None:
    """The operator's admin token: from ``path``, else ``FLOXIDE_ADMIN_TOKEN``."""
    token = _secret(path, "FLOXIDE_ADMIN_TOKEN")
    if path is not None and len(token) < 32:
        raise typer.BadParameter(f"the admin token in {path} is shorter than 32 characters")
    return token or None


def _etcd_tls(ca: Path | None, cert: Path | None, key: Path | None) -> Tls | None:
    if (cert is None) != (key is None):
        raise typer.BadParameter("--etcd-cert and --etcd-key go together")
    return Tls(ca=ca, cert=cert, key=key) if ca or cert else None


async def _check_version(kv: EtcdKV) -> None:
    """Warn, loudly, of an etcd that can lose applied writes when a member crashes."""
    try:
        version = await kv.version()
    except grpc.aio.AioRpcError as exc:  # a user without the right to ask, say
        log.info("etcd's version is unknown (%s)", exc.details())
        return
    log.info("etcd %s", version)
    if not crash_safe(version):
        log.warning(
            "etcd %s can lose applied writes when a member crashes, and then serves a state "
            "other members do not have (runs stall or repeat steps): run etcd 3.5.6 or newer "
            "(etcd's v3.5 data inconsistency postmortem)",
            version,
        )


@app.command()
def run(
    etcd: Annotated[
        str, typer.Option(help="etcd endpoints host:port[,...]; none: an embedded etcd.")
    ] = "",
    host: Annotated[str, typer.Option(help="The address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to bind; 0 picks a free one.")] = DEFAULT_PORT,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="The embedded etcd's data directory (kept); default: a temporary one."),
    ] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="Write host:port here once serving.")
    ] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds to finish calls in flight on shutdown.")
    ] = 10.0,
    server_id: Annotated[str, typer.Option(help="This replica's name.")] = "",
    lease_ttl: Annotated[float, typer.Option(help="Seconds a session lives unheard.")] = 10.0,
    heartbeat: Annotated[float, typer.Option(help="Seconds between worker heartbeats.")] = 3.0,
    retention_days: Annotated[float, typer.Option(help="Days finished runs are kept.")] = 7.0,
    reconcile_interval: Annotated[
        float, typer.Option(help="Seconds between checks for runs that can no longer progress.")
    ] = 30.0,
    namespace_retention: Annotated[
        list[str] | None, typer.Option(help="NAMESPACE=DAYS: another retention for a namespace.")
    ] = None,
    deadline_grace: Annotated[
        float,
        typer.Option(
            min=0, help="Seconds past a node's timeout before the server fails the attempt."
        ),
    ] = 2.0,
    default_node_timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds a node without a timeout may take (default: any)."),
    ] = None,
    etcd_retry: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds an etcd read retries before etcd counts as unreachable (a write whose "
            "outcome is unknown is retried until etcd answers).",
        ),
    ] = 10.0,
    max_run_timeout_days: Annotated[
        float, typer.Option(min=0.001, help="The longest run timeout a start may ask for, in days.")
    ] = 365.0,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="FLOXIDE_SERVER_TLS_CERT",
            help="PEM certificate (chain) of the port: TLS. Reloaded when it changes.",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="FLOXIDE_SERVER_TLS_KEY", help="PEM private key of --tls-cert."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="FLOXIDE_SERVER_TLS_CLIENT_CA",
            help="PEM CA that signs clients' certificates: every client must present one (mTLS).",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Serve plain text on an address other than loopback, on purpose."
        ),
    ] = False,
    auth: Annotated[
        str,
        typer.Option(
            help="on: every call needs a bearer token (the default); off: none does "
            "(loopback only, for development).",
        ),
    ] = "on",
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding an admin token to store at start if missing (else "
            "FLOXIDE_ADMIN_TOKEN; else, on a store where none was ever made, one is printed).",
        ),
    ] = None,
    etcd_ca: Annotated[
        Path | None, typer.Option(envvar="FLOXIDE_ETCD_CA", help="PEM CA of etcd: TLS to etcd.")
    ] = None,
    etcd_cert: Annotated[
        Path | None,
        typer.Option(envvar="FLOXIDE_ETCD_CERT", help="PEM client certificate for etcd."),
    ] = None,
    etcd_key: Annotated[
        Path | None, typer.Option(envvar="FLOXIDE_ETCD_KEY", help="PEM key of --etcd-cert.")
    ] = None,
    etcd_user: Annotated[
        str, typer.Option(envvar="FLOXIDE_ETCD_USER", help="etcd user, if etcd's auth is on.")
    ] = "",
    etcd_password_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the etcd user's password (else FLOXIDE_ETCD_PASSWORD; never a "
            "flag, which the process list would show).",
        ),
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: another value for one of the limits (docs/protocol.md's table), "
            "e.g. max_runs_in_flight=5000 (repeatable).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Serve the floxide-grpc orchestrator: its services, health and reflection."""
    if version:
        typer.echo(f"floxide-server {__version__}")
        return
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _check_transport(host, tls_cert, tls_key, tls_client_ca, insecure=insecure)
    auth_on = _check_auth(auth, host)
    admin_token = _admin_token(admin_token_file)
    etcd_tls = _etcd_tls(etcd_ca, etcd_cert, etcd_key)
    etcd_password = _secret(etcd_password_file, "FLOXIDE_ETCD_PASSWORD")
    if etcd_password and not etcd_user:
        raise typer.BadParameter("an etcd password needs --etcd-user")
    sessions = SessionConfig(
        lease_ttl=timedelta(seconds=lease_ttl),
        heartbeat_interval=timedelta(seconds=heartbeat),
        deadline_grace=timedelta(seconds=deadline_grace),
    )
    limits = _limits(
        limit or [],
        default_node_timeout_ms=round((default_node_timeout or 0) * 1000),
        max_run_timeout_ms=round(max_run_timeout_days * 86_400_000),
    )
    try:
        by_namespace = {
            name: timedelta(days=float(days))
            for name, _, days in (entry.partition("=") for entry in namespace_retention or ())
        }
    except ValueError as exc:
        raise typer.BadParameter(f"--namespace-retention takes NAMESPACE=DAYS: {exc}") from exc
    config = ServerConfig(
        host=host,
        port=port,
        limits=limits,
        sessions=sessions,
        retention=timedelta(days=retention_days),
        reconcile_interval=timedelta(seconds=reconcile_interval),
        namespace_retention=by_namespace,
        tls=ServerTls(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None,
        auth=auth_on,
        admin_token=admin_token,
    )
    if server_id:
        config = dataclasses.replace(config, server_id=server_id)
    if tls_cert is None and not is_loopback(host):
        log.warning(
            "INSECURE: serving %s in plain text (--insecure): anyone on the network can read "
            "and change this server's traffic",
            host,
        )
    embedded: EmbeddedEtcd | None = None
    endpoints = [e.strip() for e in etcd.split(",") if e.strip()]
    if not endpoints:
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        embedded = EmbeddedEtcd(data_dir=data_dir, name="floxide").start()
        endpoints = [embedded.endpoint]
        log.info("embedded etcd (development only) at %s", embedded.endpoint)
    try:
        event_loop.run(
            serve(
                endpoints,
                config,
                ready_file,
                timedelta(seconds=grace),
                etcd_retry,
                embedded=embedded is not None,
                etcd_tls=etcd_tls,
                etcd_auth=(etcd_user, etcd_password) if etcd_user else None,
            )
        )
    except FloxideError as exc:  # refused to start: etcd's storage format is another one
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except KVUnavailable as exc:  # etcd did not answer at startup
        typer.echo(f"error: etcd does not answer ({','.join(endpoints)}): {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except Exception as exc:  # a server-wide task failed: logged where it happened
        log.error("floxide-server stopped: %s", exc)
        raise typer.Exit(1) from None
    finally:
        if embedded is not None:
            embedded.stop(keep_data=data_dir is not None)


def main() -> None:
    """Entry point of the ``floxide-server`` console script."""
    app()
