"""Run a schedule search as an Optuna study and freeze the winner.

Lifecycle::

    obj = Objective(adapter, samples, ...)                      # reference + vision features cached once
    result = run_study(StudySettings(...), adapter, obj, callbacks=[tracker_cb])
    result.schedule.save(path)                                 # replayed winner, atomically written

Each trial: ``method.suggest(trial, ctx)`` -> budget-matched ratios -> ``obj.score`` on the
search split. The achieved budget minus the request is stored as the trial's constraint
(feasible when <= 0, Optuna's convention) and in user attrs with the FLOPs / KV / token ratios
and the trial's wall time. Logging is done by callbacks (tracking.py), never in the objective.
The winner is replayed with ``optuna.trial.FixedTrial`` through the same ``suggest`` path and
re-scored on the search and held-out splits before it is written.

Seeds of resumed and shared studies: every process that runs trials on a study (a worker, a ``--resume``)
claims the study's next invocation number under a cross-process lock (user attr ``invocations``) and seeds
its sampler with ``derive_seed(--seed, study name, number)``: the first invocation uses ``--seed`` itself (a
fresh study reproduces exactly), later ones a hash of the three, so a resumed study explores new points and
two workers never propose the same sequence. The claim is recorded on the study (``invocation:<n>`` = seed,
worker, sampler) and on each trial (user attrs ``invocation`` and ``sampler_seed``), so the study says which
seed produced which trial.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schedsearch.errors import SchedsearchError
from schedsearch.search.budget import InfeasibleBudget
from schedsearch.search.interrupt import SigintGuard
from schedsearch.search.methods import METHODS, Candidate, SearchContext, baseline_candidate

if TYPE_CHECKING:  # annotations only: importing this module (e.g. SAMPLERS for --help) must not import torch
    from schedsearch.search.objective import Objective

SAMPLERS = ("tpe", "gp", "cmaes", "botorch", "random", "qmc")


class SearchError(SchedsearchError):
    """Bad search settings (unknown method/sampler, infeasible budget, existing study...)."""


@dataclass
class StudySettings:
    budget: float = 0.2
    kind: str = "flops"
    method: str = "psigmoid"
    sampler: str = "tpe"
    trials: int = 40
    timeout: float | None = None
    seed: int = 0
    storage: str | None = None  # Optuna RDB URL; None = in-memory
    study_name: str | None = None
    resume: bool = False
    scorer: dict = field(default_factory=lambda: {"name": "auto"})
    # set by open_study: this process's invocation number on the study and the sampler seed derived from it
    invocation: int | None = None
    sampler_seed: int | None = None
    reuse_empty: bool = False  # check_study_name found the study with no trial: a failed start, reused

    def validate(self) -> None:
        from schedsearch.config import check_range  # the one range table, shared with the CLI and presets

        check_range("budget", self.budget)
        if self.kind not in ("flops", "tokens", "kv"):
            raise SearchError(f"--budget-kind {self.kind!r} is not known: use flops, tokens or kv")
        if self.method not in METHODS:
            raise SearchError(f"--method {self.method!r} is not known: use one of {', '.join(sorted(METHODS))}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"--sampler {self.sampler!r} is not known: use one of {', '.join(SAMPLERS)}")
        check_range("trials", self.trials)
        if self.timeout is not None:
            check_range("timeout", self.timeout)


@dataclass
class StudyResult:
    study: Any
    best: Candidate
    best_params: dict
    search_value: float
    heldout_value: float | None
    budget: dict
    baselines: dict[str, dict] = field(default_factory=dict)
    #: --scorer auto: what the ranking screen measured (search/screen.py), best first; None when not screened
    screen: list[dict] | None = None


def make_sampler(name: str, seed: int, n_startup: int = 8) -> Any:
    """Seeded Optuna sampler. Constraints come from ``trial.set_constraint`` (Optuna 5), feasible when <= 0."""
    import warnings

    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if name == "botorch":
        try:
            from optuna_integration import BoTorchSampler
        except ImportError as err:  # pragma: no cover - depends on extras
            raise SearchError(
                '--sampler botorch needs optuna-integration and botorch: pip install "schedsearch[search]"'
            ) from err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return BoTorchSampler(seed=seed, n_startup_trials=n_startup)
    raise SearchError(f"--sampler {name!r} is not known: use one of {', '.join(SAMPLERS)}")


def _context(obj: Objective, settings: StudySettings) -> SearchContext:
    return SearchContext(num_layers=obj.adapter.num_layers, budget_fn=obj.budget_fn(settings.kind),
                         target=float(settings.budget), kind=settings.kind, scorer=dict(settings.scorer))


def check_study_name(settings: StudySettings) -> None:
    """Before any heavy work: the storage must take writes (``probe_writable``), and an existing study is not
    appended to silently: that needs --resume (or another --study name)."""
    import optuna

    from schedsearch.storage import make_storage, probe_writable, redact

    if not settings.storage:
        return
    probe_writable(settings.storage)
    if settings.resume or not settings.study_name:
        return
    try:
        existing = optuna.study.get_all_study_names(make_storage(settings.storage))
    except SchedsearchError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure becomes one line
        raise SearchError(f"cannot open study storage {redact(settings.storage)!r}: {err}") from err
    if settings.study_name in existing:
        if not _has_trials(settings):
            settings.reuse_empty = True  # an earlier run failed before its first trial: do not block the rerun
            return
        raise SearchError(f"study {settings.study_name!r} already exists in {redact(settings.storage)}: "
                          "continue it with --resume (several workers on one study all pass --resume) "
                          "or pick another --study name")


def _has_trials(settings: StudySettings) -> bool:
    import optuna

    from schedsearch.storage import make_storage

    study = optuna.load_study(study_name=settings.study_name, storage=make_storage(settings.storage))
    return bool(study.get_trials(deepcopy=False))


def derive_seed(seed: int, study_name: str, invocation: int) -> int:
    """Sampler seed of a study's ``invocation``-th process (0-based): ``seed`` for the first, else a hash.

    Deterministic in (seed, study name, invocation), so the study's record reproduces each seed; 32 bits
    because numpy's RandomState (used by Optuna's samplers) takes seeds below 2**32.
    """
    if invocation == 0:
        return int(seed)
    digest = hashlib.sha256(f"schedsearch-seed:{int(seed)}:{study_name}:{int(invocation)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def claim_invocation(study: Any, settings: StudySettings) -> int:
    """Atomically take the study's next invocation number (under ``study_lock``) and record this process."""
    import contextlib

    from schedsearch.storage import study_lock

    lock = study_lock(settings.storage, f"{study.study_name}:invocations") if settings.storage else \
        contextlib.nullcontext()
    with lock:
        n = int(study.user_attrs.get("invocations", 0))
        study.set_user_attr("invocations", n + 1)
    seed = derive_seed(settings.seed, study.study_name, n)
    study.set_user_attr(f"invocation:{n}", {"seed": seed, "base_seed": int(settings.seed),
                                            "sampler": settings.sampler, "worker": worker_id()})
    return n


