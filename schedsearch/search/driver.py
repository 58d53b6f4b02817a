"""End-to-end ``optimize``: settings -> model -> calibration -> objective -> study -> frozen schedule.

The CLI passes merged settings (defaults < TOML preset < flags). Failure modes the user can cause
are SchedsearchErrors with one line; finished trials live in the Optuna storage (sqlite file by
default) so Ctrl-C loses nothing and ``--resume`` continues. The MLflow parent run is closed as
KILLED on Ctrl-C, FAILED on error. The schedule file is written atomically after the winner was
replayed through the same code path; its path is checked before the model is loaded and, should the
write still fail, the schedule is rescued next to the study storage (output.py) and the exit is non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError
from schedsearch.output import OutputError, prepare_output, rescue_dir, save_schedule
from schedsearch.schedule import SCORER_NAMES
from schedsearch.search.interrupt import SigintGuard, fail_running
from schedsearch.search.optimize import SearchError, StudySettings, budget_dict, run_study


def _default_calibration(model: str) -> Path:
    if model != "toy":
        raise SearchError("--calibration is required for models other than toy: pass a manifest "
                          "(see calibration_data/README.md), e.g. --calibration calibration_data/photos")
    for p in (Path("calibration_data/toy"), Path(__file__).resolve().parents[2] / "calibration_data" / "toy"):
        if (p / "manifest.jsonl").is_file():
            return p
    from schedsearch.toy import default_calibration_dir

    return default_calibration_dir()


def _parse_budgets(value: Any, pareto: bool) -> list[float]:
    parts = [p for p in str(value).split(",") if p.strip()]
    try:
        budgets = [float(p) for p in parts]
    except ValueError as err:
        raise SearchError(f"--budget {value!r} is not a number (or, with --pareto, a comma-separated list)") from err
    if len(budgets) != 1 and not pareto:
        raise SearchError(f"--budget {value!r} lists several budgets: add --pareto to get one schedule per budget")
    if not budgets:
        raise SearchError("--budget is required, e.g. --budget 0.2")
    return budgets


def _check_gsearch(s: dict) -> None:
    """gsearch's own numbers, for callers that bypass the CLI: the one range table (config.RANGES) decides."""
    from schedsearch.config import check_range

    for name in ("tolerance", "step"):
        if s.get(name) is not None:
            check_range(name, s[name])


def _study_name(s: dict) -> str:
    model = Path(str(s["model"])).name or str(s["model"])
    mode = "pareto-" if s.get("pareto") else ""
    budget = str(s["budget"]).replace(",", "_")
    return f"{model}-{mode}{s['method']}-{s['budget_kind']}{budget}-{s['sampler']}-seed{s['seed']}"


def build_schedule(adapter: Any, cand: Any, s: dict, *, objective: dict, method_params: dict, budget: dict,
                   provenance: dict) -> Any:
    from schedsearch.schedule import SCHEMA_VERSION, Schedule, make_provenance

    return Schedule.from_dict({
        "schema_version": SCHEMA_VERSION,
        "keep_ratios": [float(r) for r in cand.ratios],
        "scorer": cand.scorer,
        "recycling": cand.recycling,
        "model": {"family": adapter.family, "name": str(adapter.name_or_path), "num_layers": adapter.num_layers,
                  "fingerprint": adapter.fingerprint()},
        "budget": budget,
        "objective": objective,
        "method": {"name": s["method"], "params": method_params},
        "provenance": make_provenance(**provenance),
    })


