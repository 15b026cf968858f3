"""The ``floxide`` command: inspect and drive floxide-grpc from a shell."""

import typer

from floxide_grpc import PROTOCOL_VERSION, __version__

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


def main() -> None:
    """Entry point of the ``floxide`` console script."""
    app()
