"""The ``floxide-worker`` command: serve the nodes of some workflows for a server."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated

import grpc
import typer

from floxide_grpc import __version__
from floxide_grpc import loop as event_loop
from floxide_grpc.errors import FloxideError
from floxide_grpc.loading import load_workflows
from floxide_worker.worker import Worker, WorkerConfig

app = typer.Typer(name="floxide-worker", add_completion=False)
log = logging.getLogger("floxide_worker")


async def serve(worker: Worker) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(worker.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.shutdown()))
    await runner


@app.command()
def run(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Modules or FILE.py with workflows (MODULE:NAME for one of them)."),
    ] = None,
    server: Annotated[
        str, typer.Option(envvar="FLOXIDE_SERVER", help="The server's host:port.")
    ] = "127.0.0.1:50051",
    namespace: Annotated[
        str, typer.Option(envvar="FLOXIDE_NAMESPACE", help="The namespace.")
    ] = "default",
    slots: Annotated[int, typer.Option(help="How many items to run at once.")] = 8,
    worker_id: Annotated[str, typer.Option(help="This worker's name.")] = "",
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
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    config = WorkerConfig(server=server, namespace=namespace, slots=slots)
    if worker_id:
        config = WorkerConfig(server=server, namespace=namespace, slots=slots, worker_id=worker_id)
    try:
        event_loop.run(serve(Worker(workflows, config)))
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    except grpc.aio.AioRpcError as exc:  # the server refused this worker's hello
        typer.echo(f"error: the server refused this worker: {exc.details()}", err=True)
        raise typer.Exit(code=1) from exc


def main() -> None:
    """Entry point of the ``floxide-worker`` console script."""
    app()