def claim_parent_run(study: Any, storage: str, tracker: Any, name: str, params: dict,
                     log_callback: Callable[[Any, Any], None] | None = None) -> str:
    """One MLflow parent run per study, shared by every worker (and by --resume).

    Under a cross-process lock on the study (``pg_advisory_lock`` on PostgreSQL, a lock file for sqlite) the
    worker reads the study's user attr ``mlflow_run_id``: when set it resumes that run, else it creates the
    parent and stores its id before releasing the lock, so two workers starting at once cannot both create one.
    The id is re-read afterwards; should another worker have won anyway (a storage without such a lock), this
    worker deletes its own parent and joins the winner's. Child runs of all workers then land under one parent.
    With ``log_callback``, finished trials that have no child run yet (an earlier worker was stopped between
    committing a trial and logging it) are logged through it, under the same lock.
    """
    from schedsearch.storage import study_lock
    from schedsearch.tracking import backfill_trials

    with study_lock(storage, name):
        existing = study.user_attrs.get("mlflow_run_id")
        run_id = tracker.start_study(name, params, run_id=existing)
        if run_id != existing:
            study.set_user_attr("mlflow_run_id", run_id)
        if log_callback is not None and existing == run_id:
            backfill_trials(tracker, study, log_callback)
    winner = study.user_attrs.get("mlflow_run_id")
    if winner and winner != run_id:
        try:
            tracker.client.delete_run(run_id)
        except Exception:  # noqa: BLE001 - tracking problems never stop the search
            pass
        run_id = tracker.start_study(name, params, run_id=winner)
    return run_id


class Interrupted(SchedsearchError):
    """Ctrl-C during a study: finished trials are in the storage, the tracking run is closed as KILLED."""

    exit_code = 130


def run_optimize(s: dict, *, resume: bool = False, progress: Callable | None = None,
                 echo: Callable[[str], None] = print) -> Any:
    try:
        return _run_optimize(s, resume=resume, progress=progress, echo=echo)
    except SchedsearchError:
        raise
    except Exception as err:  # a fault of the study store (read-only, full, gone) is one line naming its reason
        from schedsearch.storage import storage_error

        translated = storage_error(err, s.get("storage") or "sqlite:///.schedsearch/studies.db")
        if translated is None:
            raise
        raise translated from None
    except KeyboardInterrupt:
        import optuna

        storage = s.get("storage") or "sqlite:///.schedsearch/studies.db"
        name = s.get("study") or _study_name(s)
        from schedsearch.storage import make_storage, redact

        try:
            st = optuna.load_study(study_name=name, storage=make_storage(storage))
            done = len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE])
        except Exception:  # noqa: BLE001 - interrupted before the study existed
            done = 0
        raise Interrupted(f"interrupted: {done} finished trial(s) kept in {redact(storage)} (study {name!r}); "
                          "continue with the same command plus --resume") from None


