"""The ``floxide`` command: run workflows locally, and start, follow and control runs on a server.

Server commands take ``--server host:port`` (or ``FLOXIDE_SERVER``), ``--namespace`` (or
``FLOXIDE_NAMESPACE``) and the TLS options of :mod:`floxide_grpc.tls` (``--tls-ca`` and the
rest, or ``FLOXIDE_TLS_*``); their errors are printed as ``error: ...`` with exit code 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import importlib
import importlib.util
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table

from floxide_grpc import _codec as codec
from floxide_grpc._graph import Graph
from floxide_grpc._proto.floxide.v1 import workflow_pb2
from floxide_grpc._version import PROTOCOL_VERSION, __version__
from floxide_grpc.client import OrchestratorClient
from floxide_grpc.errors import FloxideError
from floxide_grpc.records import Role, RunInfo, RunStatus, WorkerInfo
from floxide_grpc.runner import LocalRunner
from floxide_grpc.tls import CaOption, CertOption, KeyOption, NameOption, Tls, TlsOption
from floxide_grpc.workflow import Workflow

T = TypeVar("T")
console = Console()
DEFAULT_SERVER = "127.0.0.1:50051"

__all__ = ["app", "main"]

app = typer.Typer(
    name="floxide",
    help="Run and inspect floxide-grpc workflows.",
    no_args_is_help=True,
    add_completion=False,
)


@dataclasses.dataclass
class _Target:
    server: str
    namespace: str
    tls: Tls | None = None


@app.callback()
def _root(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option(envvar="FLOXIDE_SERVER", help="The server's host:port.")
    ] = DEFAULT_SERVER,
    namespace: Annotated[
        str, typer.Option(envvar="FLOXIDE_NAMESPACE", help="The namespace.")
    ] = "default",
    tls: TlsOption = False,
    tls_ca: CaOption = None,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
    tls_server_name: NameOption = None,
) -> None:
    """Run and inspect floxide-grpc workflows."""
    try:
        chosen = Tls.of(
            ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name, enabled=tls
        )
    except FloxideError as exc:
        raise typer.BadParameter(str(exc)) from exc
    ctx.obj = _Target(server, namespace, chosen)


def _remote(ctx: typer.Context, call: Callable[[OrchestratorClient], Awaitable[T]]) -> T:
    """Run one client call against the server; print a server error and exit 1."""
    target: _Target = ctx.obj

    async def go() -> T:
        async with OrchestratorClient(
            target.server, namespace=target.namespace, tls=target.tls
        ) as client:
            return await call(client)

    try:
        return asyncio.run(go())
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


def _print_run(run: RunInfo) -> None:
    table = Table(show_header=False, box=None)
    for name, value in (
        ("run", run.run_id),
        ("workflow", run.workflow),
        ("definition", run.definition_hash),
        ("status", run.status.value),
        ("input", json.dumps(run.input)),
        ("output", json.dumps(run.output) if run.status is RunStatus.COMPLETED else ""),
        ("error", run.error or ""),
        ("created", str(run.created_at or "")),
        ("finished", str(run.finished_at or "")),
        ("run timeout", str(run.run_timeout or "")),
        ("parent", f"{run.parent_run_id} (item {run.parent_item_id})" if run.parent_run_id else ""),
    ):
        table.add_row(f"[bold]{name}[/]", value)
    console.print(table)


@app.command()
def version() -> None:
    """Print the SDK's version and the worker protocol version it speaks."""
    typer.echo(f"floxide-grpc {__version__} (protocol {PROTOCOL_VERSION})")


