"""Importance scorers (rankings): which visual tokens survive a drop. One module per method.

The registry is data in :mod:`schedsearch.scorer_specs` (name -> ``"module:Class"`` + typed parameters,
standard library only, shared with the schedule validator). :func:`build_scorer` checks the parameters
against that row, imports the module and builds the scorer; the runtime calls it once per schedule.

    scorer = build_scorer("diverse", {"spatial": 4})
    scores = scorer(ctx)          # ctx: ScoreContext (base.py) -> (B, V) >= 0, higher = kept first
"""

from __future__ import annotations

import importlib
from typing import Any

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers.base import ScoreContext, Scorer
from schedsearch.scorer_specs import SCORERS, ParamError, resolve_params

__all__ = ["ScoreContext", "Scorer", "build_scorer", "scorer_class"]


def scorer_class(name: str) -> type:
    """The class registered for ``name`` (imported now)."""
    spec = SCORERS.get(name)
    if spec is None:
        raise ScheduleError(f"scorer.name={name!r} is not known: use one of {', '.join(SCORERS)}")
    module, _, cls = spec.target.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, params: dict[str, Any] | None = None, importance: Any = None) -> Scorer:
    """Scorer from a schedule's ``scorer`` section (name + params); parameters are checked against the registry."""
    try:
        checked = resolve_params(name, params)
    except ParamError as err:
        raise ScheduleError(str(err)) from None
    cls = scorer_class(name)
    if getattr(cls, "takes_importance", False):  # External: the caller's map comes with the scorer
        return cls(importance, **checked)
    return cls(**checked)


def __getattr__(name: str) -> Any:  # ``from schedsearch.runtime.scorers import Diverse`` etc. (lazy)
    for spec in SCORERS.values():
        module, _, cls = spec.target.partition(":")
        if cls == name:
            return getattr(importlib.import_module(module), cls)
    raise AttributeError(name)