def _run_optimize(s: dict, *, resume: bool = False, progress: Callable | None = None,
                  echo: Callable[[str], None] = print) -> Any:
    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.search.objective import Objective

    if s.get("budget") is None:
        raise SearchError("--budget is required, e.g. --budget 0.2 (kept fraction of decoder prefill FLOPs)")
    budgets = _parse_budgets(s["budget"], bool(s.get("pareto")))
    from schedsearch.search.methods import METHODS

    names = sorted([*METHODS, "gsearch"])  # gsearch is a search loop, not a parameterization in METHODS
    if s["method"] not in names:
        raise SearchError(f"--method {s['method']!r} is not known: use {', '.join(names[:-1])} or {names[-1]}")
    settings = StudySettings(
        budget=max(budgets), kind=s["budget_kind"],
        method=s["method"] if s["method"] != "gsearch" else "psigmoid",
        sampler=s["sampler"], trials=int(s["trials"]) if s.get("trials") is not None else StudySettings.trials,
        timeout=s["timeout"], seed=int(s["seed"]),
        storage=s["storage"], study_name=s["study"], resume=resume,
        scorer={"name": s["scorer"], "params": {"rope": bool(s["rope"])} if "attention" in s["scorer"] else {}}
        if s["scorer"] != "auto" else {"name": "auto"},
    )
    settings.validate()  # fail fast, before loading anything heavy
    _check_gsearch(s)
    known = ("auto", *(n for n in SCORER_NAMES if n != "external"))  # external needs a map passed in code
    if s["scorer"] not in known:
        raise SearchError(f"--scorer {s['scorer']!r} is not known: use one of {', '.join(known)}")
    settings.method = s["method"]
    if settings.storage is None:
        prepare_output(".schedsearch", flag="the study folder", folder=True).mkdir(exist_ok=True)
        settings.storage = "sqlite:///.schedsearch/studies.db"
    settings.study_name = settings.study_name or _study_name(s)
    from schedsearch.search.optimize import check_study_name

    calib = Path(s["calibration"]) if s.get("calibration") else _default_calibration(str(s["model"]))
    samples = load_manifest(calib)  # a bad manifest is the first thing to hear about
    check_study_name(settings)  # before loading the model or opening a tracking run
    out = _output_path(s, settings)  # a bad --out is refused now, not after the search
    from schedsearch.calibration import calibration_hash

    calib_hash = calibration_hash(samples)
    from schedsearch.devices import load_kwargs

    adapter = load_model(str(s["model"]), **load_kwargs(s.get("device"), s.get("dtype")))
    t0 = time.perf_counter()
    obj = Objective(adapter, samples, heldout_fraction=float(s["heldout_fraction"]), seed=settings.seed,
                    batch_size=int(s["batch_size"]), cache_dir=".schedsearch/cache", calibration_hash=calib_hash,
                    # VFlowOpt's maps: its method, and its ranking (which --scorer auto's screen also tries)
                    vision_maps=s["method"] == "vflow" or (s["scorer"] in ("auto", "vflow")
                                                           and hasattr(adapter, "vision_attention")))
    setup_s = time.perf_counter() - t0

    from schedsearch.tracking import Tracker, optuna_callback

    tracker = Tracker(s.get("tracking_uri"), experiment=s.get("experiment", "schedsearch"))
    params = {k: v for k, v in s.items() if v is not None}
    params.update(study=settings.study_name, storage=settings.storage, calibration_hash=calib_hash,
                  n_search=len(obj.samples["search"]), n_heldout=len(obj.samples["heldout"]))
    from schedsearch.search.optimize import open_study

    study = open_study(settings, pareto=bool(s.get("pareto")))  # create, or join/continue with --resume
    names = ["one_minus_cos", f"achieved_{settings.kind}"] if s.get("pareto") else ["one_minus_cos"]
    log_trial = optuna_callback(tracker, metric_names=names)  # the metric as the UI and the dashboard label it
    run_id = claim_parent_run(study, settings.storage, tracker, settings.study_name, params, log_trial)

    def remember_run(study: Any, trial: Any) -> None:  # so an interrupted study resumes under the same run
        if study.user_attrs.get("mlflow_run_id") != run_id:
            study.set_user_attr("mlflow_run_id", run_id)

    callbacks = [remember_run, log_trial] + ([progress] if progress else [])
    finish = _finish_pareto if s.get("pareto") else _finish_single
    with tracker:
        result, problems = finish(s, settings, obj, adapter, budgets, callbacks, tracker, run_id, calib_hash, echo,
                                  study, out, setup_s)
    if problems:  # raised after the run closed: the search itself succeeded and its files are in the run
        more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise OutputError(f"{problems[0]}{more} (also in MLflow run {run_id})")
    return result


def _finish_single(s: dict, settings: StudySettings, obj: Any, adapter: Any, budgets: list[float], callbacks: list,
                   tracker: Any, run_id: str, calib_hash: str, echo: Callable[[str], None], study: Any, out: Path,
                   setup_s: float) -> tuple[Any, list[str]]:
    """One budget: run the study (or G-Search), replay the winner, write it, log the summary, print the table."""
    if s["method"] == "gsearch":
        result = run_gsearch(settings, obj, s, callbacks, study)
    else:
        result = run_study(settings, obj, callbacks=callbacks, study=study)
    result.study.set_user_attr("mlflow_run_id", run_id)
    trial_seconds = [t.user_attrs.get("trial_seconds") for t in result.study.trials
                     if t.user_attrs.get("trial_seconds") is not None]
    objective = {"name": "1-cos(last token, final norm)", "value": result.search_value, "split": "search",
                 "heldout": result.heldout_value, "n_search": len(obj.samples["search"]),
                 "n_heldout": len(obj.samples["heldout"])}
    method_params = {**result.best_params, **result.best.params}
    sched = build_schedule(adapter, result.best, s, objective=objective, method_params=method_params,
                           budget=result.budget,
                           provenance=dict(calibration_hash=calib_hash, study=settings.study_name,
                                           trial=result.study.best_trial.number, mlflow_run_id=run_id,
                                           command="schedsearch optimize"))
    out, problem = save_schedule(sched, out, rescue=rescue_dir(settings.storage))
    _log_summary(tracker, result, sched, out, adapter, obj)  # the parent run gets the file either way
    _print_table(echo, result, out, setup_s, trial_seconds)
    return result, [problem] if problem else []


