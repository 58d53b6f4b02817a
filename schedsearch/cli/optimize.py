"""``schedsearch optimize``: search a schedule under a budget, log to MLflow, write the frozen JSON."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from schedsearch.cli import app

DEFAULTS: dict[str, Any] = {
    "model": "toy", "calibration": None, "budget": None, "budget_kind": "flops", "method": "psigmoid",
    "sampler": "tpe", "trials": None, "timeout": None, "seed": 0, "storage": None, "study": None, "out": None,
    "tracking_uri": None, "heldout_fraction": 0.25, "batch_size": 16, "scorer": "auto",
    "rope": False, "tolerance": None, "step": 0.05, "experiment": "schedsearch",
}


def _merge(config: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    from schedsearch.config import load_config

    merged = dict(DEFAULTS)
    if config is not None:
        merged.update(load_config(config))
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


class _Progress:
    """Optuna callback: one status line per trial with the best value so far (stderr, no extra deps)."""

    def __init__(self, total: int | None):
        self.total = total  # None: not known in advance (gsearch without --trials): no bar, just the count
        self.done = 0
        self.t0 = time.perf_counter()

    def __call__(self, study: Any, trial: Any) -> None:
        self.done += 1  # trials of this invocation (a resumed study has earlier ones too)
        done = self.done
        values = trial.values or []
        val = "-" if not values else "/".join(f"{v:.5f}" for v in values)
        if len(study.directions) > 1:
            best = f"front of {len(study.best_trials)}"
        else:
            try:
                best = f"{study.best_value:.5f}"
            except ValueError:
                best = "-"
        width = 24
        from schedsearch.cli import PARTIAL_LINE

        if self.total is None:
            bar = f"trial {done}"
        else:
            fill = int(width * min(done, self.total) / max(1, self.total))
            bar = f"[{'#' * fill}{'.' * (width - fill)}] trial {done}/{self.total}"
        sys.stderr.write(f"\r{bar} value {val} best {best} ({time.perf_counter() - self.t0:.0f}s)")
        PARTIAL_LINE["open"] = True
        if self.total is not None and done >= self.total:
            self.close()
        sys.stderr.flush()

    def close(self) -> None:
        """End the status line (the search finished before --trials, or had no known total)."""
        from schedsearch.cli import PARTIAL_LINE

        if PARTIAL_LINE["open"]:
            sys.stderr.write("\n")
            PARTIAL_LINE["open"] = False


@app.command()
def optimize(
    model: str | None = typer.Option(None, "--model", "-m", help="Alias, directory or hub id (default: toy)."),
    calibration: Path | None = typer.Option(None, "--calibration", "-c", help="Manifest or directory."),
    budget: str | None = typer.Option(None, "--budget", "-b",
                                      help="Kept fraction, e.g. 0.2 (required); with --pareto a list: 0.1,0.2,0.3"),
    budget_kind: str | None = typer.Option(None, "--budget-kind", help="flops (default), tokens or kv."),
    method: str | None = typer.Option(None, "--method", help="psigmoid (default), pcosine, vflow or gsearch."),
    sampler: str | None = typer.Option(None, "--sampler", help="tpe, gp, cmaes, botorch, random, qmc."),
    trials: int | None = typer.Option(None, "--trials", "-n", help="Number of trials (default 40)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop after this many seconds."),
    config: Path | None = typer.Option(None, "--config", help="Study preset (TOML); flags win."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Schedule JSON to write."),
    seed: int | None = typer.Option(None, "--seed"),
    storage: str | None = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite file)."),
    study: str | None = typer.Option(None, "--study", help="Study name (default derived from the settings)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an existing study with the same name."),
    pareto: bool = typer.Option(False, "--pareto",
                                help="Two-objective study (discrepancy vs budget): one schedule per --budget value."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
    scorer: str | None = typer.Option(None, "--scorer",
                                      help="auto (searched, default), last_token_attention, text_attention, uniform, "
                                           "diverse, random."),
    rope: bool | None = typer.Option(None, "--rope/--no-rope", help="Attention scorers: rank with RoPE applied."),
    tolerance: float | None = typer.Option(None, "--tolerance",
                                              help="gsearch: cheapest schedule within this discrepancy."),
) -> None:
    """Find the schedule that best preserves the model's output under a FLOPs/tokens/KV budget."""
    s = _merge(config, dict(model=model, calibration=str(calibration) if calibration else None, budget=budget,
                            budget_kind=budget_kind, method=method, sampler=sampler, trials=trials,
                            timeout=timeout, out=str(out) if out else None, seed=seed, storage=storage,
                            study=study, tracking_uri=tracking_uri, tolerance=tolerance, scorer=scorer, rope=rope))
    from schedsearch.search.driver import run_optimize

    s["pareto"] = pareto
    total = None if s["trials"] is None and s["method"] == "gsearch" else int(s["trials"] or 40)
    run_optimize(s, resume=resume, progress=_Progress(total), echo=typer.echo)
