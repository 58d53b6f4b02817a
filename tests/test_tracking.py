"""MLflow tracking (parent/child runs from a real Optuna study, statuses, resume, unreachable URI), plots, ui."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

pytest.importorskip("mlflow")
optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from schedsearch.tracking import (  # noqa: E402
    Tracker,
    TrackingWarning,
    backfill_trials,
    flatten_params,
    optuna_callback,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs ~2 s of schema migrations); tests use own experiments."""
    d = tmp_path_factory.mktemp("mlstore") / "store"
    return d, f"sqlite:///{d}/mlflow.db"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(tracker: Tracker, parent: str) -> list:
    return tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                      order_by=["tags.`schedsearch.trial` ASC"])


def _objective(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    k = trial.suggest_int("k", 1, 4)
    trial.set_user_attr("flops_ratio", 0.1 * k)
    trial.set_user_attr("kv_ratio", 0.05 * k)
    trial.set_user_attr("constraint", (0.1 * k - 0.2,))
    trial.set_user_attr("keep_ratios", [1.0, 0.5, 0.25])
    trial.set_user_attr("trial_seconds", 0.01)
    return (x - 0.5) ** 2 + k


def test_flatten_params():
    flat = flatten_params({"a": 1, "b": [0.1234567891, 2], "c": {"d": True, "e": {"f": "g"}}, "n": None,
                           "bad key!": 0.5})
    assert flat == {"a": "1", "b": "[0.123457,2]", "c.d": "True", "c.e.f": "g", "n": "None", "bad key_": "0.5"}
    assert len(flatten_params({"long": "x" * 10000})["long"]) == 6000


def test_study_parent_and_child_runs(store, tmp_path):
    d, uri = store
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        tracker = Tracker(uri, experiment="quadratic")
    assert not tracker.fell_back and tracker.tracking_uri == uri
    parent = tracker.start_study("quad", {"budget": 0.2, "sampler": "tpe", "scorer": {"name": "attn"}},
                                 tags={"owner": "test"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    times = []
    cb = optuna_callback(tracker, extra_metrics_fn=lambda s, t: {"best_so_far": s.best_value})

    def timed(s, t):
        t0 = time.perf_counter()
        cb(s, t)
        times.append(time.perf_counter() - t0)

    with tracker:
        study.optimize(_objective, n_trials=3, callbacks=[timed])
        (tmp_path / "best.json").write_text("{}")
        tracker.log_artifact_file(tmp_path / "best.json")
        from schedsearch import plots

        tracker.log_figure(plots.history_plot([t.value for t in study.trials]), "optimization_history.png")
        tracker.set_summary({"best_search": study.best_value, "note": "not a number"}, {"schedule_path": "x"})

    client = tracker.client
    p = client.get_run(parent)
    assert p.info.status == "FINISHED"
    assert p.data.params["budget"] == "0.2" and p.data.params["scorer.name"] == "attn"
    assert p.data.params["schedule_path"] == "x"
    assert p.data.tags["owner"] == "test" and p.data.tags["mlflow.runName"] == "quad"
    assert p.data.metrics["best_search"] == pytest.approx(study.best_value)
    assert "note" not in p.data.metrics
    assert [m.step for m in client.get_metric_history(parent, "objective")] == [0, 1, 2]
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"best.json", "optimization_history.png"} <= arts
    assert (d / "mlruns" / "quadratic").is_dir()  # artifacts next to the database, not in the CWD

    kids = _children(tracker, parent)
    assert len(kids) == 3
    for run, trial in zip(kids, study.trials, strict=True):
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert float(run.data.params["x"]) == pytest.approx(trial.params["x"], rel=0, abs=0)
        assert run.data.params["k"] == str(trial.params["k"])
        assert run.data.params["attr.keep_ratios"] == "[1.0,0.5,0.25]"
        m = run.data.metrics
        assert m["value"] == pytest.approx(trial.value)
        assert m["flops_ratio"] == pytest.approx(0.1 * trial.params["k"])
        assert m["kv_ratio"] == pytest.approx(0.05 * trial.params["k"])
        assert m["constraint"] == pytest.approx(0.1 * trial.params["k"] - 0.2)
        assert m["trial_seconds"] == pytest.approx(0.01)
        assert "best_so_far" in m
    ms = sorted(times)[len(times) // 2] * 1000
    print(f"per-trial logging: median {ms:.1f} ms")
    assert ms < 250  # ~17 ms on 2 shared cores; loose bound against a regression to seconds


def test_interrupt_kills_error_fails_and_resume(store):
    _, uri = store
    tracker = Tracker(uri, experiment="statuses")
    rid = tracker.start_study("interrupted", {"trials": 10})
    study = optuna.create_study()

    def objective(trial):
        if trial.number == 2:
            raise KeyboardInterrupt
        return trial.suggest_float("x", 0, 1)

    with pytest.raises(KeyboardInterrupt), tracker:
        study.optimize(objective, n_trials=10, callbacks=[optuna_callback(tracker)])
    assert tracker.client.get_run(rid).info.status == "KILLED"
    assert len(_children(tracker, rid)) == 2  # finished trials stay logged

    # --resume: same parent, RUNNING again, earlier params kept, changed ones noted as tags
    t2 = Tracker(uri, experiment="statuses")
    assert t2.start_study("interrupted", {"trials": 20, "new": 1}, run_id=rid) == rid
    assert t2.client.get_run(rid).info.status == "RUNNING"
    with t2:
        t2.log_trial(2, {"x": 0.3}, {"value": 0.3})
    r = t2.client.get_run(rid)
    assert r.info.status == "FINISHED"
    assert r.data.params["trials"] == "10" and r.data.params["new"] == "1"
    assert r.data.tags["resume.trials"] == "20"
    assert len(_children(t2, rid)) == 3

    t3 = Tracker(uri, experiment="statuses")
    t3.start_study("failing", {})
    with pytest.raises(ValueError), t3:
        raise ValueError("boom")
    assert t3.client.get_run(t3.run_id).info.status == "FAILED"

    with pytest.warns(TrackingWarning, match="not found"):
        new = t3.start_study("unknown", {}, run_id="0" * 32)
    assert new != "0" * 32
    t3.end()
    with pytest.raises(ValueError, match="status"):
        t3.end("DONE")


def test_backfill_logs_trials_committed_but_not_logged(store):
    """A trial committed to the study whose callback never ran (Ctrl-C in between) is logged on reopen, once;
    a trial whose worker is still alive is left to that worker (no double logging between workers)."""
    import socket

    _, uri = store
    tracker = Tracker(uri, experiment="backfill")
    rid = tracker.start_study("gap", {})
    study = optuna.create_study()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()

    def run(worker, n, callbacks=()):
        def objective(trial):
            trial.set_user_attr("worker", f"{host}:{worker}")
            return _objective(trial)
        study.optimize(objective, n_trials=n, callbacks=list(callbacks))

    try:
        run(dead.pid, 2, [optuna_callback(tracker)])
        run(dead.pid, 2)  # committed by a worker that died before logging
        run(alive.pid, 1)  # committed by a live worker, which will log it itself
        assert tracker.logged_trials() == {0, 1}

        assert backfill_trials(tracker, study, optuna_callback(tracker)) == 2
        children = _children(tracker, rid)
        assert sorted(int(r.data.tags["schedsearch.trial"]) for r in children) == [0, 1, 2, 3]
        late = {int(r.data.tags["schedsearch.trial"]): r for r in children}[3]
        assert late.data.metrics["value"] == pytest.approx(study.trials[3].value)
        assert backfill_trials(tracker, study, optuna_callback(tracker)) == 0  # idempotent
        # once that worker has died, its trial is backfilled too
        alive.kill()
        alive.wait()
        assert backfill_trials(tracker, study, optuna_callback(tracker)) == 1
    finally:
        alive.kill()
        tracker.end()


def test_multi_objective_and_logging_error_does_not_stop_study(store):
    _, uri = store
    tracker = Tracker(uri, experiment="multi")
    rid = tracker.start_study("pareto", {})
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_metric_names(["discrepancy", "flops_ratio"])
    with tracker:
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.5), n_trials=1,
                       callbacks=[optuna_callback(tracker)])
        (kid,) = _children(tracker, rid)
        assert kid.data.metrics["flops_ratio"] == 0.5 and "discrepancy" in kid.data.metrics

        def broken(*a, **k):
            raise ConnectionError("server went away")

        tracker.client.create_run = broken
        with pytest.warns(TrackingWarning) as rec:
            study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.5), n_trials=3,
                           callbacks=[optuna_callback(tracker)])
        assert len(rec) == 1 and "tracking is off" in str(rec[0].message)
    assert len(study.trials) == 4 and not tracker.enabled


