"""``schedsearch evaluate SCHEDULE --model M --calibration PATH``: measure a schedule on a model.

With a manifest whose every line has an ``answer`` (``--data DIR`` reads the same), the exact-match accuracy of
greedy answers is reported too, overall, per ``qtype`` and per ``region``, unpruned next to pruned.
"""

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
    calibration: Path = typer.Option(..., "--calibration", "-c", "--data",
                                     help="Calibration manifest (JSONL) or a directory holding manifest.jsonl."),
    batch_size: int = typer.Option(8, help="Samples per forward (grouped by visual-token count)."),
    limit: int | None = typer.Option(None, help="Use only the first N samples."),
    repeats: int = typer.Option(3, help="Timing repeats (median is reported)."),
    no_timing: bool = typer.Option(False, "--no-timing", help="Skip the prefill timing."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip exact-match accuracy (otherwise "
                                     "measured when every sample has an answer)."),
    max_new_tokens: int = typer.Option(4, help="Greedy answer length for the accuracy."),
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
    if not no_accuracy and samples and all(x.answer is not None for x in samples):
        from schedsearch.toy.eval import accuracy

        d["accuracy"] = {}
        for key, sc in (("unpruned", None), ("pruned", sched)):
            acc = accuracy(adapter, samples, schedule=sc, batch_size=batch_size, max_new_tokens=max_new_tokens)
            acc.pop("predictions")
            d["accuracy"][key] = acc
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
    if "accuracy" in d:
        _print_accuracy(d["accuracy"])


def _print_accuracy(acc: dict) -> None:
    """Exact match unpruned vs pruned: overall, then per question type and per region (n = questions)."""
    un, pr = acc["unpruned"], acc["pruned"]
    rows = [("overall", un["n"], un["overall"], pr["overall"])]
    for group, label in (("by_qtype", "qtype"), ("by_region", "region")):
        for k, v in un[group].items():
            rows.append((f"{label} {k}", un["counts"][label][k], v, pr[group][k]))
    width = max(len(r[0]) for r in rows)
    typer.echo(f"  exact-match accuracy{' ' * max(0, width - 18)}      n  unpruned  pruned")
    for name, n, a, b in rows:
        typer.echo(f"  {name:<{width}}  {n:>5}  {a:>8.3f}  {b:>6.3f}")