def _output_path(s: dict, settings: StudySettings) -> Path:
    """--out (a file; with --pareto a folder), or the default under schedules/, checked writable now."""
    if s.get("pareto"):
        return prepare_output(Path(s["out"]) if s.get("out") else Path("schedules"), folder=True)
    return prepare_output(Path(s["out"]) if s.get("out") else Path("schedules") / f"{settings.study_name}.json")


def run_gsearch(settings: StudySettings, obj: Any, s: dict, callbacks: list, study: Any) -> Any:
    """G-Search: each distinct evaluation becomes an Optuna trial (ask/tell) so it is stored and logged.

    ``s["trials"]`` (``--trials``) caps the evaluations this invocation runs; None runs the complete greedy
    search. When the cap cuts it short, the best schedule evaluated so far is returned (budget mode: the
    lowest discrepancy among those within the budget; tolerance mode: the cheapest within the tolerance) with
    a one-line warning. Evaluations already in the study (an earlier, cut-short run continued with --resume)
    are reused, not re-run, so a resumed G-Search continues where it stopped.
    """
    import json
    import warnings

    from schedsearch.search.gsearch import EvaluationCap, GreedySearch, GSearchWarning, best_evaluated
    from schedsearch.search.methods import Candidate
    from schedsearch.search.optimize import StudyResult, _context, baseline_candidate, tag_trial
    from schedsearch.tracking import set_constraint

    ctx = _context(obj, settings)
    bfn = obj.budget_fn(settings.kind)
    cap = None if s.get("trials") is None else int(s["trials"])
    known = _stored_evaluations(study)  # (scorer, ratios) -> value, from earlier invocations on this study
    evaluated: list[tuple[list[float], dict, float]] = []
    used: set[tuple[str, tuple[float, ...]]] = set()  # distinct schedules this search looked at
    new = [0]

    guard = SigintGuard()  # Ctrl-C: the asked trial is marked FAIL, never left RUNNING (interrupt.py)

    def evaluate(ratios: list[float]) -> float:
        key = (json.dumps(ctx.scorer, sort_keys=True), tuple(round(r, 10) for r in ratios))
        if key in known:
            value = known[key]
        else:
            if cap is not None and new[0] >= cap:
                raise EvaluationCap(cap)
            value = _ask_tell(ratios)
            known[key] = value
            new[0] += 1
        evaluated.append((list(ratios), dict(ctx.scorer), value))
        used.add(key)
        return value

    def _ask_tell(ratios: list[float]) -> float:
        guard.checkpoint()
        t0 = time.perf_counter()
        trial = study.ask()
        try:
            _record(trial, ratios)
            with guard.computing():
                value = obj.score({"keep_ratios": ratios, "scorer": ctx.scorer})
        except BaseException:
            fail_running(study, trial)
            raise
        trial.set_user_attr("trial_seconds", time.perf_counter() - t0)
        frozen = study.tell(trial, value)
        for cb in callbacks:
            cb(study, frozen)
        return value

    def _record(trial: Any, ratios: list[float]) -> None:
        tag_trial(trial, settings)
        b = budget_dict(obj, ratios, settings)
        trial.set_user_attr("keep_ratios", ratios)
        trial.set_user_attr("scorer", ctx.scorer)
        for k in ("flops_ratio", "kv_ratio", "token_ratio", "achieved"):
            trial.set_user_attr(k, b[k])
        trial.set_user_attr("constraint", (b["achieved"] - settings.budget,))
        set_constraint(trial, "budget", b["achieved"] - settings.budget)  # feasible when <= 0

    tolerance = None if s.get("tolerance") is None else float(s["tolerance"])
    g = GreedySearch(obj.adapter.num_layers, evaluate, step=float(s.get("step") or 0.05))
    screen_rows = None
    complete = True
    with guard:
        try:
            if ctx.scorer.get("name") == "auto":
                # G-Search needs one scorer: the best on the budget-matched flat schedule among the screen's choices
                # (search/screen.py: every ranking screened once, the best few + composites offered); the screened
                # values are reused, the composites are evaluated here (each is a trial)
                from schedsearch.search.fixed import uniform
                from schedsearch.search.screen import choices_for_study

                probe, _ = uniform(obj.adapter.num_layers, bfn, settings.budget)
                choices, screen_rows = choices_for_study(study, obj, settings.kind, settings.budget)
                probe_key = tuple(round(r, 10) for r in probe)
                for row in screen_rows or ():
                    if row.get("value") is not None:
                        known.setdefault((json.dumps(row["scorer"], sort_keys=True), probe_key), row["value"])
                scores = {}
                for key, sc in choices.items():
                    ctx.scorer = sc
                    scores[key] = evaluate(probe)
                ctx.scorer = choices[min(scores, key=scores.get)]
            if tolerance is not None:
                ratios, tol = g.at_tolerance(tolerance), tolerance
            else:
                ratios, tol = g.at_budget(bfn, settings.budget)
        except EvaluationCap:
            complete = False
            try:
                ratios, ctx.scorer, value = best_evaluated(evaluated, bfn, settings.budget, tolerance,
                                                           obj.adapter.num_layers, ctx.scorer)
            except ValueError:
                raise SearchError(f"gsearch stopped at --trials {cap} evaluations before any schedule met the "
                                  "budget: continue with --resume, raise --trials or leave it out") from None
            tol = tolerance if tolerance is not None else value
            warnings.warn(f"gsearch stopped at --trials {cap} evaluations before its greedy search finished; "
                          "wrote the best schedule evaluated so far: continue with the same command plus --resume "
                          "(earlier evaluations are reused), or leave --trials out for the complete search",
                          GSearchWarning, stacklevel=2)
    cand = Candidate(ratios, {"tolerance": tol, "step": g.grid[0] - g.grid[1],
                              "evaluations": len(used), "complete": complete}, ctx.scorer)
    sched = cand.as_schedule_dict()
    result = StudyResult(study=study, best=cand, best_params={}, search_value=obj.score(sched),
                         heldout_value=obj.score(sched, split="heldout") if obj.batches["heldout"] else None,
                         budget=budget_dict(obj, ratios, settings), screen=screen_rows)
    for name in ("fastv", "pdrop", "uniform"):
        try:
            c = baseline_candidate(name, ctx)
        except SchedsearchError:
            continue
        except ValueError:
            continue
        sd = c.as_schedule_dict()
        result.baselines[name] = {"ratios": c.ratios, "params": c.params, "scorer": c.scorer,
                                  "search": obj.score(sd),
                                  "heldout": obj.score(sd, split="heldout") if obj.batches["heldout"] else None,
                                  "budget": budget_dict(obj, c.ratios, settings)}
    return result


