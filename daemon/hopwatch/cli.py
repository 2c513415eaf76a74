"""Command line: a thin shell over the library (uvicorn habit)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def run() -> None:
    """Run the daemon (live eBPF capture)."""
    typer.echo("hopwatch run: live capture is not built yet (issue 3)", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()
