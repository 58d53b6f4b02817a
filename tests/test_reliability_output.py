"""A search's result is never lost to a bad --out: checked before any model is loaded, rescued if the write fails.

Real ``python -m schedsearch optimize`` processes, real files; the disk-full case uses a real, tiny tmpfs when
this machine allows mounting one (root / CAP_SYS_ADMIN; conftest's ``tmpfs`` fixture), else the output folder is
replaced by a file mid-run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedsearch.output import OutputError, prepare_output, rescue_dir

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def one_error(stderr: str) -> str:
    errs = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in stderr, stderr
    return errs[0]


@pytest.mark.parametrize("case", ["directory", "under_a_file", "unwritable", "pareto_folder_is_a_file"])
def test_bad_out_is_refused_before_the_model_is_loaded(tmp_path, manifest, case, tmpfs):
    if case == "directory":
        out, expect = tmp_path / "adir", "is a directory"
        out.mkdir()
    elif case == "under_a_file":
        (tmp_path / "afile").write_text("x")
        out, expect = tmp_path / "afile" / "sub" / "s.json", "afile is a file, not a folder"
    elif case == "pareto_folder_is_a_file":
        out, expect = tmp_path / "afile", "is a file, not a folder"
        out.write_text("x")
    else:
        ro = tmpfs("ro", 64)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        out, expect = ro / "new" / "s.json", "Read-only file system"
    # the model does not exist: reaching load_model would be a different error, so the --out check came first
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "optimize", "--model", str(tmp_path / "no-model"),
                           "--calibration", str(manifest), "--budget", "0.5", "--out", str(out),
                           *(["--pareto"] if case.startswith("pareto") else [])],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120, check=False)
    err = one_error(proc.stderr)
    assert proc.returncode == 2 and f"--out {out}" in err and expect in err, err
    assert not (tmp_path / "mlflow.db").exists()  # no tracking run was opened either


def test_prepare_output_folder_mode_and_rescue_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        prepare_output(tmp_path / "f", folder=True)
    before = sorted(tmp_path.iterdir())
    assert prepare_output(tmp_path / "a" / "b", folder=True) == tmp_path / "a" / "b"
    assert prepare_output(tmp_path / "a" / "c.json") == tmp_path / "a" / "c.json"
    assert sorted(tmp_path.iterdir()) == before  # checked, nothing created, the probe is gone
    assert rescue_dir(f"sqlite:///{tmp_path}/x/studies.db") == tmp_path / "x" / "rescued"
    assert rescue_dir("postgresql://u@h/db") == Path(".schedsearch") / "rescued"


def _wait_for_trials(storage: str, study: str, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    import optuna

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            st = optuna.load_study(study_name=study, storage=storage)
            if len([t for t in st.trials if t.state.name == "COMPLETE"]) >= n:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial finished in time")


@pytest.mark.slow
def test_failed_final_write_rescues_the_schedule(tmp_path, manifest, tiny_dir, fill_disk):
    import optuna
    from mlflow import MlflowClient

    from schedsearch.schedule import load_schedule

    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)], capture_output=True,
                           check=False)  # can this machine mount a tmpfs? (mounted over tmp_path, then undone)
    full_disk = probe.returncode == 0
    if full_disk:
        subprocess.run(["umount", str(tmp_path)], check=True)
        outdir = tmp_path / "small"
        outdir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(outdir)], check=True)
    else:
        outdir = tmp_path / "outdir"
    storage = f"sqlite:///{tmp_path}/db/studies.db"
    (tmp_path / "db").mkdir()
    out = outdir / "best.json"
    cmd = [sys.executable, "-m", "schedsearch", "optimize", "--model", str(tiny_dir("qwen2_5_vl")), "--calibration",
           str(manifest), "--budget", "0.8", "--sampler", "random", "--trials", "25", "--storage", storage,
           "--study", "s", "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_trials(storage, "s", 1, proc)
        os.kill(proc.pid, signal.SIGSTOP)  # the search is under way and its output was checked: now break it
        if full_disk:
            fill_disk(outdir)
        else:
            shutil.rmtree(outdir)
            outdir.write_text("not a folder any more")
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if full_disk:
            subprocess.run(["umount", "-l", str(outdir)], check=False)
    err = one_error(stderr)
    assert proc.returncode == 2, stderr
    cause = "No space left on device" if full_disk else "Not a directory"
    rescued = tmp_path / "db" / "rescued" / "best.json"
    assert f"could not write {out} ({cause})" in err and f"saved to {rescued}" in err, err
    sched = load_schedule(rescued)  # the complete, valid schedule
    st = optuna.load_study(study_name="s", storage=storage)
    assert len([t for t in st.trials if t.state.name == "COMPLETE"]) == 25
    assert sched.provenance.trial == st.best_trial.number
    run_id = sched.provenance.mlflow_run_id
    assert f"MLflow run {run_id}" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert "best.json" in [a.path for a in client.list_artifacts(run_id)]