def _stored_evaluations(study: Any) -> dict[tuple[str, tuple[float, ...]], float]:
    """Completed G-Search trials already in the study: (scorer JSON, rounded keep ratios) -> discrepancy."""
    import json

    out = {}
    for t in study.get_trials(deepcopy=False):
        ratios, scorer = t.user_attrs.get("keep_ratios"), t.user_attrs.get("scorer")
        if t.state.name == "COMPLETE" and t.value is not None and ratios is not None and scorer is not None:
            out[(json.dumps(scorer, sort_keys=True), tuple(round(float(r), 10) for r in ratios))] = float(t.value)
    return out


def _log_summary(tracker: Any, result: Any, sched: Any, out: Path, adapter: Any, obj: Any) -> None:
    from schedsearch import plots

    tracker.log_artifact_file(out)
    sample = obj.samples["search"][0] if obj.samples["search"] else None
    for name, fig in plots.study_figures(result, sched, adapter, sample).items():
        tracker.log_figure(fig, name)
    metrics = {"best_search": result.search_value, **{f"budget_{k}": v for k, v in result.budget.items()
                                                      if isinstance(v, float)}}
    if result.heldout_value is not None:
        metrics["best_heldout"] = result.heldout_value
    for name, b in result.baselines.items():
        if b["heldout"] is not None:
            metrics[f"{name}_heldout"] = b["heldout"]
    log_screen(tracker, result.screen, metrics)
    tracker.set_summary(metrics, {"schedule_path": str(out)})