def tag_trial(trial: Any, settings: StudySettings) -> None:
    """User attrs every trial carries: the worker that ran it and the invocation/seed whose sampler proposed it."""
    trial.set_user_attr("worker", worker_id())
    if settings.invocation is not None:
        trial.set_user_attr("invocation", settings.invocation)
        trial.set_user_attr("sampler_seed", settings.sampler_seed)


def worker_id() -> str:
    """``host:pid`` of this process; stored on each trial (user attr ``worker``) so shared studies say who ran what."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(settings: StudySettings, *, pareto: bool = False) -> Any:
    """Create the study, or load it when ``settings.resume`` (create-or-load: how workers join a shared study).

    ``check_study_name`` has already refused a silent reuse without --resume (a study left without any trial
    by a failed start is reused). Concurrent creation by several workers is safe: Optuna loads the study when
    another worker created it first. The sampler is seeded only once the study exists, from this process's
    invocation number (see the module docstring), and ``settings.invocation``/``sampler_seed`` are set.
    """
    import optuna

    from schedsearch.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line between our own output
    kw: dict[str, Any] = {"directions": ["minimize", "minimize"]} if pareto else {"direction": "minimize"}
    storage = make_storage(settings.storage) if settings.storage else None
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed), storage=storage,
                                    study_name=settings.study_name,
                                    load_if_exists=settings.resume or settings.reuse_empty, **kw)
    except optuna.exceptions.DuplicatedStudyError:
        raise SearchError(f"study {settings.study_name!r} already exists: continue it with --resume "
                          "or pick another --study name") from None
    settings.invocation = claim_invocation(study, settings)
    settings.sampler_seed = derive_seed(settings.seed, study.study_name, settings.invocation)
    if pareto and settings.sampler in ("gp", "botorch"):
        study.sampler = optuna.samplers.NSGAIISampler(seed=settings.sampler_seed)
    else:
        study.sampler = make_sampler(settings.sampler, settings.sampler_seed)
    return study


def auto_scorer(study: Any, obj: Objective, ctx: SearchContext, method: Any, kind: str, target: float
                ) -> list[dict] | None:
    """With ``--scorer auto`` and a method that searches the ranking: set ``ctx.choices`` from the ranking screen
    (search/screen.py; stored on the study, reused on resume). Returns the screen's rows (None: no screen)."""
    if ctx.scorer.get("name") != "auto" or not getattr(method, "searches_scorer", False):
        return None
    from schedsearch.search.screen import choices_for_study

    ctx.choices, rows = choices_for_study(study, obj, kind, target)
    return rows