def test_unreachable_uri_falls_back_to_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    port = _closed_port()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tracker = Tracker(f"http://127.0.0.1:{port}", experiment="fallback")
        rid = tracker.start_study("s", {"a": 1})
        study = optuna.create_study()
        with tracker:
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, callbacks=[optuna_callback(tracker)])
    elapsed = time.perf_counter() - t0
    ours = [w for w in rec if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    msg = str(ours[0].message)
    local_uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"  # the default store, made absolute
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and local_uri in msg
    assert tracker.fell_back and tracker.tracking_uri == local_uri
    assert (tmp_path / "mlflow.db").is_file()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the probe's settings were restored
    from mlflow import MlflowClient

    local = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = local.get_experiment_by_name("fallback")
    runs = local.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
    assert len(runs) == 2
    assert local.get_run(rid).data.tags["schedsearch.requested_tracking_uri"] == f"http://127.0.0.1:{port}"
    assert elapsed < 10, elapsed


def test_figures_render_to_png(tmp_path):
    import numpy as np
    from PIL import Image

    from schedsearch import plots

    img = Image.fromarray((np.arange(48 * 64 * 3) % 255).reshape(48, 64, 3).astype("uint8"))
    grid = np.zeros((6, 8), dtype=bool)
    grid[1:4, 2:6] = True
    pts = [(0.1, 0.5), (0.2, 0.3), (0.05, 0.8), (0.3, 0.35)]
    assert plots.pareto_front(pts) == [(0.2, 0.3), (0.1, 0.5), (0.05, 0.8)]
    figs = {
        "keep": plots.keep_ratio_plot({"searched": [1, 1, 0.5, 0.2], "fastv": [1, 0.3, 0.3, 0.3]}),
        "history": plots.history_plot([3.0, 2.0, None, float("nan"), 2.5, 1.0]),
        "pareto": plots.pareto_plot(pts, budgets=[0.2]),
        "overlay_grid": plots.overlay_plot(img, grid),
        "overlay_float": plots.overlay_plot(img, [[0.0, 0.5], [1.0, 0.25]]),
        "overlay_boxes": plots.overlay_plot(img, [(0.0, 0.0, 0.5, 0.5), (32, 24, 48, 48)]),
    }
    for name, fig in figs.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 1000, name
        with Image.open(path) as im:
            w, h = im.size
            assert im.format == "PNG" and w >= 300 and h >= 200, (name, im.size)
    with pytest.raises(ValueError, match="2-D"):
        plots.overlay_plot(img, np.zeros((2, 2, 2)))


def test_ui_rejects_busy_port_and_short_circuits_servers(capsys):
    from schedsearch.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", "sqlite:///nowhere/x.db"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and err.count("error:") == 1
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5000"]) == 0
    assert "nothing to start" in capsys.readouterr().out


@pytest.mark.slow
def test_ui_serves_runs(store):
    """`schedsearch ui` on a free loopback port prints, once the server answers, a URL that opens the study
    experiment's runs table; the page answers 200 and MLflow's REST API lists the study's run."""
    import json
    import re
    import urllib.request

    _, uri = store
    tracker = Tracker(uri, experiment="served")
    rid = tracker.start_study("served", {})
    tracker.end()
    port = _closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "schedsearch", "ui", "--tracking-uri", uri, "--port", str(port),
                             "--experiment", "served", "--no-open"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:(\d+)/#/experiments/(\d+)/runs\?workflowType=machine_learning)", line)
        assert m, line
        url, got_port, exp_id = m.group(1), int(m.group(2)), m.group(3)
        assert got_port == port and exp_id == tracker.experiment_id
        with urllib.request.urlopen(url, timeout=10) as r:  # the fragment stays in the browser: this is the app page
            assert r.status == 200 and "<html" in r.read(4096).decode("utf-8", "replace").lower()
        body = json.dumps({"experiment_ids": [exp_id]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert [r["info"]["run_id"] for r in runs] == [rid]
        with warnings.catch_warnings():  # the same server as a tracking URI: no fallback, runs land there
            warnings.simplefilter("error", TrackingWarning)
            remote = Tracker(f"http://127.0.0.1:{port}", experiment="remote")
        assert not remote.fell_back
        with remote:
            prid = remote.start_study("remote", {"a": 1})
            remote.log_trial(0, {"x": 0.5}, {"value": 0.25})
        (kid,) = _children(remote, prid)
        assert kid.data.metrics["value"] == 0.25 and remote.client.get_run(prid).info.status == "FINISHED"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in proc.stderr.read()


def test_ui_bad_store_and_bad_host_are_one_line(tmp_path, capsys):
    """A store that cannot be read and a host this machine does not have: one line each, nothing announced, and a
    host problem never suggests another port."""
    from schedsearch.cli import main

    corrupt = tmp_path / "mlflow.db"
    corrupt.write_bytes(b"this is not an sqlite database" * 10)
    port = _closed_port()
    for args, expect in [
        (["--tracking-uri", f"sqlite:///{corrupt}"], "file is not a database"),
        (["--tracking-uri", "bogus://nowhere"], "cannot read the tracking store bogus://nowhere"),
        (["--host", "192.0.2.1"], "192.0.2.1 is not an address of this machine"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid is not an address or a name"),
    ]:
        assert main(["ui", "--port", str(port), "--no-open", *args]) == 2, args
        out, err = capsys.readouterr()
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expect in errors[0], (args, err)
        assert "http://" not in out and "--port" not in errors[0], (args, out, err)


def test_ui_facing_run_contents(store):
    """What the MLflow UI shows: the metric named for what it is, real trial times, the README's parameter names,
    the best value (not the last) on the parent, the budget and a description naming the schedule file; the
    budget constraint stored under Optuna 5's key and the key optuna-dashboard 0.21 reads."""
    import datetime

    from schedsearch.tracking import set_constraint

    _, uri = store
    tracker = Tracker(uri, experiment="ui-facing")
    parent = tracker.start_study("named", {"budget": 0.2, "budget_kind": "flops", "method": "psigmoid",
                                           "sampler": "random"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    values = [0.3, 0.1, 0.2]  # the last trial is not the best

    def objective(trial):
        trial.suggest_float("phi", 0.0, 0.95)
        set_constraint(trial, "budget", -0.01)
        time.sleep(0.05)
        return values[trial.number]

    with tracker:
        study.optimize(objective, n_trials=3, callbacks=[optuna_callback(tracker, metric_names=["one_minus_cos"])])
        tracker.set_summary({"best_search": 0.1, "best_heldout": 0.12}, {"schedule_path": "schedules/named.json"})
    assert study.metric_names == ["one_minus_cos"]
    t0 = study.trials[0]
    assert t0.system_attrs["constraints:budget"] == pytest.approx(-0.01)
    assert t0.system_attrs["constraints"] == [pytest.approx(-0.01)]

    client = tracker.client
    p = client.get_run(parent)
    assert p.data.metrics["one_minus_cos"] == pytest.approx(0.1)  # best so far at the last step, not 0.2
    assert [m.value for m in client.get_metric_history(parent, "one_minus_cos")] == pytest.approx([0.3, 0.1, 0.1])
    assert p.data.tags["schedsearch.budget"] == "flops <= 0.2"
    note = p.data.tags["mlflow.note.content"]
    assert "schedules/named.json" in note and "psigmoid" in note and "flops <= 0.2" in note
    kids = _children(tracker, parent)
    for run, trial in zip(kids, study.trials, strict=True):
        assert run.data.metrics["one_minus_cos"] == pytest.approx(trial.value)
        assert "value" not in run.data.metrics
        assert "floor" in run.data.params and "phi" not in run.data.params
        start = datetime.datetime.fromtimestamp(run.info.start_time / 1000, tz=datetime.timezone.utc)
        assert abs((start - trial.datetime_start.astimezone(datetime.timezone.utc)).total_seconds()) < 0.01
        assert run.info.end_time - run.info.start_time >= 40  # the trial's own duration (it slept 50 ms)


def test_broken_local_store_falls_back_within_seconds(tmp_path, monkeypatch):
    """A corrupt default mlflow.db, a directory in its place and a store another process holds locked: one
    warning line each within seconds (MLflow alone retries ~100 s behind dozens of warning lines), and the study
    logs to the per-user store instead, like it does for an unreachable server."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCHEDSEARCH_HOME", str(tmp_path / "home"))
    (tmp_path / "mlflow.db").write_bytes(b"not an sqlite file, e.g. a half-copied one " * 40)
    (tmp_path / "adir").mkdir()
    locked = tmp_path / "locked.db"
    holder = sqlite3.connect(locked)
    holder.execute("CREATE TABLE t (x)")
    holder.commit()
    holder.execute("BEGIN EXCLUSIVE")  # another process writing: nobody else gets the write lock
    try:
        for uri, reason in [(None, "file is not a database"), ("sqlite:///adir", "is a directory"),
                            (f"sqlite:///{locked}", "database is locked")]:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                tracker = Tracker(uri, experiment="fallback")
                rid = tracker.start_study("s", {})
                tracker.end()
            ours = [str(w.message) for w in rec if issubclass(w.category, TrackingWarning)]
            assert len(ours) == 1 and reason in ours[0] and "\n" not in ours[0], (uri, ours)
            assert tracker.fell_back and tracker.tracking_uri.endswith(f"{tmp_path}/home/mlflow.db"), uri
            assert tracker.client.get_run(rid).info.status == "FINISHED"
            assert time.perf_counter() - t0 < 30, uri
    finally:
        holder.rollback()
        holder.close()


def test_study_figures_are_report_ready(tmp_path):
    """The PNGs optimize logs: >= 150 dpi, the budget in every title, labelled axes, Optuna's own history and
    importance plots (README parameter names), the overlay beside the image with a colour bar."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from schedsearch import plots
    from schedsearch.tracking import set_constraint

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        k = trial.suggest_float("k", 2.0, 60.0, log=True)
        phi = trial.suggest_float("phi", 0.0, 0.95)
        set_constraint(trial, "budget", 0.01 if trial.number == 3 else -0.01)  # one infeasible trial
        return 0.1 * phi + 0.001 * k

    study.optimize(objective, n_trials=12)
    result = SimpleNamespace(study=study, best=SimpleNamespace(ratios=[1.0, 0.6, 0.3, 0.1]),
                             baselines={"uniform": {"ratios": [0.25] * 4}}, budget={"kind": "flops", "requested": 0.2})
    figs = plots.study_figures(result)
    assert set(figs) == {"keep_ratio_per_layer.png", "optimization_history.png", "param_importances.png"}
    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 40).astype("uint8"))  # a dark image
    figs["overlay.png"] = plots.overlay_plot(image, np.linspace(0, 1, 24).reshape(4, 6), budget="FLOPs <= 0.2")
    for name, fig in figs.items():
        ax = fig.axes[0] if name != "overlay.png" else fig.axes[1]
        title = fig._suptitle.get_text() if name == "overlay.png" else ax.get_title()
        assert "FLOPs <= 0.2" in title, (name, title)
        if name != "overlay.png":
            assert ax.get_xlabel() and ax.get_ylabel(), name
        fig.savefig(tmp_path / name, dpi=plots.DPI)
        with Image.open(tmp_path / name) as im:
            assert round(im.info["dpi"][0]) >= 150, name
    assert [t.get_text() for t in figs["param_importances.png"].axes[0].get_yticklabels()].count("floor") == 1
    assert len(figs["overlay.png"].axes) == 3  # image, heat map, colour bar
    assert "fraction of decoder layers" in figs["overlay.png"].axes[2].get_ylabel()
