"""Test helpers: waiting on conditions with deadlines, a TCP proxy that fails on demand, free
ports, server processes, and an in-process server on etcd."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from floxide_server.app import Server, ServerConfig
from floxide_server.etcd import EtcdKV

from tests.helpers.ports import FreePortFactory, free_port

__all__ = [
    "FreePortFactory",
    "TcpProxy",
    "eventually",
    "free_port",
    "serving",
    "start_server",
    "stop_server",
]

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 10.0, interval: float = 0.05
) -> T:
    """Await ``probe`` until it returns something truthy; fail ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {result!r})")
        await asyncio.sleep(interval)


class TcpProxy:
    """A loopback TCP proxy in the test's event loop that can swallow replies or cut links.

    With ``blackhole`` set, bytes from the client still reach the server but the server's
    replies are dropped: a request is applied and its reply is lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._links.update({writer, up_writer})
        await asyncio.gather(
            self._pipe(reader, up_writer, lambda: False),
            self._pipe(up_reader, writer, lambda: self.blackhole),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, drop: Callable[[], bool]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if not drop():
                    writer.write(data)
                    await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def cut(self) -> None:
        """Close every open link (new connections are still accepted)."""
        for writer in list(self._links):
            with contextlib.suppress(Exception):
                writer.close()
        self._links.clear()

    async def stop(self) -> None:
        """Cut every link and stop listening."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def start_server(
    *args: str, ready_file: str, timeout: float = 60.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``floxide-server`` as a process on a free port; return it and its address once ready.

    Its log goes to ``{ready_file}.log`` (a pipe nobody reads could fill up and block it).

    Raises:
        AssertionError: it exited, or was not ready within ``timeout`` seconds.
    """
    path = Path(ready_file)
    path.unlink(missing_ok=True)
    log = Path(f"{ready_file}.log")
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "floxide-server"),
                "--port",
                "0",
                "--ready-file",
                ready_file,
                *args,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if process.poll() is not None:
            raise AssertionError(
                f"floxide-server exited with {process.returncode}: {log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"floxide-server was not ready in time: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process, path.read_text().strip()


def stop_server(process: subprocess.Popen[bytes], sig: int, timeout: float = 30.0) -> int:
    """Signal a server process and wait for it; its exit code."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    return process.wait(timeout=timeout)


@contextlib.asynccontextmanager
async def serving(
    endpoints: Sequence[str], config: ServerConfig, **kv_options: Any
) -> AsyncIterator[Server]:
    """An in-process server on etcd (``kv_options`` go to its EtcdKV), stopped on the way out."""
    kv = EtcdKV(list(endpoints), **kv_options)
    server = Server(kv, config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await kv.close()
