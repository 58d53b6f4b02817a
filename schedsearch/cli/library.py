"""``schedsearch export`` and ``schedsearch library list|show|remove``."""

from __future__ import annotations

from pathlib import Path

import typer

from schedsearch.cli import app

library_app = typer.Typer(help="The on-disk schedule library ($SCHEDSEARCH_HOME).", no_args_is_help=True)
app.add_typer(library_app, name="library")


@app.command()
def export(
    schedule: Path = typer.Argument(..., help="Schedule JSON file."),
    to: str = typer.Option("library", "--to", help="library (the on-disk schedule library)."),
    home: Path | None = typer.Option(None, "--home", help="Library folder (default $SCHEDSEARCH_HOME/library)."),
) -> None:
    """Store a schedule where runtimes pick it up: `apply_schedule(model, budget=0.2)`."""
    from schedsearch.library import Library, LibraryError
    from schedsearch.schedule import load_schedule

    if to != "library":
        raise LibraryError(f"--to {to!r} is not available: use --to library")
    entry = Library(home).add(load_schedule(schedule))
    typer.echo(f"stored {entry.id} in {entry.path.parent.parent.parent}")


@library_app.command("list")
def list_(
    model: str | None = typer.Option(None, "--model", "-m", help="Only this model (loaded for its fingerprint)."),
    home: Path | None = typer.Option(None, "--home"),
) -> None:
    """One line per stored schedule: id, model, budget (requested/achieved), objective, method."""
    from schedsearch.library import Library

    fp = None
    if model is not None:
        from schedsearch.models import load_model

        fp = load_model(model).fingerprint()
    entries = Library(home).entries(fp)
    if not entries:
        typer.echo("the library is empty" if fp is None else f"no schedules stored for {model}")
        return
    for e in entries:
        s = e.schedule
        obj = "-" if s.objective is None or s.objective.value is None else f"{s.objective.value:.5f}"
        ach = "-" if s.budget.achieved is None else f"{s.budget.achieved:.4f}"
        typer.echo(f"{e.id}  {s.model.name}  {s.budget.kind} {s.budget.requested:g} (achieved {ach})  "
                   f"objective {obj}  {s.method.name}")


@library_app.command()
def show(entry_id: str = typer.Argument(...), home: Path | None = typer.Option(None, "--home")) -> None:
    """Print a stored schedule's JSON."""
    from schedsearch.library import Library

    typer.echo(Library(home).get(entry_id).schedule.to_json(), nl=False)


@library_app.command()
def remove(entry_id: str = typer.Argument(...), home: Path | None = typer.Option(None, "--home")) -> None:
    """Delete one stored version."""
    from schedsearch.library import Library

    typer.echo(f"removed {Library(home).remove(entry_id)}")