def load_workflow(target: str) -> Workflow:
    """Load ``path/to/file.py:name`` or ``package.module:name`` (``name`` defaults to workflow).

    Raises:
        typer.BadParameter: the file, module or attribute is missing, or is not a Workflow.
    """
    where, _, attribute = target.partition(":")
    attribute = attribute or "workflow"
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            name = f"floxide_target_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None or not path.exists():
                raise typer.BadParameter(f"no Python file at {where}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses resolve their annotations through it
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {where}: {exc}") from exc
    workflow = getattr(module, attribute, None)
    if not isinstance(workflow, Workflow):
        raise typer.BadParameter(f"{where} has no Workflow named {attribute!r}")
    return workflow


@app.command()
def run(
    target: Annotated[
        str, typer.Argument(help="FILE.py[:NAME] or MODULE[:NAME]; NAME defaults to 'workflow'.")
    ],
    input: Annotated[str, typer.Option("--input", "-i", help="The run's input, as JSON.")] = "null",
) -> None:
    """Run a workflow in this process and print its output as JSON."""
    workflow = load_workflow(target)
    try:
        value = codec.decode(input.encode(), where="--input")
        output = asyncio.run(LocalRunner(workflow).run(value))
        typer.echo(codec.encode(output, where="output").decode())
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc


@app.command()
def runs(
    ctx: typer.Context,
    status: Annotated[
        list[RunStatus] | None, typer.Option(help="Only runs in this state (repeatable).")
    ] = None,
    workflow: Annotated[str, typer.Option(help="Only runs of this workflow.")] = "",
    limit: Annotated[int, typer.Option(help="How many runs to list.")] = 20,
    children: Annotated[
        bool, typer.Option("--children", help="List child runs (nested workflows') too.")
    ] = False,
    parent: Annotated[str, typer.Option(help="Only the child runs of this run.")] = "",
) -> None:
    """List runs, newest first."""
    found, _ = _remote(
        ctx,
        lambda c: c.list_runs(
            statuses=tuple(status or ()),
            workflow=workflow,
            page_size=limit,
            parent_run_id=parent,
            include_children=children,
        ),
    )
    table = Table("run", "workflow", "status", "created", "finished")
    for run in found:
        table.add_row(
            run.run_id,
            run.workflow,
            run.status.value,
            str(run.created_at or ""),
            str(run.finished_at or ""),
        )
    console.print(table)


@app.command()
def status(ctx: typer.Context, run_id: str) -> None:
    """Show one run: its definition, its parent or children, and what no worker serves."""

    async def gather(client: OrchestratorClient) -> tuple[RunInfo, list[RunInfo], list[str]]:
        run = await client.get_run(run_id)
        found, _ = await client.list_runs(parent_run_id=run_id, page_size=1000)
        unserved: list[str] = []
        if not run.status.finished:
            pending = await client.work_items(run_id, pending_only=True)
            workers = await client.workers()
            unserved = sorted(
                {item.node for item in pending if not _served(run, item.node, workers)}
            )
        return run, found, unserved

    run, children, unserved = _remote(ctx, gather)
    _print_run(run)
    for name in unserved:
        console.print(
            f"[yellow]waiting: node {name!r} of definition {run.definition_hash} is served by "
            "no connected worker[/]",
            highlight=False,
        )
    if children:
        table = Table("child run", "of item", "workflow", "status", title="child runs")
        for child in children:
            table.add_row(child.run_id, child.parent_item_id, child.workflow, child.status.value)
        console.print(table)


def _served(run: RunInfo, node_name: str, workers: list[WorkerInfo]) -> bool:
    """Whether a connected worker serves a node of the run's definition."""
    return any(
        (workflow, served) == (run.workflow, node_name) and hash_ in ("", run.definition_hash)
        for worker in workers
        for workflow, served, hash_ in worker.nodes
    )


workflows_app = typer.Typer(
    help="Registered workflows and their definitions.", no_args_is_help=True
)
app.add_typer(workflows_app, name="workflows")


@workflows_app.command("list")
def workflows_list(ctx: typer.Context) -> None:
    """Every registered definition: which is current, when registered, which workers serve it."""
    table = Table("workflow", "definition", "current", "registered", "served by")
    for found in _remote(ctx, lambda c: c.workflow_versions()):
        table.add_row(
            found.name,
            found.definition_hash,
            "current" if found.current else "",
            str(found.registered_at or ""),
            ", ".join(found.served_by),
        )
    console.print(table)


@workflows_app.command("promote")
def workflows_promote(ctx: typer.Context, name: str, definition_hash: str) -> None:
    """Make a registered definition NAME's current one again (new runs start on it)."""
    found = _remote(ctx, lambda c: c.promote_workflow(name, definition_hash))
    typer.echo(f"{found.name}: {found.definition_hash} is current")


token_app = typer.Typer(help="Tokens: who may call the server, as what (an admin's).")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for people: 'ci', 'billing workers'.")],
    role: Annotated[Role, typer.Option(help="What it may do.")],
    allow: Annotated[
        list[str] | None,
        typer.Option(help="A namespace it may act in (repeatable; an admin's: every one)."),
    ] = None,
    expires: Annotated[
        datetime.datetime | None,
        typer.Option(help="When it stops working (ISO 8601; UTC unless it says)."),
    ] = None,
) -> None:
    """Make a token and print it, once: the server keeps only its hash."""
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=datetime.UTC)
    token, info = _remote(
        ctx, lambda c: c.create_token(name, role, allow or (), expires_at=expires)
    )
    typer.echo(token)
    scope = ", ".join(info.namespaces) or "every namespace"
    typer.echo(f"# token {info.id} ({info.role.value}, {scope}): shown once, keep it", err=True)


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """The tokens in force (never their secrets)."""
    table = Table("name", "role", "namespaces", "created", "expires")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=16))  # whole: revoke takes it
    for info in _remote(ctx, lambda c: c.tokens()):
        table.add_row(
            info.id,
            info.name,
            info.role.value,
            ", ".join(info.namespaces) or "*",
            _minute(info.created_at),
            _minute(info.expires_at) if info.expires_at else "never",
        )
    console.print(table)


