"""The orchestrator server, assembled in one place (as etcd's ``v3rpc/grpc.go``).

A :class:`Server` serves the orchestrator and store services over grpc.aio, with the error
interceptor, message size limits, keepalive, gRPC health (NOT_SERVING until etcd answers, and
whenever it stops answering) and server reflection. It holds no state of its own: etcd is the
only state, so any number of replicas may serve one cluster.

Its server-wide parts (the shared watches, dispatch, maintenance, the election, the health check)
run in one task group (:meth:`Server.run`): if one fails, the server stops and :meth:`Server.wait`
and :meth:`Server.stop` raise why, so that ``floxide-server`` exits non-zero for its supervisor to
restart it, instead of serving on with a dead loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from floxide_grpc._proto.floxide.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    store_service_pb2,
    worker_service_pb2,
)
from floxide_server.admin_service import AdminService
from floxide_server.auth import AuthInterceptor
from floxide_server.dispatch import Dispatcher
from floxide_server.election import MAINTENANCE, Election
from floxide_server.errors import ErrorInterceptor
from floxide_server.maintenance import Maintenance
from floxide_server.orchestrator import OrchestratorService
from floxide_server.sessions import SessionConfig, Sessions
from floxide_server.store import Store
from floxide_server.store.format import ensure_format
from floxide_server.store.kv import KV, KVUnavailable
from floxide_server.store.payloads import Limits
from floxide_server.store_services import add_store_services
from floxide_server.tasks import Ready, first_error, started
from floxide_server.tls import ServerTls
from floxide_server.tokens import Tokens
from floxide_server.watch import Watches
from floxide_server.worker_service import WorkerService, add_worker_service

__all__ = ["SERVICE_NAMES", "Server", "ServerConfig"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    *(s.full_name for s in orchestrator_service_pb2.DESCRIPTOR.services_by_name.values()),
    *(s.full_name for s in worker_service_pb2.DESCRIPTOR.services_by_name.values()),
    *(s.full_name for s in store_service_pb2.DESCRIPTOR.services_by_name.values()),
    *(s.full_name for s in admin_service_pb2.DESCRIPTOR.services_by_name.values()),
)
"""The floxide.v1 services this server serves (health reports each, reflection lists them)."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a server listens and behaves.

    Attributes:
        host: The address to bind; loopback unless told otherwise.
        port: The port to bind; 0 picks a free one (see :attr:`Server.port`).
        limits: Payload, context and definition size limits.
        max_message_bytes: The largest gRPC message taken or sent.
        health_interval: How often etcd's health is checked.
        grace: How long shutdown waits for calls in flight, and for draining workers.
        server_id: This replica's name (in worker sessions and logs).
        sessions: Worker sessions' lease TTL, heartbeat interval and credit limit.
        retention: How long finished runs are kept.
        reconcile_interval: How often running runs are checked for being stuck.
        namespace_retention: Retention periods of particular namespaces.
        election_ttl: The elected replica's lease TTL (a dead one is followed within it);
            the sessions' lease TTL by default.
        tls: TLS on the port (and mTLS); ``None``: plain text.
        auth: Whether calls need a bearer token (:mod:`.auth`); off only for development.
        admin_token: An admin token to store at start if missing; default ``FLOXIDE_ADMIN_TOKEN``.
            Without one, a store where no token was ever made gets one, printed once.
    """

    host: str = "127.0.0.1"
    port: int = 0
    limits: Limits = dataclasses.field(default_factory=Limits)
    max_message_bytes: int = 4 * 1024 * 1024
    health_interval: timedelta = timedelta(seconds=1)
    grace: timedelta = timedelta(seconds=10)
    server_id: str = dataclasses.field(default_factory=socket.gethostname)
    sessions: SessionConfig = dataclasses.field(default_factory=SessionConfig)
    retention: timedelta = timedelta(days=7)
    reconcile_interval: timedelta = timedelta(seconds=30)
    namespace_retention: Mapping[str, timedelta] = dataclasses.field(default_factory=dict)
    election_ttl: timedelta | None = None
    tls: ServerTls | None = None
    auth: bool = True
    admin_token: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("FLOXIDE_ADMIN_TOKEN") or None
    )


class Server:
    """An orchestrator replica on a KV: ``start()``, then ``stop()`` (idempotent)."""

    def __init__(self, kv: KV, config: ServerConfig | None = None) -> None:
        self.kv = kv
        self.config = config or ServerConfig()
        self.store = Store.open(kv, self.config.limits)
        self.workflows = self.store.workflows
        self.watches = Watches(kv)
        self.tokens = (
            Tokens(kv, self.watches, self.config.admin_token) if self.config.auth else None
        )
        self.sessions = Sessions(
            kv,
            self.workflows,
            self.store.claims,
            self.watches,
            self.config.sessions,
            self.config.server_id,
        )
        self.dispatcher = Dispatcher(self.store.claims, self.watches, self.sessions)
        self.workers = WorkerService(
            self.store,
            self.sessions,
            self.dispatcher,
            self.config.limits,
            self.config.sessions,
            self.config.server_id,
            self.tokens,
        )
        self.election = Election(
            kv,
            MAINTENANCE,
            self.config.server_id,
            self.config.election_ttl or self.config.sessions.lease_ttl,
        )
        self.maintenance = Maintenance(
            kv,
            self.sessions,
            self.watches,
            self.config.sessions.lease_ttl.total_seconds(),
            self.config.retention.total_seconds(),
            {ns: period.total_seconds() for ns, period in self.config.namespace_retention.items()},
            self.config.limits.max_txn_ops,
            self.config.reconcile_interval.total_seconds(),
            self.election,
            self.store.lineage,
        )
        self.stopping = asyncio.Event()
        self.port = 0
        self._health = health.aio.HealthServicer()
        self._grace = self.config.grace
        self._runner: asyncio.Task[None] | None = None

    def _grpc_server(self) -> grpc.aio.Server:
        """The grpc.aio server with every service, health and reflection (not yet bound)."""
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if self.tokens is not None:  # inside the errors' interceptor: its refusals become statuses
            interceptors.append(AuthInterceptor(self.tokens))
        server = grpc.aio.server(interceptors=interceptors, options=options)
        if self.tokens is not None:
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
                AdminService(self.tokens), server
            )
        orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorService(self.store, self.sessions, self.watches, self.stopping), server
        )
        add_worker_service(server, self.workers)
        add_store_services(server, self.store, self.sessions, self.watches)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def start(self) -> int:
        """Bind and serve (:meth:`run` in a task of the server's own); returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("the server was already started")
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self.run(ready), name="floxide-server")
        either: list[asyncio.Future[Any]] = [ready, self._runner]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # it could not start: raise why, once (stop() has nothing to do)
            failed, self._runner = self._runner, None
            failed.result()
        return ready.result()

    async def run(self, ready: Ready[int]) -> None:
        """Serve until :meth:`stop`; ``ready`` gets the bound port once serving.

        Raises:
            OSError: the address cannot be bound.
            Exception: a server-wide part failed (logged): the server has stopped.
        """
        await ensure_format(self.kv)  # refuses an etcd of another storage format, before binding
        server = self._grpc_server()
        # The asyncio health servicer starts out SERVING: say NOT_SERVING before anyone asks.
        await self._set_health(serving=False)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.config.tls.credentials())
        if not self.port:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                parts = [
                    (await started(tasks, part))[1]
                    for part in (
                        self.watches.run,
                        *([self.tokens.run] if self.tokens is not None else []),
                        self.dispatcher.run,
                        self.sessions.deadlines.run,
                        self.maintenance.run,
                        self.election.run,
                    )
                ]
                await self._check_health()
                parts.append(tasks.create_task(self._watch_health()))
                log.info(
                    "floxide server %s listening on %s:%d (%s)",
                    self.config.server_id,
                    self.config.host,
                    self.port,
                    _transport(self.config.tls),
                )
                ready.set_result(self.port)
                await self.stopping.wait()
                await self._shut_down(server)
                for task in parts:
                    task.cancel()
        except BaseExceptionGroup as group:
            error = first_error(group)
            log.critical("the server stops: a server-wide task failed", exc_info=error)
            raise error from None
        finally:
            self.stopping.set()  # waits still open end with UNAVAILABLE
            await server.stop(0)

    async def _shut_down(self, server: grpc.aio.Server) -> None:
        """Stop gracefully: health says so, workers drain, calls in flight finish (bounded)."""
        await self._health.enter_graceful_shutdown()
        await self.workers.drain(self._grace)
        await server.stop(self._grace.total_seconds())
        # grpc does not wait for its handlers: each stream's session ends (its lease revoked)
        # before the parts it uses stop.
        if not await self.sessions.wait_closed(self._grace.total_seconds()):
            log.warning("%d sessions still open at shutdown", len(self.sessions.live))

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _check_health(self) -> bool:
        try:
            await asyncio.wait_for(self.kv.ping(), self.config.health_interval.total_seconds() * 3)
        except (KVUnavailable, TimeoutError, grpc.aio.AioRpcError) as exc:
            log.warning("etcd does not answer: %s", exc)
            await self._set_health(serving=False)
            return False
        await self._set_health(serving=True)
        return True

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval.total_seconds())
            await self._check_health()

    async def stop(self, grace: timedelta | None = None) -> None:
        """Stop: end waits with UNAVAILABLE, finish calls in flight within the grace period.

        Idempotent.

        Raises:
            Exception: the failure that had stopped the server, if one did.
        """
        if grace is not None:
            self._grace = grace
        self.stopping.set()
        await self.wait()

    async def wait(self) -> None:
        """Return when the server has stopped.

        Raises:
            Exception: the failure that stopped it, if one did.
        """
        if self._runner is not None:
            await asyncio.shield(self._runner)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _transport(tls: ServerTls | None) -> str:
    if tls is None:
        return "plain text"
    return "TLS, client certificates required" if tls.client_ca is not None else "TLS"
