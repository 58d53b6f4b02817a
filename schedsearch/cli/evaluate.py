"""``schedsearch evaluate SCHEDULE --model M --calibration PATH``: measure a schedule on a model.

With a manifest whose every line has an ``answer`` (``--data DIR`` reads the same), the exact-match accuracy of
greedy answers is reported too, overall, per ``qtype`` and per ``region``, unpruned next to pruned.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from schedsearch.cli import app, choice, ranged
from schedsearch.devices import DEVICE_HELP, DTYPE_HELP, DTYPES


@app.command()
def evaluate(
    schedule: Path = typer.Argument(..., help="Schedule JSON file."),
    model: str | None = typer.Option(None, "--model", "-m",
                                        help="Model alias, directory or hub id.",
                                     show_default="the schedule's model"),
    calibration: Path = typer.Option(..., "--calibration", "-c", "--data",
                                     help="Calibration manifest (JSONL) or a directory holding manifest.jsonl."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward (grouped by visual-token count).",
                                   **ranged("batch_size")),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N samples.", show_default="all",
                                     **ranged("limit")),
    repeats: int = typer.Option(3, "--repeats", help="Timed passes (after two warm-up passes; the mean is reported).",
                                **ranged("repeats")),
    no_timing: bool = typer.Option(False, "--no-timing", help="Skip the prefill timing."),
    no_accuracy: bool = typer.Option(False, "--no-accuracy", help="Skip exact-match accuracy (otherwise "
                                     "measured when every sample has an answer)."),
    max_new_tokens: int = typer.Option(4, "--max-new-tokens", help="Greedy answer length for the accuracy.",
                                       **ranged("max_new_tokens")),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: choice(DTYPES) = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """FLOPs ratio, KV ratio, layer-averaged keep, last-token discrepancy and measured prefill time."""
    from schedsearch.calibration import load_manifest
    from schedsearch.devices import load_kwargs
    from schedsearch.evaluation import evaluate_schedule
    from schedsearch.models import load_model
    from schedsearch.schedule import check_compatible, load_schedule

    sched = load_schedule(schedule)
    samples = load_manifest(calibration)  # cheap checks first: fail before loading a model
    where = load_kwargs(device, dtype)  # `--device cuda` without CUDA: one line, before loading
    adapter = load_model(model or sched.model.name, **where)
    check_compatible(sched, num_layers=adapter.num_layers, fingerprint=adapter.fingerprint(), family=adapter.family)
    if limit is not None:
        samples = samples[:limit]
    report = evaluate_schedule(adapter, sched, samples, batch_size=batch_size, repeats=repeats,
                               timing=not no_timing)
    d = report.to_dict()
    d.update({"schedule": str(schedule), "model": adapter.name_or_path, "device": str(adapter.model.device),
              "dtype": str(adapter.model.dtype).removeprefix("torch.")})
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
    from schedsearch.tables import table

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
        ("prefill speed-up", d["prefill_speedup"]),
    ]
    title = (f"{sched.method.name if sched.method else 'schedule'} on {adapter.name_or_path} "
             f"({d['device']}, {d['dtype']})")
    typer.echo(table(["measure", "value"], rows, title=title))
    if "accuracy" in d:
        typer.echo(_accuracy_table(d["accuracy"]))


def _accuracy_table(acc: dict) -> str:
    """Exact match unpruned vs pruned: overall, then per question type and per region (n = questions)."""
    from schedsearch.tables import table

    un, pr = acc["unpruned"], acc["pruned"]
    rows = [("overall", un["n"], un["overall"], pr["overall"])]
    for group, label in (("by_qtype", "qtype"), ("by_region", "region")):
        for k, v in un[group].items():
            rows.append((f"{label} {k}", un["counts"][label][k], v, pr[group][k]))
    return table(["exact-match accuracy", "n", "unpruned", "pruned"], rows, digits=3, fixed=True)
