"""Searchable schedule families: an Optuna trial's parameters -> budget-matched keep ratios.

Each method declares its search space through ``suggest(trial, ctx)`` and returns a
:class:`Candidate`; the budget is met inside the method (one parameter solved by bisection), so
every trial is feasible. ``optuna.trial.FixedTrial(best.params)`` replays the winner through the
very same code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from schedsearch.search.budget import BudgetFn, solve_increasing
from schedsearch.search.fixed import BASELINE_SCORERS, BASELINES
from schedsearch.search.psigmoid import pcosine, psigmoid


@dataclass
class SearchContext:
    num_layers: int
    budget_fn: BudgetFn
    target: float
    kind: str
    scorer: dict = field(default_factory=lambda: {"name": "auto"})
    #: the stride-3 grid's share of the visual tokens on the calibration images (``fixed.feather_grid_share``);
    #: the ``feather`` baseline's union size depends on it (None: 1/9, LLaVA's 24 x 24 grid)
    grid_share: float | None = None
    #: with scorer "auto": label -> scorer section the trials choose from (search/screen.py); None = SCORER_CHOICES
    choices: dict[str, dict] | None = None


@dataclass
class Candidate:
    ratios: list[float]
    params: dict[str, Any]  # solved / derived values (the sampled ones are in trial.params)
    scorer: dict
    recycling: dict | None = None

    def as_schedule_dict(self) -> dict:
        return {"keep_ratios": self.ratios, "scorer": self.scorer, "recycling": self.recycling}


class Method(Protocol):
    name: str

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate: ...


# the fixed table --scorer auto chose from before the screen (search/screen.py); kept for studies started then
SCORER_CHOICES: dict[str, dict] = {
    "last_token": {"name": "last_token_attention", "params": {"rope": True}},
    "last_token_norope": {"name": "last_token_attention", "params": {"rope": False}},
    "text": {"name": "text_attention", "params": {"rope": False}},
    "uniform": {"name": "uniform", "params": {}},
    # max-min diversity with a spatial term (runtime/scorers/diverse.py); its weight is searched on a log grid
    "diverse_s1": {"name": "diverse", "params": {"spatial": 1.0}},
    "diverse_s4": {"name": "diverse", "params": {"spatial": 4.0}},
    "diverse_s16": {"name": "diverse", "params": {"spatial": 16.0}},
}


def pick_scorer(trial: Any, ctx: SearchContext) -> dict:
    """The fixed scorer, or with ``{"name": "auto"}`` a categorical parameter ``scorer`` of the trial over
    ``ctx.choices`` (the screen's best rankings and composites, search/screen.py)."""
    if ctx.scorer.get("name") != "auto":
        return ctx.scorer
    table = ctx.choices if ctx.choices is not None else SCORER_CHOICES
    return table[trial.suggest_categorical("scorer", list(table))]


class PSigmoid:
    """Sigmoid over depth (Zhao et al., arXiv 2412.00556): steepness k, floor fraction phi; midpoint solved."""

    name = "psigmoid"
    searches_scorer = True  # --scorer auto: the ranking is a trial parameter (pick_scorer)

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate:
        k = trial.suggest_float("k", 2.0, 60.0, log=True)
        phi = trial.suggest_float("phi", 0.0, 0.95)
        ratios, solved = psigmoid(ctx.num_layers, ctx.budget_fn, ctx.target, k, phi)
        return Candidate(ratios, solved, pick_scorer(trial, ctx))


class PCosine:
    """Shifted cosine over depth (p-MoD, arXiv 2412.04449): width w, floor fraction phi; start solved."""

    name = "pcosine"
    searches_scorer = True

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate:
        w = trial.suggest_float("w", 0.05, 1.0)
        phi = trial.suggest_float("phi", 0.0, 0.95)
        ratios, solved = pcosine(ctx.num_layers, ctx.budget_fn, ctx.target, w, phi)
        return Candidate(ratios, solved, pick_scorer(trial, ctx))


def twostage_ratios(num_layers: int, r0: float, layer: int, f: float) -> list[float]:
    return [r0 if i < layer else r0 * f for i in range(num_layers)]


class TwoStage:
    """Two stages over depth: keep r0 from layer 0, then ``f * r0`` from layer ``l`` on; l and f searched, r0
    solved for the budget. The shape the field's one-drop profiles share: FastV (arXiv 2403.06764) is r0 = 1 with a
    drop at K, ToDRE (arXiv 2505.18757) is f = 0 (every visual token dropped at mid depth), a flat schedule is
    f = 1; the search picks where and how much (our parameterization)."""

    name = "twostage"
    searches_scorer = True

    def suggest(self, trial: Any, ctx: SearchContext) -> Candidate:
        n = ctx.num_layers
        layer = trial.suggest_int("l", 1, max(1, n - 1))
        f = trial.suggest_float("f", 0.0, 1.0)
        r0 = solve_increasing(lambda x: ctx.budget_fn(twostage_ratios(n, x, layer, f)), ctx.target, 0.0, 1.0)
        return Candidate(twostage_ratios(n, r0, layer, f), {"r0": r0}, pick_scorer(trial, ctx))


def _vflow() -> Method:
    from schedsearch.search.vflow import VFlow  # imports this module: resolved lazily

    return VFlow()


METHODS: dict[str, Callable[[], Method]] = {"psigmoid": PSigmoid, "pcosine": PCosine, "twostage": TwoStage,
                                            "vflow": _vflow}


def baseline_candidate(name: str, ctx: SearchContext) -> Candidate:
    """A budget-matched fixed baseline (fastv, pdrop, divprune, feather, uniform, ...) as a Candidate."""
    if name == "feather" and ctx.grid_share is not None:
        ratios, params = BASELINES[name](ctx.num_layers, ctx.budget_fn, ctx.target, grid_share=ctx.grid_share)
    else:
        ratios, params = BASELINES[name](ctx.num_layers, ctx.budget_fn, ctx.target)
    scorer = BASELINE_SCORERS.get(name) or {"name": "uniform", "params": {}}
    return Candidate(ratios, params, scorer)