def _minute(when: datetime.datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC") if when else ""


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str) -> None:
    """Revoke a token by id: its calls are refused, its open worker streams end."""
    found = _remote(ctx, lambda c: c.revoke_token(token_id))
    if not found:
        typer.echo(f"error: no token in force has the id {token_id}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"revoked {token_id}")


def _progress(run: RunInfo, metrics: Any) -> Table:
    table = Table(
        "run", "status", "items", "completed", "in progress", "pending", "failed", "retries"
    )
    table.add_row(
        run.run_id,
        run.status.value,
        str(metrics.total_work_items),
        str(metrics.completed),
        str(metrics.in_progress),
        str(metrics.pending + metrics.waiting_retry),
        str(metrics.failed),
        str(metrics.retries),
    )
    return table


@app.command()
def start(
    ctx: typer.Context,
    workflow: str,
    input: Annotated[str, typer.Option("--input", "-i", help="The run's input, as JSON.")] = "null",
    wait: Annotated[
        bool, typer.Option(help="Follow the run to its end, with a live view.")
    ] = False,
    idempotency_key: Annotated[str, typer.Option(help="Start at most one run per key.")] = "",
    run_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds the whole run may take, paused time included (default: any)."),
    ] = None,
) -> None:
    """Start a run of a registered workflow."""
    try:
        value = json.loads(input)
    except ValueError as exc:
        typer.echo(f"error: --input: not valid JSON: {exc}", err=True)
        raise typer.Exit(code=1) from exc

    async def go(client: OrchestratorClient) -> RunInfo:
        run, _ = await client.start_run(
            workflow, value, idempotency_key=idempotency_key or None, run_timeout=run_timeout
        )
        if not wait:
            return run
        with Live(_progress(run, await client.run_metrics(run.run_id)), console=console) as live:
            watcher = client.watch_run(run.run_id)
            while not run.status.finished:
                update = asyncio.ensure_future(anext(watcher))
                done, _ = await asyncio.wait({update}, timeout=0.5)
                if done:
                    run = update.result()
                else:
                    update.cancel()
                live.update(_progress(run, await client.run_metrics(run.run_id)))
        return run

    run = _remote(ctx, go)
    _print_run(run)
    if wait and run.status is not RunStatus.COMPLETED:
        raise typer.Exit(code=1)


@app.command()
def cancel(ctx: typer.Context, run_id: str, reason: str = "") -> None:
    """Cancel a run."""
    _print_run(_remote(ctx, lambda c: c.cancel_run(run_id, reason)))


@app.command()
def pause(ctx: typer.Context, run_id: str) -> None:
    """Pause a run."""
    _print_run(_remote(ctx, lambda c: c.pause_run(run_id)))


@app.command()
def resume(ctx: typer.Context, run_id: str) -> None:
    """Resume a paused or failed run."""
    _print_run(_remote(ctx, lambda c: c.resume_run(run_id)))


@app.command()
def errors(ctx: typer.Context, run_id: str) -> None:
    """List a run's failed attempts."""
    table = Table("item", "node", "attempt", "kind", "message", "at")
    for error in _remote(ctx, lambda c: c.run_errors(run_id)):
        table.add_row(
            error.item_id,
            error.node,
            str(error.attempt),
            error.kind,
            error.message,
            str(error.occurred_at or ""),
        )
    console.print(table)


