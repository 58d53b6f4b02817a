"""``schedsearch validate FILE [--model M]``: check a schedule file (and that it fits a model)."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from schedsearch.cli import app


@app.command()
def validate(
    file: Path = typer.Argument(..., help="Schedule JSON file."),
    model: str | None = typer.Option(
        None, "--model", "-m",
        help="Also check it fits this model (alias, directory or hub id): layer count, fingerprint.",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Treat a model fingerprint or family mismatch as an error, not a warning."
    ),
) -> None:
    """Load and validate a schedule; print a one-paragraph summary. Exit 0 when valid (and compatible)."""
    from schedsearch.schedule import check_compatible, load_schedule

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = load_schedule(file)
        if model is not None:
            from schedsearch.models import load_model

            adapter = load_model(model)
            check_compatible(
                sched,
                num_layers=adapter.num_layers,
                fingerprint=adapter.fingerprint(),
                family=adapter.family,
                strict=strict,
            )
    for w in caught:  # one line each, never Python's two-line warning format
        typer.echo(f"warning: {' '.join(str(w.message).split())}", err=True)
    typer.echo(sched.summary())
    if model is not None:
        typer.echo(f"compatible with {model} ({adapter.num_layers} decoder layers).")
