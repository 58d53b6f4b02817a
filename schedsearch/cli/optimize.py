"""``schedsearch optimize``: search a schedule under a budget, log to MLflow, write the frozen JSON.

Settings are merged as defaults < ``--config`` preset < flags typed on the command line (a flag left at its
default does not override the preset: the parser says where each value came from). Every value is checked
before the model is loaded: choices by the option types, numbers by :data:`schedsearch.config.RANGES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from schedsearch.cli import app, choice, ranged
from schedsearch.config import check_range
from schedsearch.devices import DEVICE_HELP, DTYPE_HELP, DTYPES
from schedsearch.schedule import BUDGET_KINDS, SCORER_NAMES
from schedsearch.search.methods import METHODS
from schedsearch.search.optimize import SAMPLERS

#: --method: the parameterizations plus gsearch (a search loop of its own, not a parameterization)
METHOD_NAMES = (*METHODS, "gsearch")
#: --scorer: auto (searched) or a fixed ranking; ``external`` needs a map passed in code, not a flag
SCORER_FLAGS = ("auto", *(n for n in SCORER_NAMES if n != "external"))

DEFAULTS: dict[str, Any] = {
    "model": "toy", "calibration": None, "budget": None, "budget_kind": "flops", "method": "psigmoid",
    "sampler": "tpe", "trials": None, "timeout": None, "seed": 0, "storage": None, "study": None, "out": None,
    "tracking_uri": None, "heldout_fraction": 0.25, "batch_size": 16, "scorer": "auto",
    "rope": False, "tolerance": None, "step": 0.05, "experiment": "schedsearch", "device": "auto", "dtype": "auto",
}


def parse_budget(value: str | None) -> str | None:
    """``--budget``: one kept fraction, or with --pareto a comma-separated list; each in RANGES['budget']."""
    if value is None:
        return None
    from schedsearch.config import ConfigError

    parts = [p.strip() for p in str(value).split(",")]
    if not any(parts):
        raise ConfigError(f"--budget {value!r} is empty: give the kept fraction, e.g. --budget 0.2")
    for p in parts:
        try:
            b = float(p)
        except ValueError:
            raise ConfigError(f"--budget {value!r}: {p!r} is not a number (give e.g. --budget 0.2, "
                              "or with --pareto a list such as 0.1,0.2,0.3)") from None
        check_range("budget", b)
    return value


def _merge(ctx: typer.Context, config: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    from schedsearch.config import load_config

    typed = {k for k in flags if ctx.get_parameter_source(k) is not None
             and ctx.get_parameter_source(k).name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")}
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in flags.items() if v is not None})
    if config is not None:
        merged.update(load_config(config))
    merged.update({k: flags[k] for k in typed})
    return merged


@app.command()
def optimize(
    ctx: typer.Context,
    model: str = typer.Option(DEFAULTS["model"], "--model", "-m", help="Alias, directory or hub id."),
    calibration: Path | None = typer.Option(None, "--calibration", "-c",
                                            help="Manifest or directory.",
                                            show_default="calibration_data/toy for the toy model"),
    budget: str | None = typer.Option(None, "--budget", "-b", callback=parse_budget, metavar="[0<x<=1]",
                                      help="Kept fraction, e.g. 0.2 (required); with --pareto a list: 0.1,0.2,0.3"),
    budget_kind: choice(BUDGET_KINDS) = typer.Option(DEFAULTS["budget_kind"], "--budget-kind",
                                                     help="What the budget counts."),
    method: choice(METHOD_NAMES) = typer.Option(DEFAULTS["method"], "--method", help="Schedule family."),
    sampler: choice(SAMPLERS) = typer.Option(DEFAULTS["sampler"], "--sampler", help="Optuna sampler."),
    trials: int | None = typer.Option(DEFAULTS["trials"], "--trials", "-n",
                                      help="Trials this invocation runs (gsearch: cap on evaluations).",
                                      show_default="40; gsearch: the whole greedy search", **ranged("trials")),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop starting trials after this many seconds.",
                                         **ranged("timeout")),
    config: Path | None = typer.Option(None, "--config", help="Study preset (TOML); flags typed here win."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Schedule JSON to write.",
                                 show_default="schedules/<study>.json"),
    seed: int = typer.Option(DEFAULTS["seed"], "--seed", help="Sampler and split seed.", **ranged("seed")),
    storage: str | None = typer.Option(None, "--storage", help="Optuna storage URL.",
                                         show_default="sqlite:///.schedsearch/studies.db"),
    study: str | None = typer.Option(None, "--study", help="Study name.",
                                       show_default="derived from the settings"),
    resume: bool = typer.Option(False, "--resume", help="Continue an existing study with the same name."),
    pareto: bool = typer.Option(False, "--pareto",
                                help="Two-objective study (discrepancy vs budget): one schedule per --budget value."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI.",
                                              show_default="$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
    scorer: choice(SCORER_FLAGS) = typer.Option(DEFAULTS["scorer"], "--scorer",
                                                help="Token ranking; auto = searched with the schedule."),
    rope: bool = typer.Option(DEFAULTS["rope"], "--rope/--no-rope", help="Attention scorers: rank with RoPE."),
    tolerance: float | None = typer.Option(None, "--tolerance", help="gsearch: cheapest schedule within this "
                                                                     "discrepancy.", **ranged("tolerance")),
    batch_size: int = typer.Option(DEFAULTS["batch_size"], "--batch-size", help="Samples per forward pass.",
                                   **ranged("batch_size")),
    heldout_fraction: float = typer.Option(DEFAULTS["heldout_fraction"], "--heldout-fraction",
                                           help="Share of the calibration set kept for the held-out score.",
                                           **ranged("heldout_fraction")),
    device: str = typer.Option(DEFAULTS["device"], "--device", help=DEVICE_HELP),
    dtype: choice(DTYPES) = typer.Option(DEFAULTS["dtype"], "--dtype", help=DTYPE_HELP),
) -> None:
    """Find the schedule that best preserves the model's output under a FLOPs/tokens/KV budget."""
    from schedsearch.cli.progress import StudyProgress
    from schedsearch.devices import resolve_device, resolve_dtype

    s = _merge(ctx, config, dict(model=model, calibration=str(calibration) if calibration else None, budget=budget,
                                 budget_kind=budget_kind, method=method, sampler=sampler, trials=trials,
                                 timeout=timeout, out=str(out) if out else None, seed=seed, storage=storage,
                                 study=study, tracking_uri=tracking_uri, tolerance=tolerance, scorer=scorer,
                                 rope=rope, batch_size=batch_size, heldout_fraction=heldout_fraction,
                                 device=device, dtype=dtype))
    resolve_dtype(s["dtype"])
    s["device"] = resolve_device(s["device"])  # `--device cuda` without CUDA: one line, before any loading
    s["pareto"] = pareto
    from schedsearch.search.driver import run_optimize

    # gsearch without --trials runs the whole greedy search: its number of evaluations is not known in advance
    total = None if s["trials"] is None and s["method"] == "gsearch" else int(s["trials"] or 40)
    with StudyProgress(total, metric="1-cos") as progress:
        run_optimize(s, resume=resume, progress=progress, echo=progress.echo)