@app.command()
def workers(
    ctx: typer.Context,
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Also the sessions that ended recently.")
    ] = False,
) -> None:
    """List the connected workers (with --all, the recently ended ones too)."""
    columns = ["session", "worker", "status", "liveness", "slots", "in flight", "last heartbeat"]
    table = Table(*columns, *(["ended"] if all_ else []))
    for worker in _remote(ctx, lambda c: c.workers(include_dead=all_)):
        row = [
            worker.session_id,
            worker.worker_id,
            worker.status,
            worker.liveness,
            str(worker.slots),
            str(worker.in_flight),
            str(worker.last_heartbeat or ""),
        ]
        table.add_row(*row, *([str(worker.ended_at or "")] if all_ else []))
    console.print(table)


class GraphFormat(enum.StrEnum):
    """Drawing formats."""

    DOT = "dot"
    MERMAID = "mermaid"


@app.command()
def graph(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="A registered workflow's name, or FILE.py[:NAME] / MODULE:NAME.")
    ],
    format: Annotated[GraphFormat, typer.Option("--format", "-f")] = GraphFormat.MERMAID,
) -> None:
    """Print a workflow's graph as Mermaid or Graphviz DOT."""
    if target.endswith(".py") or ":" in target:
        try:
            drawn = Graph(load_workflow(target).definition())
        except FloxideError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from exc
    else:
        found = _remote(ctx, lambda c: c.get_workflow(target)).definition or {}
        drawn = Graph(json_format.ParseDict(found, workflow_pb2.WorkflowDefinition()))
    typer.echo(drawn.to_dot() if format is GraphFormat.DOT else drawn.to_mermaid(), nl=False)


@app.command()
def certs(
    directory: Annotated[Path, typer.Argument(help="Where to write the PEM files.")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="A DNS name or IP address the server is reached by (repeatable)."
        ),
    ] = None,
    new_ca: Annotated[
        bool,
        typer.Option(
            "--new-ca", help="Make a new CA even if DIRECTORY has one (orphans its certificates)."
        ),
    ] = False,
) -> None:
    """Make a development CA, a server certificate and a client certificate (for mTLS).

    A CA already in DIRECTORY is kept (new certificates signed by it) unless --new-ca.

    The server's names are localhost, 127.0.0.1 and ::1, plus each --host. For machines of
    your own: in production, certificates come from your organisation's CA.
    """
    from floxide_grpc._certs import make_authority  # noqa: PLC0415 - cryptography, only here

    hosts = ["localhost", "127.0.0.1", "::1", *(host or [])]
    authority = make_authority(directory, reuse=not new_ca)
    server = authority.issue("floxide server", hosts=hosts)
    client = authority.issue("floxide client", client=True)
    typer.echo(f"CA:     {authority.cert} (key {authority.key})")
    typer.echo(f"server: {server.cert} (key {server.key}) for {', '.join(hosts)}")
    typer.echo(f"client: {client.cert} (key {client.key})")
    typer.echo(
        f"serve:  floxide-server --tls-cert {server.cert} --tls-key {server.key} "
        f"[--tls-client-ca {authority.cert}]"
    )
    typer.echo(
        f"reach:  FLOXIDE_TLS_CA={authority.cert} [FLOXIDE_TLS_CERT={client.cert} "
        f"FLOXIDE_TLS_KEY={client.key}] floxide runs"
    )


DEV_TARGET = "examples/order_chain.py"
_TLS_VARIABLES = ("FLOXIDE_TLS", "FLOXIDE_SERVER_TLS")
DEV_INPUT = '{"id": 1, "amount": 25.0, "card": "visa"}'


