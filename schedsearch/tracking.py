"""MLflow tracking for a study: one parent run per study, one child run per trial (the only module importing mlflow).

Lifecycle::

    tracker = Tracker(tracking_uri)                # None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db (CWD)
    run_id = tracker.start_study(name, params)     # parent run (or resume one: run_id=...)
    with tracker:                                  # FINISHED on exit, KILLED on Ctrl-C, FAILED on error
        study.optimize(objective, callbacks=[optuna_callback(tracker)])   # one child run per finished trial
        tracker.log_artifact_file("best.json"); tracker.log_figure(fig, "history.png")
        tracker.set_summary({"best": v}, {"schedule_path": "best.json"})

Design notes:

- Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never the fluent API, so no
  process-global "active run" is touched and a trial costs three small store calls (create run with its
  tags, one ``log_batch``, ``update_run``) plus one metric on the parent (the objective history).
- An unreachable or refusing tracking server is detected once, at construction, with MLflow's HTTP retries
  off and a short timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``, only for
  that probe). Then a single :class:`TrackingWarning` is issued and the local default store is used, so the
  study goes on. Logging errors later in a study (a server that goes away) are warned about once and
  tracking is switched off; they never stop the study.
- For a local ``sqlite:///path/x.db`` outside the working directory, new experiments keep their artifacts
  next to the database (``path/mlruns/<experiment>``) instead of ``./mlruns``.
- ``import schedsearch.tracking`` is cheap; mlflow is imported on first use. Without it a
  :class:`TrackingUnavailableError` says which extra to install.
- What the MLflow UI shows: a child run per trial with the trial's real start and end time, its metric named
  for what it is (``study.set_metric_names``, e.g. ``one_minus_cos``) and the README's parameter names
  (:data:`PARAM_LABELS`); the parent run carries the same metric as the *best value so far* at every step (so
  the runs table shows the best, its chart the best-so-far curve), the budget as tag ``schedsearch.budget`` and a
  description (``mlflow.note.content``) naming the study and, once written, the schedule file.
- Why not ``optuna_integration.MLflowCallback``: it uses MLflow's fluent API (a process-global active run), logs
  one top-level run per trial (no parent run shared by workers, no resume of a KILLED study under the same
  parent, no backfill of trials committed but not logged), and has no fallback when the server is unreachable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError
from schedsearch.storage import absolute_sqlite

__all__ = [
    "DEFAULT_TRACKING_URI", "PARAM_LABELS", "Tracker", "TrackingUnavailableError", "TrackingWarning",
    "flatten_params", "optuna_callback", "set_constraint",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PROBE_TIMEOUT_S = 3
_STATUSES = ("FINISHED", "KILLED", "FAILED")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_PER_BATCH = 100  # params/tags per log_batch (MLflow's limit; metrics allow 1000)

#: Optuna parameter name -> the name the README and the MLflow UI use for it (display only: the study keeps its own)
PARAM_LABELS = {"phi": "floor"}


class TrackingUnavailableError(SchedsearchError, ImportError):
    """mlflow (or matplotlib for figures) is not installed."""


class TrackingWarning(UserWarning):
    """Tracking degraded (unreachable server -> local store; logging switched off after an error)."""


class TrackingStoreError(SchedsearchError):
    """A tracking store that cannot be used: unreachable server, unreadable or unwritable sqlite file."""


#: Longest wait for a database tracking store (PostgreSQL, MySQL) to answer: MLflow itself retries ~100 s
STORE_TIMEOUT_S = 60.0


def _one_line(exc: BaseException, limit: int = 160) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def home_store_uri() -> str:
    """The per-user fallback store: ``$SCHEDSEARCH_HOME/mlflow.db``, else ``$XDG_DATA_HOME/schedsearch``, else
    ``~/.local/share/schedsearch`` (where the schedule library lives), used when the working directory's store is
    broken."""
    home = os.environ.get("SCHEDSEARCH_HOME")
    if not home:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        home = str(Path(base) / "schedsearch")
    return f"sqlite:///{Path(home).expanduser().resolve() / 'mlflow.db'}"


def check_sqlite_store(uri: str, write: bool = True) -> None:
    """Open a ``sqlite:///`` store with the standard library first, so a broken file is one line within seconds.

    MLflow retries a database it cannot open 10 times with exponential back-off (~100 s, two warning lines per
    retry) and reports a corrupt file as a schema error. Here: a missing file is fine (MLflow creates it) when its
    folder can be written; a directory, a corrupt file (``file is not a database``) or a read-only file or folder
    (``attempt to write a readonly database``; ``write=False`` skips that check) raise TrackingStoreError naming
    the file and sqlite's own reason.
    """
    import sqlite3

    raw = uri[len("sqlite:///"):]
    path = Path(raw.split("?", 1)[0])
    if raw in ("", ":memory:") or raw.startswith("file:"):
        return
    if path.is_dir():
        raise TrackingStoreError(f"tracking store {path} is a directory, not an sqlite file")
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        probe = parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise TrackingStoreError(f"tracking store {path}: {probe} is not a directory")
        if write and not os.access(probe, os.W_OK | os.X_OK):
            raise TrackingStoreError(f"tracking store {path} cannot be created: {probe} is not writable")
        return
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode={'rw' if write else 'ro'}", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise TrackingStoreError(f"tracking store {path} cannot be opened: {_one_line(exc)}") from None
    try:
        con.execute("PRAGMA schema_version").fetchone()  # reads the header: 'file is not a database'
        if write:
            con.execute("BEGIN IMMEDIATE")  # takes the write lock: 'attempt to write a readonly database'
            con.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise TrackingStoreError(f"tracking store {path} cannot be used: {_one_line(exc)}") from None
    finally:
        con.close()


def bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread; TrackingStoreError when it has not returned within ``timeout_s`` seconds.

    For store calls that can block far longer than a user waits (a database host that drops packets, MLflow's
    retry loops): the caller gets one line and goes on; the abandoned thread ends with the process.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True, name=f"schedsearch-{what}")
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TrackingStoreError(f"{what}: no answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise TrackingUnavailableError(
            f"MLflow tracking needs mlflow ({exc}): pip install \"schedsearch[search]\""
        ) from None
    return mlflow


def _warn(message: str) -> None:
    warnings.warn(" ".join(message.split()), TrackingWarning, stacklevel=3)


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (MLflow reads its HTTP settings per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_db_logs() -> Iterator[None]:
    """MLflow logs INFO lines when it creates/migrates a sqlite store and a warning per retry; keep them out."""
    names = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # ERROR: MLflow's "will be retried" warnings are not the user's business (bounded below)
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _sanitize_key(key: Any) -> str:
    k = _KEY_BAD.sub("_", str(key)).strip() or "_"
    return k[:250]


def _fmt_number(x: float, digits: int | None = None) -> str:
    if isinstance(x, float):
        return repr(round(x, digits) if digits is not None else x)
    return str(x)


def _param_value(v: Any) -> str:
    """Stringify one parameter value; lists/tuples become compact JSON-like strings."""
    if isinstance(v, bool) or v is None:
        s = str(v)
    elif isinstance(v, int | float):
        s = _fmt_number(v)
    elif isinstance(v, list | tuple):
        s = "[" + ",".join(_fmt_number(x, 6) if isinstance(x, int | float) and not isinstance(x, bool)
                           else _param_value(x) for x in v) + "]"
    elif isinstance(v, Mapping):
        s = json.dumps(v, sort_keys=True, default=str, separators=(",", ":"))
    else:
        s = str(v)
    return s if len(s) <= _MAX_PARAM_VALUE else s[: _MAX_PARAM_VALUE - 3] + "..."


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys; every value a string MLflow accepts (lists flattened to ``[a,b,...]``)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, prefix=f"{key}."))
        else:
            out[_sanitize_key(key)] = _param_value(v)
    return out


def _numeric(v: Any) -> float | None:
    """A metric value from a number, a bool or a one-element sequence of a number; None otherwise."""
    if isinstance(v, list | tuple) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    try:  # numpy / torch scalars
        import numbers

        if isinstance(v, numbers.Real):
            return float(v)
    except Exception:  # pragma: no cover
        pass
    return None


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


class Tracker:
    """One MLflow parent run per study, one child run per trial.

    ``Tracker(tracking_uri, experiment)`` connects (falling back to ``sqlite:///mlflow.db`` in the working
    directory with one :class:`TrackingWarning` when the URI cannot be used). Then :meth:`start_study` opens
    or resumes the parent run; :meth:`log_trial` adds a finished child run; :meth:`log_artifact_file`,
    :meth:`log_figure` and :meth:`set_summary` decorate the parent; :meth:`end` (or leaving ``with tracker:``)
    closes it. Thread-safe, so Optuna's ``n_jobs > 1`` callbacks can share one tracker.

    Attributes: ``tracking_uri`` (the store actually used), ``requested_uri``, ``fell_back`` (bool),
    ``experiment_id``, ``run_id`` (the parent, once started), ``enabled`` (False after a logging error).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "schedsearch"):
        mlflow = _mlflow()
        self.requested_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.experiment = experiment
        self.fell_back = False
        self.run_id: str | None = None
        self.enabled = True
        self._lock = threading.Lock()
        self._ended = False
        self._warned_error = False
        self._client: Any = None
        self.experiment_id = ""
        self.tracking_uri = self.requested_uri
        first_error: Exception | None = None
        # relative sqlite paths are made absolute here: MLflow caches one store per URI string, so a relative
        # "sqlite:///mlflow.db" would keep pointing at the directory it was first opened in
        candidates = [absolute_sqlite(u) for u in (self.requested_uri, DEFAULT_TRACKING_URI, home_store_uri())]
        for uri in dict.fromkeys(candidates):
            try:
                self._client, self.experiment_id = self._connect(mlflow, uri)
                self.tracking_uri = uri
                break
            except Exception as exc:  # noqa: BLE001 - every store problem degrades to the next store
                first_error = first_error or exc
        else:
            self.enabled = False
            _warn(f"tracking URI {self.requested_uri} cannot be used ({type(first_error).__name__}: "
                  f"{_one_line(first_error)}) and neither can the local stores {DEFAULT_TRACKING_URI} and "
                  f"{home_store_uri()}; tracking is off for this study, which goes on")
            return
        if self.tracking_uri != absolute_sqlite(self.requested_uri):
            self.fell_back = True
            what = "is unreachable" if self.requested_uri.startswith(("http://", "https://")) else "cannot be used"
            _warn(f"tracking URI {self.requested_uri} {what} ({type(first_error).__name__}: "
                  f"{_one_line(first_error)}); the study goes on and logs to the local store {self.tracking_uri} "
                  f"(see it with: schedsearch ui --tracking-uri {self.tracking_uri})")

    # -- connection ----------------------------------------------------------------------------------------
    def _connect(self, mlflow: Any, uri: str) -> tuple[Any, str]:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            check_sqlite_store(uri)  # seconds, not MLflow's ~100 s of retries, for a broken file
            db = Path(uri[len("sqlite:///"):])
            if str(db) not in ("", ":memory:"):
                db.parent.mkdir(parents=True, exist_ok=True)
                if db.resolve().parent != Path.cwd().resolve():
                    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", self.experiment)
                    artifact_location = (db.resolve().parent / "mlruns" / slug).as_uri()
        env = {}
        if uri.startswith(("http://", "https://")):
            env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
        if uri.startswith(("http://", "https://", "sqlite:")):  # bounded by the probe settings / checked above
            return self._open(mlflow, uri, env, artifact_location)
        return bounded(lambda: self._open(mlflow, uri, env, artifact_location), STORE_TIMEOUT_S,
                       f"tracking store {uri.split('@')[-1]}")

    def _open(self, mlflow: Any, uri: str, env: dict, artifact_location: str | None) -> tuple[Any, str]:
        with _env(**env), _quiet_db_logs():
            client = mlflow.MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    exp_id = client.create_experiment(self.experiment, artifact_location=artifact_location)
                except mlflow.exceptions.MlflowException:
                    # another worker created it between our lookup and create: use theirs
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                exp_id = exp.experiment_id
        return client, exp_id

    @property
    def client(self) -> Any:
        """The underlying ``mlflow.MlflowClient`` (bound to :attr:`tracking_uri`)."""
        return self._client

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker.start_study() must be called before logging to the study's run")
        return self.run_id

    def _failed(self, what: str, exc: Exception) -> None:
        self.enabled = False
        if not self._warned_error:
            self._warned_error = True
            _warn(f"MLflow logging failed while {what} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                  "tracking is off for the rest of this study, which goes on")

    def _log_batch(self, run_id: str, params: Mapping[str, str] = (), metrics: Mapping[str, float] = (),
                   tags: Mapping[str, str] = (), step: int = 0) -> None:
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        p = [Param(k, v) for k, v in dict(params).items()]
        m = [Metric(k, float(v), ts, step) for k, v in dict(metrics).items()]
        t = [RunTag(k, str(v)) for k, v in dict(tags).items()]
        if len(p) <= _MAX_PER_BATCH and len(t) <= _MAX_PER_BATCH and len(p) + len(m) + len(t) <= 1000:
            self._client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)
            return
        for chunk in _chunks(p, _MAX_PER_BATCH):
            self._client.log_batch(run_id, params=chunk, synchronous=True)
        for chunk in _chunks(t, _MAX_PER_BATCH):
            self._client.log_batch(run_id, tags=chunk, synchronous=True)
        for chunk in _chunks(m, 1000):
            self._client.log_batch(run_id, metrics=chunk, synchronous=True)

    # -- parent run ----------------------------------------------------------------------------------------
    def start_study(self, name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
                    run_id: str | None = None) -> str:
        """Open the parent run named ``name`` (or resume ``run_id``) and log ``params``; return its run id.

        Resuming keeps the run's earlier params (MLflow params are immutable): new keys are added, changed
        values are recorded as tags ``resume.<key>``. An unknown ``run_id`` (e.g. it lives in another store)
        starts a new parent run with tag ``schedsearch.resumed_from``.
        """
        flat = flatten_params(params)
        all_tags = {"schedsearch.study": name, "mlflow.runName": name,
                    "mlflow.note.content": _describe(name, params)}
        if params.get("budget") is not None:
            all_tags["schedsearch.budget"] = f"{params.get('budget_kind', 'flops')} <= {params['budget']}"
        self._params = dict(params)
        self._name = name
        if self.fell_back:
            all_tags["schedsearch.requested_tracking_uri"] = self.requested_uri
        all_tags.update({_sanitize_key(k): str(v) for k, v in (tags or {}).items()})
        run = None
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except Exception:
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                _warn(f"MLflow run {run_id} was not found in {self.tracking_uri}; starting a new parent run")
                all_tags["schedsearch.resumed_from"] = run_id
                run = None
        if run is not None:
            old = run.data.params
            new = {k: v for k, v in flat.items() if k not in old}
            changed = {f"resume.{k}": v for k, v in flat.items() if k in old and old[k] != v}
            all_tags.pop("mlflow.runName", None)
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._log_batch(run.info.run_id, params=new, tags={**all_tags, **changed})
            self.run_id = run.info.run_id
        else:
            run = self._client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            self.run_id = run.info.run_id
            self._log_batch(self.run_id, params=flat)
        self._ended = False
        return self.run_id

    def log_artifact_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a local file into the parent run's artifacts (under ``artifact_path`` when given)."""
        rid = self._require_run()
        if not self.enabled:
            return
        try:
            self._client.log_artifact(rid, str(path), artifact_path)
        except Exception as exc:
            self._failed(f"logging artifact {path}", exc)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib Figure as the parent run's artifact ``name`` (e.g. ``plots/history.png``); closes it."""
        rid = self._require_run()
        try:
            if self.enabled:
                self._client.log_figure(rid, fig, name, save_kwargs={"dpi": 150, "bbox_inches": "tight"})
        except Exception as exc:
            self._failed(f"logging figure {name}", exc)
        finally:
            plt = sys.modules.get("matplotlib.pyplot")  # only pyplot-made figures need closing
            if plt is not None:
                plt.close(fig)

    def set_summary(self, metrics: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> None:
        """Log summary metrics (numeric entries only) and extra params on the parent run."""
        if not self.enabled:
            return
        m = {_sanitize_key(k): v for k, v in ((k, _numeric(v)) for k, v in metrics.items()) if v is not None}
        rid = self._require_run()
        tags = {}
        if params and params.get("schedule_path"):
            tags["mlflow.note.content"] = _describe(getattr(self, "_name", ""), getattr(self, "_params", {}),
                                                    schedule=str(params["schedule_path"]), metrics=m)
        try:
            old = self._client.get_run(rid).data.params if params else {}
            p = {k: v for k, v in flatten_params(params or {}).items() if k not in old}
            self._log_batch(rid, params=p, metrics=m, tags=tags)
        except Exception as exc:
            self._failed("logging the study summary", exc)

    def end(self, status: str = "FINISHED") -> None:
        """Close the parent run with ``status`` (FINISHED, KILLED or FAILED). Idempotent."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
        if self.run_id is None or self._ended:
            return
        self._ended = True
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._failed(f"ending the run as {status}", exc)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")
        return False

    # -- child runs ----------------------------------------------------------------------------------------
    def logged_trials(self) -> set[int] | None:
        """Trial numbers that already have a child run under the parent (None when tracking is off or fails)."""
        parent = self._require_run()
        if not self.enabled:
            return None
        numbers: set[int] = set()
        token = None
        try:
            while True:
                page = self._client.search_runs([self.experiment_id],
                                                filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                                max_results=1000, page_token=token)
                for r in page:
                    with contextlib.suppress(KeyError, ValueError):
                        numbers.add(int(r.data.tags["schedsearch.trial"]))
                token = page.token
                if not token:
                    return numbers
        except Exception as exc:
            self._failed("listing the study's child runs", exc)
            return None

    def log_trial(self, number: int, params: Mapping[str, Any], metrics: Mapping[str, Any],
                  tags: Mapping[str, Any] | None = None, status: str = "FINISHED", *,
                  start_ms: int | None = None, end_ms: int | None = None,
                  parent_metrics: Mapping[str, Any] | None = None) -> str | None:
        """Record one finished trial as a child run of the study's run; return the child run id.

        ``params`` are flattened to strings; ``metrics`` keep their numeric entries (others are dropped).
        ``start_ms``/``end_ms`` (epoch milliseconds) are the trial's own times, so the UI shows when it ran and
        how long it took. ``parent_metrics`` go to the parent run at step ``number`` (the best value so far);
        without them the parent gets metric ``objective`` from ``metrics["value"]``. Errors are warned about once
        and switch tracking off.
        """
        if not self.enabled:
            return None
        parent = self._require_run()
        flat = flatten_params(params)
        m = {_sanitize_key(k): v for k, v in ((k, _numeric(v)) for k, v in metrics.items()) if v is not None}
        all_tags = {"mlflow.parentRunId": parent, "schedsearch.trial": str(int(number))}
        all_tags.update({_sanitize_key(k): str(v) for k, v in (tags or {}).items()})
        with self._lock:
            try:
                run = self._client.create_run(self.experiment_id, run_name=f"trial-{int(number):04d}",
                                              tags=all_tags, start_time=start_ms)
                cid = run.info.run_id
                self._log_batch(cid, params=flat, metrics=m, step=int(number))
                self._client.set_terminated(cid, status=status, end_time=end_ms)
                if parent_metrics is None and "value" in m:
                    parent_metrics = {"objective": m["value"]}
                pm = {_sanitize_key(k): v for k, v in ((k, _numeric(v)) for k, v in (parent_metrics or {}).items())
                      if v is not None and math.isfinite(v)}
                if pm:
                    self._log_batch(parent, metrics=pm, step=int(number))
                return cid
            except Exception as exc:
                self._failed(f"logging trial {number}", exc)
                return None


def _trial_metrics(study: Any, trial: Any) -> dict[str, float]:
    metrics: dict[str, float] = {}
    values = trial.values
    if values:
        names = getattr(study, "metric_names", None)
        if len(values) == 1:
            metrics[names[0] if names else "value"] = values[0]
        else:
            for i, v in enumerate(values):
                metrics[names[i] if names else f"value_{i}"] = v
    for k, v in trial.user_attrs.items():
        x = _numeric(v)
        if x is not None:
            metrics[k] = x
    if "trial_seconds" not in metrics and trial.datetime_start and trial.datetime_complete:
        metrics["trial_seconds"] = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return metrics


def _ms(when: Any) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def _best_so_far(study: Any) -> dict[str, float]:
    """The study's best value under its metric's name (single objective; feasible trials when constrained)."""
    if len(study.directions) != 1:
        return {}
    try:
        best = study.best_value
    except ValueError:  # no completed (feasible) trial yet
        return {}
    names = getattr(study, "metric_names", None)
    return {names[0] if names else "objective": best}


def _name_metrics(study: Any, names: list[str]) -> None:
    """``study.set_metric_names`` once (Optuna stores it with the study; optuna-dashboard labels its axes by it)."""
    if getattr(study, "metric_names", None) or len(names) != len(study.directions):
        return
    try:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(names))
    except Exception:  # noqa: BLE001 - a label is never worth stopping a study
        pass


def optuna_callback(tracker: Tracker, extra_metrics_fn: Callable[[Any, Any], Mapping[str, Any]] | None = None,
                    metric_names: list[str] | None = None) -> Callable[[Any, Any], None]:
    """A ``study.optimize(callbacks=[...])`` callback logging each finished trial as a child run.

    Logged: the trial's params (renamed by :data:`PARAM_LABELS`); its value under the study's metric name
    (``metric_names`` are set on the study on first use, e.g. ``["one_minus_cos"]``; without names ``value`` /
    ``value_i``); numeric ``user_attrs`` (one-element sequences such as a constraint tuple included) as metrics;
    other user attrs as params ``attr.<key>`` (lists flattened to strings); ``extra_metrics_fn(study, trial)``
    entries as metrics; the trial state as tag ``optuna.state``; the trial's own start and end times. The
    parent run gets the study's best value so far under the same metric name. FAIL trials end FAILED, the
    others FINISHED. The callback never raises on a tracking error (it warns once); it also works when called
    by hand after ``study.tell`` (ask/tell loops).
    """

    def callback(study: Any, trial: Any) -> None:
        if metric_names:
            _name_metrics(study, metric_names)
        metrics = _trial_metrics(study, trial)
        if extra_metrics_fn is not None:
            metrics.update(extra_metrics_fn(study, trial) or {})
        params: dict[str, Any] = {PARAM_LABELS.get(k, k): v for k, v in trial.params.items()}
        for k, v in trial.user_attrs.items():
            if _numeric(v) is None:
                params[f"attr.{k}"] = v
        state = getattr(trial.state, "name", str(trial.state))
        tags = {"optuna.state": state, "optuna.study": study.study_name}
        tracker.log_trial(trial.number, params, metrics, tags=tags,
                          status="FAILED" if state == "FAIL" else "FINISHED",
                          start_ms=_ms(trial.datetime_start), end_ms=_ms(trial.datetime_complete),
                          parent_metrics=_best_so_far(study))

    return callback


def set_constraint(trial: Any, name: str, value: float) -> None:
    """``trial.set_constraint(name, value)`` (Optuna 5: system attr ``constraints:<name>``, feasible when <= 0),
    also stored under the key older readers use (system attr ``constraints``: the list of all of the trial's
    constraint values in name order), which is where optuna-dashboard 0.21 looks for feasibility."""
    trial.set_constraint(name, value)
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    values = [float(v) for k, v in sorted(attrs.items()) if k.startswith("constraints:")]
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", values)


def _describe(name: str, params: Mapping[str, Any], schedule: str | None = None,
              metrics: Mapping[str, float] | None = None) -> str:
    """The parent run's description (MLflow shows it above the run): study, method, budget, schedule file."""
    parts = [f"schedsearch study **{name}**"]
    if params.get("method"):
        parts.append(f"method `{params['method']}`, sampler `{params.get('sampler', '-')}`")
    if params.get("budget") is not None:
        parts.append(f"budget: {params.get('budget_kind', 'flops')} <= {params['budget']}")
    text = "; ".join(parts) + "."
    if schedule:
        text += f"\n\nSchedule file: `{schedule}` (also an artifact of this run)."
        best = (metrics or {}).get("best_search")
        if best is not None:
            held = (metrics or {}).get("best_heldout")
            text += f" Best 1 - cos: {best:.5f} on the search split" + \
                (f", {held:.5f} held out." if held is not None else ".")
    return text


def _worker_gone(worker: Any, completed: Any, grace_s: float) -> bool:
    """True when the process that finished a trial can no longer log it: a ``host:pid`` on this host whose pid is
    gone, or (another host, or no worker recorded) a trial finished more than ``grace_s`` seconds ago; a live
    worker logs its trial milliseconds after committing it."""
    import datetime
    import socket

    host, _, pid = str(worker or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) == os.getpid()  # an earlier study in this very process
    if completed is None:
        return True
    now = datetime.datetime.now(completed.tzinfo)
    return (now - completed).total_seconds() > grace_s


def backfill_trials(tracker: Tracker, study: Any, callback: Callable[[Any, Any], None], grace_s: float = 60.0
                    ) -> int:
    """Log, through ``callback``, every finished trial of ``study`` that has no child run yet; return how many.

    A trial is committed to the Optuna storage before its logging callback runs, so a Ctrl-C or SIGKILL
    between the two leaves a finished trial without a child run. Calling this when a study is (re)opened
    closes that gap. Trials whose worker may still be about to log them (a live process on this host, or on
    another host a trial finished within ``grace_s`` seconds) are left to that worker, so workers sharing a
    study never log a trial twice.
    """
    logged = tracker.logged_trials()
    if logged is None:
        return 0
    n = 0
    for t in study.get_trials(deepcopy=False):
        if (t.state.is_finished() and t.number not in logged
                and _worker_gone(t.user_attrs.get("worker"), t.datetime_complete, grace_s)):
            callback(study, t)
            n += 1
    return n


def find_experiment(uri: str, experiment: str = "schedsearch") -> str | None:
    """The id of ``experiment`` in the store at ``uri`` (read only; None when the store or experiment does not
    exist yet). A store that cannot be read raises TrackingStoreError in one line, within seconds."""
    mlflow = _mlflow()
    if uri.startswith("sqlite:///"):
        raw = uri[len("sqlite:///"):]
        if not raw.startswith("file:") and not Path(raw.split("?", 1)[0]).exists():
            return None
        check_sqlite_store(uri, write=False)
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}

    def look() -> str | None:
        with _env(**env), _quiet_db_logs():
            exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        return None if exp is None else exp.experiment_id

    try:
        return bounded(look, STORE_TIMEOUT_S, f"tracking store {uri.split('@')[-1]}")
    except TrackingStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any store failure is one line
        raise TrackingStoreError(f"cannot read the tracking store {uri.split('@')[-1]} "
                                 f"({type(exc).__name__}: {_one_line(exc)})") from None


def runs_view_path(experiment_id: str | None) -> str:
    """The MLflow UI fragment that opens an experiment's runs table (MLflow 3 otherwise opens its GenAI view)."""
    if experiment_id is None:
        return "/"
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
