"""The ``floxide`` command: run and inspect floxide-grpc workflows from a shell."""

from __future__ import annotations

import asyncio
import enum
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated

import typer

from floxide_grpc import PROTOCOL_VERSION, __version__, codec
from floxide_grpc.errors import FloxideError
from floxide_grpc.runner import LocalRunner
from floxide_grpc.workflow import Workflow

app = typer.Typer(
    name="floxide",
    help="Run and inspect floxide-grpc workflows.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Run and inspect floxide-grpc workflows."""


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


class GraphFormat(enum.StrEnum):
    """Drawing formats."""

    DOT = "dot"
    MERMAID = "mermaid"


@app.command()
def graph(
    target: Annotated[str, typer.Argument(help="FILE.py[:NAME] or MODULE[:NAME].")],
    format: Annotated[GraphFormat, typer.Option("--format", "-f")] = GraphFormat.MERMAID,
) -> None:
    """Print a workflow's graph as Mermaid or Graphviz DOT."""
    workflow = load_workflow(target)
    try:
        drawing = workflow.to_dot() if format is GraphFormat.DOT else workflow.to_mermaid()
    except FloxideError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(drawing, nl=False)


def main() -> None:
    """Entry point of the ``floxide`` console script."""
    app()