@app.command()
def dev(
    target: Annotated[
        str, typer.Argument(help="FILE.py[:NAME] or MODULE[:NAME] with the workflow.")
    ] = DEV_TARGET,
    input: Annotated[str, typer.Option("--input", "-i", help="The run's input, as JSON.")] = "",
    workers: Annotated[int, typer.Option(help="How many worker processes.")] = 2,
    slots: Annotated[int, typer.Option(help="Slots of each worker.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds the whole run may take.")] = 120.0,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls", help="Over TLS, client certificates required (a development CA of its own)."
        ),
    ] = False,
) -> None:
    """Run the whole stack here, end to end, then stop it.

    An embedded etcd and a server, worker processes serving the workflow, and one run of it;
    prints the run's output.
    """
    from floxide_grpc._loading import load_workflows  # noqa: PLC0415

    try:
        workflow = load_workflows(target)[0]
        value = json.loads(input or (DEV_INPUT if target == DEV_TARGET else "null"))
    except (FloxideError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    try:
        output = asyncio.run(_dev(target, workflow, value, workers, slots, timeout, tls=tls))
    except (FloxideError, TimeoutError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(json.dumps(output))


async def _dev(
    target: str,
    workflow: Workflow,
    value: Any,
    workers: int,
    slots: int,
    timeout: float,
    *,
    tls: bool = False,
) -> Any:
    import signal  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    bin_dir = Path(sys.executable).parent
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="floxide-dev-") as tmp:
        ready = Path(tmp) / "server"
        serving, reaching, client_tls = _dev_tls(Path(tmp) / "certs") if tls else ([], [], None)
        token = "fxt_dev-" + secrets.token_urlsafe(32)  # this stack's admin token, for all
        env = {  # this stack's own: not the TLS settings of the shell it runs in
            **{k: v for k, v in os.environ.items() if not k.startswith(_TLS_VARIABLES)},
            "FLOXIDE_ADMIN_TOKEN": token,
            "FLOXIDE_TOKEN": token,
        }
        try:
            async with asyncio.timeout(timeout):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        str(bin_dir / "floxide-server"),
                        "--port",
                        "0",
                        "--ready-file",
                        str(ready),
                        "--log-level",
                        "warning",
                        *serving,
                        env=env,
                    )
                )
                while not (ready.exists() and ready.read_text().endswith("\n")):
                    if processes[0].returncode is not None:
                        raise RuntimeError("floxide-server exited before serving")
                    await asyncio.sleep(0.05)
                server = ready.read_text().strip()
                transport = "mTLS" if tls else "plain text"
                console.print(
                    f"[dim]server on {server} ({transport}, embedded etcd)[/]", highlight=False
                )
                for n in range(workers):
                    processes.append(
                        await asyncio.create_subprocess_exec(
                            str(bin_dir / "floxide-worker"),
                            target,
                            "--server",
                            server,
                            "--slots",
                            str(slots),
                            "--worker-id",
                            f"dev-worker-{n + 1}",
                            "--log-level",
                            "warning",
                            *reaching,
                            env=env,
                        )
                    )
                async with OrchestratorClient(server, tls=client_tls, token=token) as client:
                    while len(await client.workers()) < workers:
                        if any(p.returncode is not None for p in processes):
                            raise RuntimeError("a worker exited before connecting")
                        await asyncio.sleep(0.05)
                    console.print(
                        f"[dim]{workers} workers connected; running {workflow.name}[/]",
                        highlight=False,
                    )
                    run, _ = await client.start_run(workflow.name, value)
                    final = await client.wait_for_completion(run.run_id)
                    console.print(
                        f"[dim]run {final.run_id}: {final.status.value}[/]", highlight=False
                    )
                    if final.status is not RunStatus.COMPLETED:
                        raise RuntimeError(
                            f"run {final.run_id} {final.status.value}: {final.error}"
                        )
                    return final.output
        finally:
            for process in reversed(processes):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in reversed(processes):
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def _dev_tls(directory: Path) -> tuple[list[str], list[str], Tls]:
    """A development CA for ``floxide dev --tls``: the server's flags, workers', the client's."""
    from floxide_grpc._certs import make_authority  # noqa: PLC0415 - cryptography, only here

    authority = make_authority(directory)
    server = authority.issue("floxide dev server", hosts=["localhost", "127.0.0.1"])
    client = authority.issue("floxide dev client", client=True)
    serving = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    serving += ["--tls-client-ca", str(authority.cert)]
    reaching = ["--tls-ca", str(authority.cert), "--tls-cert", str(client.cert)]
    reaching += ["--tls-key", str(client.key)]
    return serving, reaching, Tls(ca=authority.cert, cert=client.cert, key=client.key)


def main() -> None:
    """Entry point of the ``floxide`` console script."""
    app()
