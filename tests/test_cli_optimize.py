"""`schedsearch optimize`: bad inputs are one line and a non-zero exit, before any heavy work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from schedsearch.testing.tiny import tiny_images


@pytest.fixture
def manifest(tmp_path):
    lines = []
    for i, im in enumerate(tiny_images(4, seed=2)):
        im.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"what is {i}?"}))
    p = tmp_path / "manifest.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _run(args, cwd):
    import os

    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if os.environ.get("PYTHONPATH"):  # a worktree run first on the path imports its own schedsearch
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "schedsearch", "optimize", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=180, check=False, env=env)
    return proc.returncode, [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")], proc.stderr


@pytest.mark.parametrize("args,expect", [
    (["--budget", "0"], "--budget 0.0 is out of range: it must be 0<x<=1"),
    (["--budget", "1.5"], "--budget 1.5 is out of range: it must be 0<x<=1"),
    (["--budget", ""], "--budget '' is empty"),
    (["--budget", "0.1,0.2"], "lists several budgets: add --pareto"),
    (["--budget", "0.2", "--method", "nope"],
     "'nope' is not one of 'psigmoid', 'pcosine', 'twostage', 'vflow', 'gsearch'"),
    (["--budget", "0.2", "--sampler", "nope"], "'nope' is not one of 'tpe', 'gp'"),
    (["--budget", "0.2", "--budget-kind", "watts"], "'watts' is not one of 'flops', 'tokens', 'kv'"),
    (["--budget", "0.2", "--trials", "0"], "--trials 0 is out of range: it must be a whole number x>=1"),
    (["--budget", "0.2", "--timeout", "-5"], "--timeout -5.0 is out of range: it must be x>0"),
    (["--budget", "0.2", "--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--budget", "0.2", "--seed", "-1"], "--seed -1 is out of range"),
    (["--budget", "0.2", "--tolerance", "-1"], "--tolerance -1.0 is out of range: it must be x>=0"),
    (["--budget", "0.2", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    (["--budget", "0.2", "--dtype", "int8"], "'int8' is not one of 'auto', 'bfloat16', 'float16', 'float32'"),
    ([], "--budget is required"),
])
def test_bad_settings(tmp_path, manifest, args, expect):
    rc, errs, raw = _run([*args, "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1 and expect in errs[0], raw
    assert "Traceback" not in raw


def test_missing_manifest_is_reported_before_an_existing_study(tmp_path, manifest):
    """A wrong --calibration path is the error to show, even when the derived study name already exists."""
    import optuna

    (tmp_path / ".schedsearch").mkdir()
    optuna.create_study(study_name="toy-psigmoid-flops0.2-tpe-seed0",
                        storage=f"sqlite:///{tmp_path}/.schedsearch/studies.db")
    rc, errs, raw = _run(["--budget", "0.2", "--calibration", "nope.jsonl"], tmp_path)
    assert rc != 0 and len(errs) == 1 and "nope.jsonl does not exist" in errs[0], raw


def test_config_directory_and_out_of_range_preset(tmp_path, manifest):
    """--config DIR names the directory (not "does not exist"); preset numbers are range-checked like flags."""
    rc, errs, raw = _run(["--config", str(tmp_path), "--calibration", str(manifest)], tmp_path)
    assert rc == 2 and len(errs) == 1 and "is a directory: pass the preset's TOML file" in errs[0], raw
    cfg = tmp_path / "study.toml"
    cfg.write_text("[study]\nbudget = 0.2\ntrials = 0\n")
    rc, errs, raw = _run(["--config", str(cfg), "--calibration", str(manifest)], tmp_path)
    assert rc == 2 and len(errs) == 1 and "trials=0 is out of range" in errs[0], raw
    cfg.write_text('[study]\nbudget = 0.2\ndtype = "int8"\n')  # presets take device/dtype like the flags
    rc, errs, raw = _run(["--config", str(cfg), "--calibration", str(manifest)], tmp_path)
    assert rc == 2 and len(errs) == 1 and "--dtype 'int8' is not supported" in errs[0], raw
    assert not (tmp_path / ".schedsearch").exists()  # refused before any study was created


def test_device_cuda_without_cuda_is_one_line(tmp_path, manifest):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, errs, raw = _run(["--budget", "0.2", "--device", "cuda", "--calibration", str(manifest)], tmp_path)
    assert rc == 2 and len(errs) == 1 and "CUDA is not available" in errs[0] and "--device cpu" in errs[0], raw
    assert "Traceback" not in raw


def test_unknown_config_key(tmp_path, manifest):
    cfg = tmp_path / "study.toml"
    cfg.write_text('[study]\nbudget = 0.2\nbugdet_kind = "flops"\n')
    rc, errs, raw = _run(["--config", str(cfg), "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1 and "unknown key(s) bugdet_kind" in errs[0], raw


def test_real_model_without_weights(tmp_path, manifest):
    rc, errs, raw = _run(["--model", "qwen2.5-vl", "--budget", "0.2", "--calibration", str(manifest)], tmp_path)
    assert rc != 0 and len(errs) == 1, raw
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in errs[0] and "download" in errs[0], errs


@pytest.fixture
def tiny_model_dir(tiny_dir):
    return tiny_dir("qwen2_5_vl")


@pytest.mark.slow
def test_end_to_end_ctrl_c_and_resume(tmp_path, manifest, tiny_model_dir):
    """optimize writes a valid schedule; SIGINT keeps finished trials and closes the MLflow run as KILLED;
    --resume continues the same study under the same parent run."""
    import os
    import signal
    import time

    import optuna
    from mlflow import MlflowClient

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "schedsearch", "optimize", "--model", str(tiny_model_dir), "--calibration",
            str(manifest), "--budget", "0.8", "--sampler", "random", "--study", "s1"]
    storage = f"sqlite:///{tmp_path}/.schedsearch/studies.db"
    proc = subprocess.Popen([*base, "--trials", "100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 3:
        time.sleep(0.5)
        try:
            st = optuna.load_study(study_name="s1", storage=storage)
            done = len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE])
        except Exception:  # noqa: BLE001 - not created yet
            pass
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "interrupted" in errs[0] and "--resume" in errs[0]
    assert "Traceback" not in err
    st = optuna.load_study(study_name="s1", storage=storage)
    kept = len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE])
    assert kept >= 3
    assert not (tmp_path / "schedules").exists()  # nothing half-written
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("schedsearch")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["KILLED"]

    res = subprocess.run([*base, "--trials", "2", "--resume"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    st = optuna.load_study(study_name="s1", storage=storage)
    assert len([t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]) == kept + 2
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) >= kept + 2
    out_file = tmp_path / "schedules" / "s1.json"
    assert out_file.is_file()
    from schedsearch.schedule import load_schedule

    sched = load_schedule(out_file)
    assert sched.budget.achieved <= 0.8 and sched.provenance.study == "s1"
    assert sched.provenance.mlflow_run_id == parents[0].info.run_id