def feasible_range(obj: Objective, kind: str) -> tuple[float, float]:
    """Smallest achievable budget (every visual token dropped before layer 0) and 1.0."""
    fn = obj.budget_fn(kind)
    return fn([0.0] * obj.adapter.num_layers), 1.0


def budget_dict(obj: Objective, ratios: Sequence[float], settings: StudySettings, split: str = "search") -> dict:
    from schedsearch.flops import budget_report

    rep = budget_report(obj.shape, obj.counts[split], list(ratios))
    return {"kind": settings.kind, "requested": float(settings.budget), "achieved": rep.value(settings.kind),
            "flops_ratio": rep.flops_ratio, "kv_ratio": rep.kv_ratio, "token_ratio": rep.token_ratio}


def run_study(settings: StudySettings, obj: Objective, *, callbacks: Sequence[Callable] = (),
              baselines: Sequence[str] = ("fastv", "pdrop", "uniform"), study: Any = None) -> StudyResult:
    """``study``: an already opened study (``open_study``), e.g. one several workers share; else opened here.

    The winner is the best of ALL completed trials in the study when this invocation's trials are done
    (other workers' included), so every worker that finishes writes the study's best at that time.
    """
    import optuna

    settings.validate()
    lo, _ = feasible_range(obj, settings.kind)
    if settings.budget < lo - 1e-12:
        raise SearchError(
            f"--budget {settings.budget} is infeasible for this model and calibration set: the {settings.kind} "
            f"ratio can go from {lo:.4f} (every visual token dropped) to 1.0"
        )
    ctx = _context(obj, settings)
    method = METHODS[settings.method]()

    def objective(trial: Any) -> float:
        t0 = time.perf_counter()
        tag_trial(trial, settings)
        cand = method.suggest(trial, ctx)
        b = budget_dict(obj, cand.ratios, settings)
        trial.set_user_attr("scorer", cand.scorer)
        trial.set_user_attr("keep_ratios", [round(r, 6) for r in cand.ratios])
        trial.set_user_attr("solved", cand.params)
        for k in ("flops_ratio", "kv_ratio", "token_ratio", "achieved"):
            trial.set_user_attr(k, b[k])
        trial.set_user_attr("constraint", (b["achieved"] - settings.budget,))
        from schedsearch.tracking import set_constraint  # both keys: Optuna 5 and optuna-dashboard

        set_constraint(trial, "budget", b["achieved"] - settings.budget)  # feasible when <= 0
        with guard.computing():
            value = obj.score(cand.as_schedule_dict())
        trial.set_user_attr("trial_seconds", time.perf_counter() - t0)
        return value

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are logged by the tracker; no tracebacks
    if study is None:
        check_study_name(settings)
        study = open_study(settings)
    screen_rows = auto_scorer(study, obj, ctx, method, settings.kind, settings.budget)
    # --trials = trials this invocation runs (Optuna's CLI semantics): --resume adds N, N workers add N each
    guard = SigintGuard(study)
    with guard:  # Ctrl-C never lands inside a trial's storage write (interrupt.py)
        study.optimize(objective, n_trials=settings.trials, timeout=settings.timeout, callbacks=list(callbacks),
                       catch=(InfeasibleBudget,))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SearchError("no trial finished: nothing to write (raise --trials or --timeout)")
    best = study.best_trial
    best_cand = method.suggest(optuna.trial.FixedTrial(best.params), ctx)  # replay through the same path
    search_value = obj.score(best_cand.as_schedule_dict())
    heldout = obj.score(best_cand.as_schedule_dict(), split="heldout") if obj.batches["heldout"] else None
    result = StudyResult(study=study, best=best_cand, best_params=dict(best.params), search_value=search_value,
                         heldout_value=heldout, budget=budget_dict(obj, best_cand.ratios, settings),
                         screen=screen_rows)
    for name in baselines:
        try:
            cand = baseline_candidate(name, ctx)
        except InfeasibleBudget:
            continue
        sched = cand.as_schedule_dict()
        result.baselines[name] = {
            "ratios": cand.ratios, "params": cand.params, "scorer": cand.scorer,
            "search": obj.score(sched),
            "heldout": obj.score(sched, split="heldout") if obj.batches["heldout"] else None,
            "budget": budget_dict(obj, cand.ratios, settings),
        }
    return result


