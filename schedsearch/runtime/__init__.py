"""Token-dropping runtime: apply a frozen schedule to a stock transformers VLM (no optuna/mlflow/typer here)."""

from schedsearch.runtime.apply import RuntimeScheduleError, ScheduleHandle, apply_schedule
from schedsearch.runtime.scorers import ScoreContext, build_scorer

__all__ = ["apply_schedule", "ScheduleHandle", "RuntimeScheduleError", "ScoreContext", "build_scorer"]