def log_screen(tracker: Any, rows: list[dict] | None, metrics: dict) -> None:
    """--scorer auto: each screened ranking's discrepancy as metric ``screen_<label>`` (added to ``metrics``) and
    the whole screen as the run's artifact ``scorer_screen.json``."""
    if not rows:
        return
    import json
    import tempfile

    for r in rows:
        if r.get("value") is not None:
            metrics[f"screen_{r['label']}"] = r["value"]
    with tempfile.TemporaryDirectory(prefix="schedsearch-screen-") as tmp:
        path = Path(tmp) / "scorer_screen.json"
        path.write_text(json.dumps(rows, indent=1, default=float) + "\n", encoding="utf-8")
        tracker.log_artifact_file(path)


def _print_table(echo: Callable[[str], None], result: Any, out: Path, setup_s: float, trial_s: list) -> None:
    from schedsearch.tables import table

    echo(f"wrote {out}")
    rows = [("searched", result.search_value, result.heldout_value, result.budget)]
    rows += [(k, v["search"], v["heldout"], v["budget"]) for k, v in result.baselines.items()]
    echo(table(["schedule", "search 1-cos", "held-out 1-cos", "FLOPs", "KV", "tokens"],
               [(n, sv, hv, b["flops_ratio"], b["kv_ratio"], b["token_ratio"]) for n, sv, hv, b in rows],
               digits=5, fixed=True))
    if trial_s:
        med = sorted(trial_s)[len(trial_s) // 2]
        echo(f"trials: {len(trial_s)}, median trial {med:.2f}s, setup (reference + vision cache) {setup_s:.1f}s")


def _finish_pareto(s: dict, settings: StudySettings, obj: Any, adapter: Any, budgets: list[float], callbacks: list,
                   tracker: Any, run_id: str, calib_hash: str, echo: Callable[[str], None], study: Any,
                   out_dir: Path, setup_s: float) -> tuple[Any, list[str]]:
    """--pareto: one two-objective study, then one replayed, frozen schedule per requested budget.

    Returns the result and the one-line problems of files that had to be rescued (raised after the run closes)."""
    from schedsearch import plots
    from schedsearch.search.optimize import run_pareto
    from schedsearch.tables import table

    if s["method"] == "gsearch":
        raise SearchError("--pareto works with psigmoid, pcosine and vflow (gsearch is greedy, not a sampler)")
    res = run_pareto(settings, obj, budgets, callbacks=callbacks, study=study)
    res.study.set_user_attr("mlflow_run_id", run_id)
    problems, rows = [], []
    for b in budgets:
        r = res.per_budget.get(b)
        if r is None:
            rows.append((f"{b:g}", None, None, None, "no trial reached this budget: raise --trials"))
            continue
        cand = r["candidate"]
        objective = {"name": "1-cos(last token, final norm)", "value": r["search"], "split": "search",
                     "heldout": r["heldout"]}
        sched = build_schedule(adapter, cand, s, objective=objective, method_params={**r["params"], **cand.params},
                               budget={**r["budget"], "kind": settings.kind},
                               provenance=dict(calibration_hash=calib_hash, study=settings.study_name,
                                               trial=r["trial"], mlflow_run_id=run_id,
                                               command="schedsearch optimize --pareto"))
        out, problem = save_schedule(sched, out_dir / f"{settings.study_name}-{settings.kind}{b}.json",
                                     rescue=rescue_dir(settings.storage))
        problems += [problem] if problem else []
        tracker.log_artifact_file(out)
        rows.append((f"{b:g}", r["search"], r["heldout"], r["budget"]["flops_ratio"], str(out)))
    echo(table(["budget", "search 1-cos", "held-out 1-cos", "FLOPs", "file"], rows, digits=5, fixed=True))
    points = [(t.values[0], t.values[1]) for t in res.study.trials if t.values]
    tracker.log_figure(plots.pareto_plot(res.study if points else points, budgets=budgets, kind=settings.kind),
                       "pareto_front.png")
    tracker.set_summary({f"best_search_{b}": r["search"] for b, r in res.per_budget.items()},
                        {"budgets": ",".join(str(b) for b in budgets)})
    return res, problems

