"""Faults of the study store itself: one line with the database's own reason, exit 2, finished trials kept.

Real stores: a sqlite file on a real tmpfs that is remounted read-only or filled up (``tmpfs`` fixture; skipped
where mounting is denied), and a PostgreSQL database switched to read-only transactions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedsearch.storage import StorageError, probe_writable, storage_error

ROOT = Path(__file__).resolve().parents[1]


def _optimize(tmp_path, model, manifest, storage, *extra, popen=False):
    cmd = [sys.executable, "-m", "schedsearch", "optimize", "--model", str(model), "--calibration", str(manifest),
           "--budget", "0.8", "--sampler", "random", "--storage", storage, "--study", "s",
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "best.json"), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def _one_error(proc_rc: int, stderr: str) -> str:
    errs = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert proc_rc == 2 and len(errs) == 1 and "Traceback" not in stderr, stderr
    return errs[0]


def _complete(storage: str) -> list:
    import optuna

    st = optuna.load_study(study_name="s", storage=storage)
    return [t for t in st.trials if t.state.name == "COMPLETE"]


def _make_study(storage: str, n: int) -> None:
    """A study with n finished trials, made in another process (so no connection here keeps the file open)."""
    code = ("import optuna, sys; optuna.logging.set_verbosity(optuna.logging.ERROR); "
            "st = optuna.create_study(study_name='s', storage=sys.argv[1]); "
            "st.optimize(lambda t: t.suggest_float('x', 0, 1), n_trials=int(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, storage, str(n)], check=True, timeout=120)


def test_read_only_sqlite_is_refused_before_the_model_with_the_real_reason(tmp_path, manifest, tmpfs):
    db = tmpfs("ro", 1024)
    storage = f"sqlite:///{db}/studies.db"
    _make_study(storage, 3)
    subprocess.run(["mount", "-o", "remount,ro", str(db)], check=True)
    # the model does not exist: the storage fault is reported before any model would be loaded
    proc = _optimize(tmp_path, tmp_path / "no-model", manifest, storage, "--resume")
    err = _one_error(proc.returncode, proc.stderr)
    assert "attempt to write a readonly database" in err and "exceeding max length" not in err, err
    assert len(_complete(storage)) == 3  # nothing lost
    with pytest.raises(StorageError, match="readonly database"):
        probe_writable(storage)


@pytest.mark.slow
def test_disk_full_mid_study_is_one_line_and_resume_continues(tmp_path, manifest, tiny_dir, tmpfs, fill_disk):
    db = tmpfs("small", 2048)
    storage = f"sqlite:///{db}/studies.db"
    proc = _optimize(tmp_path, tiny_dir("qwen2_5_vl"), manifest, storage, "--trials", "400", popen=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if len(_complete(storage)) >= 2:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGSTOP)
    fill_disk(db)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    err = _one_error(proc.returncode, stderr)
    assert "database or disk is full" in err and "free space" in err and "--resume" in err, err
    assert "exceeding max length" not in stderr
    (db / "filler").unlink()  # space freed: the study continues where it stopped
    kept = len(_complete(storage))
    assert kept >= 2
    again = _optimize(tmp_path, tiny_dir("qwen2_5_vl"), manifest, storage, "--trials", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert len(_complete(storage)) == kept + 2 and (tmp_path / "best.json").is_file()


def test_read_only_postgres_is_one_line(postgres, tmp_path, manifest):
    import sqlalchemy

    from schedsearch.storage import driver_url

    url = postgres.createdb("readonly")
    _make_study(url, 2)
    engine = sqlalchemy.create_engine(driver_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("ALTER DATABASE readonly SET default_transaction_read_only = on"))
    engine.dispose()
    with pytest.raises(StorageError, match="read-only transaction"):
        probe_writable(url)
    proc = _optimize(tmp_path, tmp_path / "no-model", manifest, url, "--resume")
    err = _one_error(proc.returncode, proc.stderr)
    assert "cannot execute UPDATE in a read-only transaction" in err and "pw@" not in err, err


def test_storage_error_finds_the_database_reason_under_optunas_wrapper():
    import sqlite3

    import optuna
    import sqlalchemy

    try:
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as low:
                raise sqlalchemy.exc.OperationalError("INSERT ...", {}, low) from low
        except sqlalchemy.exc.OperationalError as mid:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit. This "
                                                         "typically happens due to ... exceeding max length.") from mid
    except optuna.exceptions.StorageInternalError as top:
        err = storage_error(top, "postgresql://u:secret@h/db")
    assert isinstance(err, StorageError) and "\n" not in str(err)
    assert "database or disk is full: free space" in str(err) and "secret" not in str(err)
    assert storage_error(ValueError("not the store"), "sqlite:///x.db") is None
