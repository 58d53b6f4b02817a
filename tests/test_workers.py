"""Many workers, one study, on a REAL PostgreSQL server started by the ``postgres`` fixture (tests/pg.py).

Each worker is its own ``python -m schedsearch optimize`` process in its own working directory (as on
separate machines); they share the study through ``--storage postgresql://...`` and the MLflow store through
``--tracking-uri``. Workers join the shared study with ``--resume`` (create-or-load). Heartbeats are shortened
with SCHEDSEARCH_HEARTBEAT / SCHEDSEARCH_GRACE so a killed worker's trial goes stale within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

N = 3  # trials per worker


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", SCHEDSEARCH_HEARTBEAT="1", SCHEDSEARCH_GRACE="2",
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _prepare(tmp_path, postgres, tiny_dir, manifest, study):
    from mlflow import MlflowClient

    url = postgres.createdb(study.replace("-", "_"))
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    (tmp_path / "mlflow").mkdir()
    MlflowClient(mlflow_uri).create_experiment("schedsearch")  # as a shared tracking server would have it
    base = [sys.executable, "-m", "schedsearch", "optimize", "--model", str(tiny_dir("qwen2_5_vl")),
            "--calibration", str(manifest), "--budget", "0.8", "--sampler", "random", "--storage", url,
            "--study", study, "--tracking-uri", mlflow_uri, "--resume"]
    return url, mlflow_uri, base


def _start(base, cwd: Path, *extra):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*base, *extra, "--out", str(cwd / "best.json")], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("schedsearch")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.slow
def test_three_workers_share_one_study(tmp_path, postgres, tiny_dir, manifest):
    import optuna

    from schedsearch.schedule import load_schedule
    from schedsearch.storage import make_storage

    url, mlflow_uri, base = _prepare(tmp_path, postgres, tiny_dir, manifest, "shared-3")
    procs = [_start(base, tmp_path / f"w{i}", "--trials", str(N)) for i in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err

    st = optuna.load_study(study_name="shared-3", storage=make_storage(url))
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 * N and len(st.trials) == 3 * N
    assert len({t.number for t in st.trials}) == 3 * N
    assert len({t.user_attrs["worker"] for t in complete}) == 3  # every worker ran trials
    # each worker's sampler has its own seed (derived from --seed, the study and its invocation number): before,
    # all three were seeded with --seed and proposed the same N points
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3 * N
    assert sorted({t.user_attrs["invocation"] for t in complete}) == [0, 1, 2]

    parents, children = _runs(mlflow_uri)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0].info.run_id
    assert st.user_attrs["mlflow_run_id"] == parent
    assert len(children) == 3 * N and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent}

    # each worker wrote the best of all trials completed when it finished (other workers' included)
    by_number = {t.number: t for t in complete}
    for i in range(3):
        sched = load_schedule(tmp_path / f"w{i}" / "best.json")
        t = by_number[sched.provenance.trial]
        written = (tmp_path / f"w{i}" / "best.json").stat().st_mtime
        own_last = max(x.datetime_complete.timestamp() for x in complete
                       if x.user_attrs["worker"].endswith(f":{procs[i].pid}"))
        seen_for_sure = [x.value for x in complete if x.datetime_complete.timestamp() <= own_last]
        could_have_seen = [x.value for x in complete if x.datetime_complete.timestamp() <= written]
        assert min(could_have_seen) <= t.value <= min(seen_for_sure)
        assert [round(r, 6) for r in sched.keep_ratios] == pytest.approx(t.user_attrs["keep_ratios"], abs=1e-6)
        assert sched.provenance.mlflow_run_id == parent
    last = max(range(3), key=lambda i: (tmp_path / f"w{i}" / "best.json").stat().st_mtime)
    assert load_schedule(tmp_path / f"w{last}" / "best.json").provenance.trial == st.best_trial.number


@pytest.mark.slow
def test_sigkilled_worker_trial_fails_and_is_retried(tmp_path, postgres, tiny_dir, manifest):
    import optuna

    from schedsearch.storage import make_storage

    url, mlflow_uri, base = _prepare(tmp_path, postgres, tiny_dir, manifest, "killed")
    victim = _start(base, tmp_path / "victim", "--trials", "1000")
    survivor = _start(base, tmp_path / "survivor", "--trials", str(N))
    storage = make_storage(url)
    victim_id = None
    deadline = time.time() + 120
    killed_trial = None
    while time.time() < deadline and killed_trial is None:
        time.sleep(0.05)
        try:
            st = optuna.load_study(study_name="killed", storage=storage)
        except KeyError:
            continue
        running = [t for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if str(t.user_attrs.get("worker", "")).endswith(f":{victim.pid}")]
        if not running:
            continue
        os.kill(victim.pid, signal.SIGSTOP)  # freeze it, then make sure the trial is still running
        st = optuna.load_study(study_name="killed", storage=storage)
        still = [t for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                 if str(t.user_attrs.get("worker", "")).endswith(f":{victim.pid}")]
        if still:
            killed_trial, victim_id = still[0].number, still[0].user_attrs["worker"]
            os.kill(victim.pid, signal.SIGKILL)
        else:
            os.kill(victim.pid, signal.SIGCONT)
    assert killed_trial is not None, "the victim never had a running trial"
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    # the survivor may finish before the grace period runs out: a worker joining now (--resume, as after a
    # crash) starts its first trial after the grace period (its start-up alone takes longer), so at least it
    # fails the stale trial; whichever worker asks next re-runs it
    late = _start(base, tmp_path / "late", "--trials", "2")
    for p in (survivor, late):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err

    st = optuna.load_study(study_name="killed", storage=storage)
    by_number = {t.number: t for t in st.trials}
    assert by_number[killed_trial].state == optuna.trial.TrialState.FAIL
    assert not [t for t in st.trials if t.state == optuna.trial.TrialState.RUNNING]
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retries = [t for t in st.trials if retry_cls.retried_trial_number(t) == killed_trial]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    killed_params = by_number[killed_trial].params  # what it had suggested before it died is re-run as is
    assert {k: retries[0].params[k] for k in killed_params} == killed_params
    assert retries[0].user_attrs["worker"] != victim_id
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    victim_done = [t for t in complete if t.user_attrs.get("worker") == victim_id]
    assert len(complete) == len(victim_done) + N + 2  # survivor's N and the late worker's 2 (the retry among them)
    parents, children = _runs(mlflow_uri)
    assert len(parents) == 1
    assert (tmp_path / "survivor" / "best.json").is_file() and (tmp_path / "late" / "best.json").is_file()


def test_unreachable_storage_is_one_line_without_password(tmp_path, manifest):
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "optimize", "--budget", "0.2", "--calibration",
                           str(manifest), "--storage", "postgresql://u:s3cret@127.0.0.1:1/db", "--study", "x"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120, check=False)
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errs) == 1, proc.stderr
    assert "postgresql://u:***@127.0.0.1:1/db" in errs[0] and "s3cret" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_race_with_a_foreign_process_is_retried(tmp_path, monkeypatch):
    """Another process (optuna-dashboard, a script's optuna.load_study) creating the schema at the same moment
    fails our first open with a unique-constraint error; the retry opens the now complete schema."""
    import optuna

    from schedsearch import storage as st
    from schedsearch.storage import StorageError

    url = f"sqlite:///{tmp_path}/race.db"
    real, calls = st._open_rdb, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            optuna.storages.RDBStorage(url)  # the "foreign" process wins the race
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num")
        return real(*args)

    monkeypatch.setattr(st, "_open_rdb", flaky)
    monkeypatch.setattr(st, "_SCHEMA_READY", set())
    storage = st.make_storage(url)
    assert len(calls) == 2 and storage == url  # sqlite: Optuna gets the URL, its tables exist now
    st.make_storage(url)
    assert len(calls) == 2  # once per process
    optuna.create_study(storage=storage, study_name="after-race").optimize(lambda t: t.suggest_float("x", 0, 1), 2)

    def broken(*args):
        calls.append(1)
        raise RuntimeError("unable to open database file")

    monkeypatch.setattr(st, "_open_rdb", broken)
    calls.clear()
    with pytest.raises(StorageError, match="unable to open database file"):
        st.make_storage(f"sqlite:///{tmp_path}/other.db")
    assert len(calls) == 1  # only a schema race is retried
