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
    to: str = typer.Option("library", "--to", help="library (on-disk schedule library) or mlflow (model registry)."),
    home: Path | None = typer.Option(None, "--home", help="Library folder (default $SCHEDSEARCH_HOME/library)."),
    name: str | None = typer.Option(None, "--name", help="--to mlflow: registered model name."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="--to mlflow: base model reference to serve (default: the schedule's)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="--to mlflow: MLflow tracking URI."),
) -> None:
    """Store a schedule where runtimes pick it up (library) or register a servable MLflow model (mlflow)."""
    from schedsearch.library import Library, LibraryError
    from schedsearch.schedule import load_schedule

    sched = load_schedule(schedule)
    if to == "library":
        entry = Library(home).add(sched)
        typer.echo(f"stored {entry.id} in {entry.path.parent.parent.parent}")
        return
    if to == "mlflow":
        from schedsearch.serving import register

        ref = model or sched.model.name
        reg_name = name or f"schedsearch-{sched.model.family}-{sched.budget.kind}{sched.budget.requested:g}"
        reg_name, version = register(str(schedule), reg_name, ref, tracking_uri)
        typer.echo(f"registered models:/{reg_name}/{version} (base model {ref}); serve it with: "
                   f"mlflow models serve -m models:/{reg_name}/{version} --env-manager local --host 127.0.0.1")
        return
    raise LibraryError(f"--to {to!r} is not available: use --to library or --to mlflow")


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
    entries, damaged = Library(home).scan(fp)
    if not entries and not damaged:
        typer.echo("the library is empty" if fp is None else f"no schedules stored for {model}")
        return
    for e in entries:
        s = e.schedule
        obj = "-" if s.objective is None or s.objective.value is None else f"{s.objective.value:.5f}"
        ach = "-" if s.budget.achieved is None else f"{s.budget.achieved:.4f}"
        typer.echo(f"{e.id}  {s.model.name}  {s.budget.kind} {s.budget.requested:g} (achieved {ach})  "
                   f"objective {obj}  {s.method.name}")
    for d in damaged:  # listed, never skipped silently; `library remove ID` deletes one
        typer.echo(f"{d.id}  DAMAGED: {d.reason}")


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
