"""Test helpers: waiting on conditions with deadlines, a TCP proxy that fails on demand, free
ports, processes started and always reaped, and an in-process server on etcd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from floxide_server.app import Server, ServerConfig
from floxide_server.etcd import EtcdKV

from tests.helpers.ports import FreePortFactory, free_port

__all__ = [
    "ADMIN_TOKEN",
    "FreePortFactory",
    "TcpProxy",
    "eventually",
    "finish",
    "free_port",
    "serving",
    "start_server",
    "stop_all",
    "stop_server",
]

T = TypeVar("T")

ADMIN_TOKEN = "fxt_tests-" + secrets.token_urlsafe(32)
"""The admin token of this test session, as ``floxide dev`` makes one: every server the tests
start stores it (``FLOXIDE_ADMIN_TOKEN``), and every client and worker calls with it
(``FLOXIDE_TOKEN``), in this process and in the processes it starts. Tests of tokens and roles
make tokens of their own."""
os.environ["FLOXIDE_ADMIN_TOKEN"] = os.environ["FLOXIDE_TOKEN"] = ADMIN_TOKEN


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
    replies are dropped: a request is applied and its reply is lost. A link that lost bytes is
    cut when the blackhole ends, as TCP would have ended it (TCP never loses bytes from a stream
    that goes on: a connection that lost frames, HTTP/2's flow-control updates among them, would
    be wedged forever otherwise). With ``latency`` set
    (seconds), each reply reaches the client that much later (in order, none held up by
    another): every round trip through the proxy is slowed, nothing is lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._blackhole = False
        self._lossy: set[asyncio.StreamWriter] = set()  # links that lost replies
        self.latency = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def blackhole(self) -> bool:
        """Whether replies are dropped now."""
        return self._blackhole

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self._blackhole = on
        if not on:  # what lost replies is cut: clients reconnect to a clean stream
            for writer in self._lossy:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()
            self._lossy.clear()

    async def start(self) -> TcpProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._links.update({writer, up_writer})
        await asyncio.gather(
            self._pipe(reader, up_writer, lambda: False, lambda: 0.0),
            self._pipe(up_reader, writer, lambda: self._drops(writer), lambda: self.latency),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        drop: Callable[[], bool],
        delay: Callable[[], float],
    ) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def send() -> None:  # in order, each chunk when it is due
            while (entry := await pending.get()) is not None:
                due, data = entry
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(65536):
                if sender.done():
                    break
                if not drop():
                    pending.put_nowait((loop.time() + delay(), data))
            pending.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            await asyncio.wait([sender])
            if not sender.cancelled():
                sender.exception()  # a link the other side closed: retrieved, not raised
            with contextlib.suppress(OSError, RuntimeError):  # closed already, or its loop
                writer.close()

    def _drops(self, writer: asyncio.StreamWriter) -> bool:
        if self._blackhole:
            self._lossy.add(writer)
        return self._blackhole

    def cut(self) -> None:
        """Close every open link (new connections are still accepted)."""
        for writer in list(self._links):
            with contextlib.suppress(OSError, RuntimeError):  # closed already, or its loop
                writer.close()
        self._links.clear()

    async def stop(self) -> None:
        """Stop listening, cut every link, and wait for the links' tasks to end."""
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self._server is not None:
            await self._server.wait_closed()


def start_server(
    *args: str,
    ready_file: str,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    unset: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``floxide-server`` as a process on a free port; return it and its address once ready.

    Its log goes to ``{ready_file}.log`` (a pipe nobody reads could fill up and block it). Its
    environment is the test's, with ``env`` added and ``unset`` removed; ``prefix`` is a
    command it runs under (``ip netns exec NS``: on a host of the test's). The caller stops it
    (``stop_server``); if it never gets ready, it is killed and reaped here.

    Raises:
        AssertionError: it exited, or was not ready within ``timeout`` seconds.
    """
    path = Path(ready_file)
    path.unlink(missing_ok=True)
    log = Path(f"{ready_file}.log")
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [
                *prefix,
                str(Path(sys.executable).parent / "floxide-server"),
                "--port",
                "0",
                "--ready-file",
                ready_file,
                *args,
            ],
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_text().endswith("\n")):
            if process.poll() is not None:
                raise AssertionError(
                    f"floxide-server exited with {process.returncode}: {log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"floxide-server was not ready in time: {log.read_text()[-3000:]}"
                )
            time.sleep(0.05)
    except BaseException:  # a timeout of the test's too: nothing outlives this call
        stop_server(process, signal.SIGKILL)
        raise
    return process, path.read_text().strip()


def stop_server(process: subprocess.Popen[Any], sig: int, timeout: float = 30.0) -> int:
    """Signal a process (a server, a worker) and wait for it; its exit code.

    Whatever happens, it is reaped and its pipes are closed on return: a process still running
    after ``timeout`` seconds is killed and waited for, then ``TimeoutExpired`` is raised.
    """
    try:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        return process.wait(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=30)
        raise
    finally:
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def stop_all(processes: Iterable[subprocess.Popen[Any]], sig: int = signal.SIGKILL) -> None:
    """``stop_server`` every process a test started, each one even if stopping another fails.

    Frozen processes too (sent SIGCONT first). A failure is raised once all are stopped.
    """
    with contextlib.ExitStack() as stack:
        for process in processes:
            stack.callback(_stop, process, sig)


def _stop(process: subprocess.Popen[Any], sig: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a frozen process acts on no other signal
    stop_server(process, sig)


async def finish(process: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """Read an asyncio subprocess's output to its end and wait for it, within ``timeout`` seconds.

    Whatever happens (a timeout, the test's task cancelled), the process is gone on return:
    killed if it still runs, and its pipes read to their end, which closes its transport.
    """
    try:
        return await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.wait_for(process.communicate(), 30)
        raise


@contextlib.asynccontextmanager
async def serving(
    endpoints: Sequence[str], config: ServerConfig, **kv_options: Any
) -> AsyncIterator[Server]:
    """An in-process server on etcd (``kv_options`` go to its EtcdKV), stopped on the way out."""
    kv = EtcdKV(list(endpoints), **kv_options)
    server = Server(kv, config)
    try:
        await server.start()
        yield server
    finally:
        try:
            await server.stop()  # raises what stopped the server, if something did
        finally:
            await kv.close()
