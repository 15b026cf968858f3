"""The orchestrator server, assembled in one place (as etcd's ``v3rpc/grpc.go``).

A :class:`Server` serves the orchestrator and store services over grpc.aio, with the error
interceptor, message size limits, keepalive, gRPC health (NOT_SERVING until etcd answers, and
whenever it stops answering) and server reflection. It holds no state of its own: etcd is the
only state, so any number of replicas may serve one cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Mapping
from datetime import timedelta
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from floxide_grpc._proto.floxide.v1 import (
    orchestrator_service_pb2,
    orchestrator_service_pb2_grpc,
    store_service_pb2,
    worker_service_pb2,
)
from floxide_server.dispatch import Dispatcher
from floxide_server.errors import ErrorInterceptor
from floxide_server.maintenance import Maintenance
from floxide_server.orchestrator import OrchestratorService
from floxide_server.store.format import ensure_format
from floxide_server.store.kv import KV, KVUnavailable
from floxide_server.store.payloads import Limits
from floxide_server.store.runs import RunStore
from floxide_server.store.workflows import WorkflowStore
from floxide_server.store_services import add_store_services
from floxide_server.watch import Watches
from floxide_server.worker_service import SessionConfig, WorkerService, add_worker_service

__all__ = ["SERVICE_NAMES", "Server", "ServerConfig"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    *(s.full_name for s in orchestrator_service_pb2.DESCRIPTOR.services_by_name.values()),
    *(s.full_name for s in worker_service_pb2.DESCRIPTOR.services_by_name.values()),
    *(s.full_name for s in store_service_pb2.DESCRIPTOR.services_by_name.values()),
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
        namespace_retention: Retention periods of particular namespaces.
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
    namespace_retention: Mapping[str, timedelta] = dataclasses.field(default_factory=dict)


class Server:
    """An orchestrator replica on a KV: ``start()``, then ``stop()`` (idempotent)."""

    def __init__(self, kv: KV, config: ServerConfig | None = None) -> None:
        self.kv = kv
        self.config = config or ServerConfig()
        self.workflows = WorkflowStore(kv, self.config.limits)
        self.runs = RunStore(kv, self.workflows, self.config.limits)
        self.watches = Watches(kv)
        self.dispatcher = Dispatcher(self.runs, self.watches)
        self.workers = WorkerService(
            kv,
            self.workflows,
            self.runs,
            self.dispatcher,
            self.config.limits,
            self.config.sessions,
            self.config.server_id,
        )
        self.maintenance = Maintenance(
            kv,
            self.runs,
            self.watches,
            self.config.sessions.lease_ttl.total_seconds(),
            self.config.retention.total_seconds(),
            {ns: period.total_seconds() for ns, period in self.config.namespace_retention.items()},
        )
        self.stopping = asyncio.Event()
        self.port = 0
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def _stale_after_ms(self) -> int:
        """A worker unheard for three heartbeats is stale (its lease may still stand)."""
        return int(self.config.sessions.heartbeat_interval.total_seconds() * 3000)

    async def start(self) -> int:
        """Bind, serve, and start watching etcd's health; returns the bound port."""
        await ensure_format(self.kv)  # refuses an etcd of another storage format, before binding
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=options)
        orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorService(
                self.kv,
                self.workflows,
                self.runs,
                self.watches,
                self.stopping,
                self._stale_after_ms,
            ),
            server,
        )
        add_worker_service(server, self.workers)
        add_store_services(
            server,
            self.kv,
            self.workflows,
            self.runs,
            self.watches,
            self.config.limits,
            self._stale_after_ms,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        # The asyncio health servicer starts out SERVING: say NOT_SERVING before anyone asks.
        await self._set_health(serving=False)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if not self.port:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        await self._check_health()
        self._tasks.append(asyncio.create_task(self._watch_health()))
        self.maintenance.start()
        log.info(
            "floxide server %s listening on %s:%d",
            self.config.server_id,
            self.config.host,
            self.port,
        )
        return self.port

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
        while not self.stopping.is_set():
            await asyncio.sleep(self.config.health_interval.total_seconds())
            await self._check_health()

    async def stop(self, grace: timedelta | None = None) -> None:
        """Stop: end waits with UNAVAILABLE, finish calls in flight within the grace period."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping.set()
        await self._health.enter_graceful_shutdown()
        await self.workers.drain(grace or self.config.grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.stop((grace or self.config.grace).total_seconds())
        await self.maintenance.close()
        await self.dispatcher.close()
        await self.watches.close()

    async def wait(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

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
