"""The ``floxide-worker`` command: serve the nodes of some workflows for a server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Annotated

import grpc
import typer

from floxide_grpc import _loop as event_loop
from floxide_grpc._loading import load_workflows
from floxide_grpc._version import __version__
from floxide_grpc.errors import FloxideError
from floxide_grpc.tls import CaOption, CertOption, KeyOption, NameOption, Tls, TlsOption
from floxide_worker.worker import Worker, WorkerConfig

__all__ = ["app", "main"]

app = typer.Typer(name="floxide-worker", add_completion=False)
log = logging.getLogger("floxide_worker")


async def serve(worker: Worker) -> None:
    """Run ``worker`` until SIGTERM or SIGINT, then drain it.

    ``worker.run()`` and a task waiting for the signal share one ``asyncio.TaskGroup``: the
    signal handler only sets an event, and the waiter drains the worker (``shutdown()``), which
    ends ``run()``; when ``run()`` ends, the waiter is cancelled.

    Raises:
        Whatever ``worker.run()`` raised (a refused hello, say), as itself.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, signalled.set)

    async def drain_when_signalled() -> None:
        await signalled.wait()
        log.info("draining: finishing what this worker holds, taking nothing new")
        await worker.shutdown()

    failed: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(worker.run(), name="floxide-worker run")
            waiter = tasks.create_task(drain_when_signalled(), name="floxide-worker drain")
            running.add_done_callback(lambda _: waiter.cancel())
    except BaseExceptionGroup as group:  # only run() fails: the waiter raises nothing
        if len(group.exceptions) > 1:
            raise
        failed = group.exceptions[0]
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    if failed is not None:
        raise failed


def _describe(exc: BaseException) -> str:
    """An exception as one line: its type and message, or those of each in a group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@app.command()
def run(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Modules or FILE.py with workflows (MODULE:NAME for one of them)."),
    ] = None,
    server: Annotated[
        str,
        typer.Option(
            envvar="FLOXIDE_SERVER",
            help="The server's host:port, or several replicas' (comma-separated, tried in turn).",
        ),
    ] = "127.0.0.1:50051",
    namespace: Annotated[
        str, typer.Option(envvar="FLOXIDE_NAMESPACE", help="The namespace.")
    ] = "default",
    slots: Annotated[int, typer.Option(help="How many items to run at once.")] = 8,
    worker_id: Annotated[str, typer.Option(help="This worker's name.")] = "",
    tls: TlsOption = False,
    tls_ca: CaOption = None,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
    tls_server_name: NameOption = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Serve the nodes of the given workflows: one stream to the server, work pushed to it."""
    if version:
        typer.echo(f"floxide-worker {__version__}")
        return
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not targets:
        typer.echo("error: name at least one module or file with workflows", err=True)
        raise typer.Exit(code=2)
    try:
        workflows = [w for target in targets for w in load_workflows(target)]
        chosen = Tls.of(
            ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name, enabled=tls
        )
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    config = WorkerConfig(server=server, namespace=namespace, slots=slots, tls=chosen)
    if worker_id:
        config = dataclasses.replace(config, worker_id=worker_id)
    try:
        event_loop.run(serve(Worker(workflows, config)))
    except Exception as exc:  # run() failed: one line says why (and --log-level debug, where)
        log.debug("the worker stopped on an error", exc_info=exc)
        if isinstance(exc, FloxideError):  # the server refused it: a registration, a hello
            message = f"the server refused this worker: {exc}"
        elif isinstance(exc, grpc.aio.AioRpcError):
            message = f"the server refused this worker: {exc.details()}"
        else:
            message = f"the worker stopped: {_describe(exc)}"
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=1) from exc


def main() -> None:
    """Entry point of the ``floxide-worker`` console script."""
    app()
