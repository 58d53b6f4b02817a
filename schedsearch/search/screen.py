"""``--scorer auto``: screen every registered ranking once, then let the trials choose among the best few.

Searching the ranking as one more categorical parameter over every registered scorer (20 with the variants below)
would spend most trials on rankings that are far from the best at this budget. So, before the first trial:

1. **Screen** (:func:`screen`): every ranking in :func:`screen_candidates` -- each registered scorer with its
   registry defaults (the authors' published settings), plus the variants the search used before (attention
   without RoPE, diversity with a stronger spatial term) -- is scored ONCE on the search split with the
   budget-matched flat schedule (the same keep ratio at every layer from layer 0, ``search.fixed.uniform``): one
   pruned forward over the search split each, i.e. about one trial each. A ranking the model cannot serve (e.g.
   a vision-encoder ranking on a family without vision maps) is recorded with its one-line reason and left out.
2. **Choices** (:func:`auto_choices`): the ``top`` best screened rankings, plus ``composite`` rankings of the
   best two (rank fusion and FEATHER-style union) and of the best three (rank fusion) different rankings (the best
   variant of each scorer name: mixing ``diverse`` at two spatial weights would add little). Trials pick one of these
   with the categorical parameter ``scorer`` (labels from :func:`label`); ``optuna.trial.FixedTrial`` replays the
   winner through the same table (``SearchContext.choices``).

What the screen measured (per ranking: label, scorer section, discrepancy, seconds, or the reason it was left
out) and the choices it produced are stored on the Optuna study (user attrs ``scorer_screen`` and
``scorer_choices``; a resumed study or another worker reuses the stored choices, so every process searches the
same categorical space) and logged on the MLflow run (``schedsearch optimize``: metrics ``screen_<label>`` and the
artifact ``scorer_screen.json``). Screens are cached on the :class:`~schedsearch.search.objective.Objective` per
(budget kind, target, split), so methods searching the same budget on one objective screen once.

The two profiles are a proxy: a ranking that is best under them is not always best under a searched depth-varying
schedule, which is why the trials still choose among several, and composites hedge. (With the flat profile
alone, the toy model's screen at FLOPs 0.5 offered only attention rankings and flowcut, and psigmoid's held-out
1 - cos was 0.0088, against 0.0025 in the sweep before the screen, whose fixed choices included ``diverse``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from schedsearch.errors import SchedsearchError
from schedsearch.scorer_specs import NOT_MEMBERS

#: rankings the screen adds besides every registered scorer's defaults: label suffix -> (name, params)
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("last_token_attention", {"rope": False}),
    ("text_attention", {"rope": False}),
    ("diverse", {"spatial": 4.0}),
    ("diverse", {"spatial": 16.0}),
)
#: registered scorers that are never screened: ``external`` needs a caller's map, ``composite`` is built from the
#: screen's results
NOT_SCREENED = ("external", "composite")
TOP = 4  # single rankings offered to the trials


def label(scorer: dict) -> str:
    """A short stable name for a scorer section: ``name`` for registry defaults, else ``name:k=v,...``;
    composites ``rank(a+b)`` / ``union(a+b)`` over their parts' labels."""
    from schedsearch.scorer_specs import SCORERS, resolve_params

    name, params = scorer["name"], dict(scorer.get("params") or {})
    if name == "composite":
        checked = resolve_params(name, params)
        return f"{checked['mode']}(" + "+".join(label(p) for p in checked["members"]) + ")"
    spec = SCORERS.get(name)
    defaults = {k: kind.default for k, kind in spec.params.items()} if spec else {}
    diff = {k: v for k, v in sorted(params.items()) if defaults.get(k, object()) != v and v is not None}
    if not diff:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in diff.items())


def screen_candidates() -> dict[str, dict]:
    """label -> scorer section: every registered ranking (defaults) except :data:`NOT_SCREENED`, plus VARIANTS."""
    from schedsearch.scorer_specs import SCORERS

    out = {}
    for name in SCORERS:
        if name not in NOT_SCREENED:
            sc = {"name": name, "params": {}}
            out[label(sc)] = sc
    for name, params in VARIANTS:
        if name in SCORERS:
            sc = {"name": name, "params": dict(params)}
            out[label(sc)] = sc
    return out


def flat_ratios(obj: Any, kind: str, target: float) -> list[float]:
    """The budget-matched flat schedule the screen uses (one keep ratio from layer 0 on)."""
    from schedsearch.search.fixed import uniform

    ratios, _ = uniform(obj.adapter.num_layers, obj.budget_fn(kind), target)
    return ratios


