"""The ``floxide-worker`` command."""

import typer

from floxide_grpc import __version__

app = typer.Typer(name="floxide-worker", add_completion=False)


@app.command()
def run(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Start the floxide-grpc worker."""
    if version:
        typer.echo(f"floxide-worker {__version__}")
        return
    typer.echo("floxide-worker: not built yet; the contracts are in proto/floxide/v1", err=True)
    raise typer.Exit(code=2)


def main() -> None:
    """Entry point of the ``floxide-worker`` console script."""
    app()
