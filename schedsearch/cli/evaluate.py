"""``schedsearch evaluate SCHEDULE --model M --calibration PATH``: measure a schedule on a model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from schedsearch.cli import app


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@app.command()
def evaluate(
    schedule: Path = typer.Argument(..., help="Schedule JSON file."),
    model: str | None = typer.Option(None, "--model", "-m",
                                        help="Model alias, directory or hub id (default: the schedule's model)."),
    calibration: Path = typer.Option(..., "--calibration", "-c",
                                     help="Calibration manifest (JSONL) or a directory holding manifest.jsonl."),
    batch_size: int = typer.Option(8, help="Samples per forward (grouped by visual-token count)."),
    limit: int | None = typer.Option(None, help="Use only the first N samples."),
    repeats: int = typer.Option(3, help="Timing repeats (median is reported)."),
    no_timing: bool = typer.Option(False, "--no-timing", help="Skip the prefill timing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """FLOPs ratio, KV ratio, layer-averaged keep, last-token discrepancy and measured prefill time."""
    from schedsearch.calibration import load_manifest
    from schedsearch.evaluation import evaluate_schedule
    from schedsearch.models import load_model
    from schedsearch.schedule import check_compatible, load_schedule

    sched = load_schedule(schedule)
    samples = load_manifest(calibration)  # cheap checks first: fail before loading a model
    adapter = load_model(model or sched.model.name)
    check_compatible(sched, num_layers=adapter.num_layers, fingerprint=adapter.fingerprint(), family=adapter.family)
    if limit is not None:
        samples = samples[:limit]
    report = evaluate_schedule(adapter, sched, samples, batch_size=batch_size, repeats=repeats,
                               timing=not no_timing)
    d = report.to_dict()
    d.update({"schedule": str(schedule), "model": adapter.name_or_path})
    if as_json:
        typer.echo(json.dumps(d, sort_keys=True))
        return
    rows = [
        ("samples", d["n_samples"]),
        ("visual / text tokens (mean)", f"{d['n_visual_mean']:.1f} / {d['n_text_mean']:.1f}"),
        ("FLOPs ratio (decoder prefill)", d["flops_ratio"]),
        ("KV-cache ratio", d["kv_ratio"]),
        ("layer-averaged visual keep", d["token_ratio"]),
        ("discrepancy 1-cos (mean)", d["discrepancy"]),
        ("discrepancy 1-cos (max)", d["discrepancy_max"]),
        ("prefill ms unpruned", d["prefill_ms_unpruned"]),
        ("prefill ms pruned", d["prefill_ms_pruned"]),
        ("prefill time ratio", d["prefill_time_ratio"]),
    ]
    width = max(len(k) for k, _ in rows)
    typer.echo(f"{sched.method.name if sched.method else 'schedule'} on {adapter.name_or_path}")
    for k, v in rows:
        typer.echo(f"  {k:<{width}}  {_fmt(v)}")