def late_ratios(obj: Any, kind: str, target: float) -> list[float] | None:
    """The screen's second profile: every token up to a quarter of the depth, then one budget-matched keep ratio
    (FastV's shape, ``search.fixed.fastv`` with K = L/4, lowered if the budget needs it); None when it would be
    the flat profile (K = 0) or is out of reach."""
    from schedsearch.search.budget import InfeasibleBudget
    from schedsearch.search.fixed import fastv

    n = obj.adapter.num_layers
    try:
        ratios, info = fastv(n, obj.budget_fn(kind), target, k=max(1, round(n / 4)))
    except InfeasibleBudget:
        return None
    return ratios if info["K"] > 0 else None


def profiles(obj: Any, kind: str, target: float) -> dict[str, list[float]]:
    """The budget-matched schedules every ranking is screened under: ``flat`` (drop before layer 0) and, where it
    exists, ``late`` (drop after a quarter of the depth). A ranking's screen value is its best over the two: which
    tokens matter depends on where they are dropped (at layer 0 the decoder has not mixed text and image yet), and
    the searched profiles span both."""
    out = {"flat": flat_ratios(obj, kind, target)}
    late = late_ratios(obj, kind, target)
    if late is not None:
        out["late"] = late
    return out


def screen(obj: Any, kind: str, target: float, *, split: str = "search",
           candidates: dict[str, dict] | None = None) -> list[dict]:
    """Rows ``{label, scorer, values: {profile: discrepancy}, profile, value (the best of them), seconds[, error]}``,
    best (lowest value) first, failures last.

    Cached on ``obj`` per (kind, target, split, candidate labels)."""
    cands = candidates if candidates is not None else screen_candidates()
    key = (kind, round(float(target), 12), split, tuple(cands))
    cache = obj.__dict__.setdefault("_scorer_screens", {})
    if key in cache:
        return [dict(r) for r in cache[key]]
    shapes = profiles(obj, kind, target)
    keep = sum(shapes["flat"]) / len(shapes["flat"])
    rows = []
    for lab, sc in cands.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = {"label": lab, "scorer": sc, "keep": keep}
        try:
            row["values"] = {name: obj.score({"keep_ratios": ratios, "scorer": sc}, split=split)
                             for name, ratios in shapes.items()}
            row["profile"] = min(row["values"], key=row["values"].get)
            row["value"] = row["values"][row["profile"]]
        except SchedsearchError as err:  # this model cannot serve the ranking: one line, left out
            row["value"], row["error"] = None, " ".join(str(err).split())
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    rows.sort(key=lambda r: (r["value"] is None, r["value"] if r["value"] is not None else 0.0))
    cache[key] = rows
    return [dict(r) for r in rows]


def composite(parts: Sequence[dict], mode: str = "rank") -> dict:
    return {"name": "composite", "params": {"members": [{"name": p["name"], "params": dict(p.get("params") or {})}
                                                      for p in parts], "mode": mode}}


def auto_choices(rows: Sequence[dict], top: int = TOP, composites: bool = True) -> dict[str, dict]:
    """label -> scorer section offered to the trials: the ``top`` best screened rankings, then composites of the
    best two (rank fusion, union) and the best three (rank fusion)."""
    ok = [r for r in rows if r.get("value") is not None]
    if not ok:
        raise SchedsearchError("--scorer auto: no ranking could be scored on this model (every one was refused)")
    out = {r["label"]: r["scorer"] for r in ok[:top]}
    distinct: dict[str, dict] = {}  # the best variant of each ranking: composites mix different rankings
    for r in ok:
        if r["scorer"]["name"] not in NOT_MEMBERS:  # vflow's map is wired to a top-level scorer only
            distinct.setdefault(r["scorer"]["name"], r["scorer"])
    if composites and len(distinct) >= 2:
        best = list(distinct.values())[:3]
        mixes = [composite(best[:2], "rank"), composite(best[:2], "union")]
        if len(best) >= 3:
            mixes.append(composite(best[:3], "rank"))
        for sc in mixes:
            out[label(sc)] = sc
    return out


def choices_for_study(study: Any, obj: Any, kind: str, target: float) -> tuple[dict[str, dict], list[dict] | None]:
    """(choices, screen rows or None): the study's stored choices when it has them (resume, other workers), the
    legacy fixed table for a study whose trials predate the screen, else a fresh screen (stored on the study)."""
    from schedsearch.search.methods import SCORER_CHOICES

    stored = study.user_attrs.get("scorer_choices") if study is not None else None
    if stored:
        return {lab: sc for lab, sc in stored}, study.user_attrs.get("scorer_screen")
    if study is not None and any("scorer" in t.params for t in study.get_trials(deepcopy=False)):
        return dict(SCORER_CHOICES), None  # a study started before the screen: keep its categorical space
    rows = screen(obj, kind, target)
    choices = auto_choices(rows)
    if study is not None:
        study.set_user_attr("scorer_screen", [_jsonable(r) for r in rows])
        study.set_user_attr("scorer_choices", [[lab, sc] for lab, sc in choices.items()])
    return choices, rows


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=float))