@dataclass
class ParetoResult:
    study: Any
    per_budget: dict[float, dict]  # requested budget -> {"candidate", "params", "search", "heldout", "budget"}
    front: list[tuple[float, float]]  # (achieved budget, discrepancy) of the Pareto-optimal trials


def run_pareto(settings: StudySettings, obj: Objective, budgets: Sequence[float], *,
               callbacks: Sequence[Callable] = (), study: Any = None) -> ParetoResult:
    """One two-objective study (discrepancy, achieved budget) -> one schedule per requested budget.

    The budget becomes a searched parameter ``target`` in [feasible minimum, max(budgets)]; each trial
    is still budget-matched at its own target, so the front is dense where it matters. For each
    requested budget B the winner is the completed trial with achieved <= B and the lowest
    discrepancy; it is replayed through the same ``suggest`` path and re-scored on both splits.
    """
    import optuna

    if not budgets:
        raise SearchError("--pareto needs at least one budget, e.g. --budget 0.1,0.2,0.3")
    for b in budgets:
        StudySettings(budget=b, kind=settings.kind, method=settings.method, sampler=settings.sampler,
                      trials=settings.trials).validate()
    lo, _ = feasible_range(obj, settings.kind)
    bad = [b for b in budgets if b < lo - 1e-12]
    if bad:
        raise SearchError(f"--budget {bad[0]} is infeasible here: the {settings.kind} ratio can go from {lo:.4f} "
                          "(every visual token dropped) to 1.0")
    method = METHODS[settings.method]()
    hi = max(budgets)

    base_ctx = _context(obj, settings)

    def ctx_for(target: float) -> SearchContext:
        c = _context(obj, settings)
        c.target, c.choices = target, base_ctx.choices
        return c

    def objective(trial: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        tag_trial(trial, settings)
        target = trial.suggest_float("target", lo + 1e-9, hi)
        cand = method.suggest(trial, ctx_for(target))
        b = budget_dict(obj, cand.ratios, settings)
        trial.set_user_attr("keep_ratios", [round(r, 6) for r in cand.ratios])
        for k in ("flops_ratio", "kv_ratio", "token_ratio", "achieved"):
            trial.set_user_attr(k, b[k])
        with guard.computing():
            value = obj.score(cand.as_schedule_dict())
        trial.set_user_attr("trial_seconds", time.perf_counter() - t0)
        return value, b["achieved"]

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are logged by the tracker; no tracebacks
    if study is None:
        study = open_study(settings, pareto=True)
    # one screen for the whole front, at the largest requested budget (each trial's target varies below it)
    auto_scorer(study, obj, base_ctx, method, settings.kind, hi)
    guard = SigintGuard(study)
    with guard:
        study.optimize(objective, n_trials=settings.trials, timeout=settings.timeout, callbacks=list(callbacks),
                       catch=(InfeasibleBudget,))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    per_budget: dict[float, dict] = {}
    for b in sorted(budgets):
        ok = [t for t in complete if t.values[1] <= b + 1e-12]
        if not ok:
            continue
        best = min(ok, key=lambda t: t.values[0])
        cand = method.suggest(optuna.trial.FixedTrial(best.params), ctx_for(best.params["target"]))
        sched = cand.as_schedule_dict()
        per_budget[b] = {"candidate": cand, "params": dict(best.params), "trial": best.number,
                         "search": obj.score(sched),
                         "heldout": obj.score(sched, split="heldout") if obj.batches["heldout"] else None,
                         "budget": {**budget_dict(obj, cand.ratios, settings), "requested": b}}
    front = sorted((t.values[1], t.values[0]) for t in study.best_trials)
    return ParetoResult(study=study, per_budget=per_budget, front=front)
