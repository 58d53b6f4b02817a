"""Resumed and shared studies explore new points: each process on a study gets its own derived sampler seed.

Real worker processes on one real study store (a sqlite file, and the PostgreSQL server of the ``postgres``
fixture), each running ``open_study`` + ``study.optimize`` as ``schedsearch optimize`` does, with a cheap
objective so the test measures the proposals, not a model. The CLI path is covered end to end by
tests/test_workers.py (three ``optimize`` workers on PostgreSQL: all points distinct).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 10

WORKER = """
import json, sys
from schedsearch.search.optimize import StudySettings, open_study, tag_trial
url, name, sampler, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
settings = StudySettings(sampler=sampler, seed=7, storage=url, study_name=name, resume=True)
study = open_study(settings)

def objective(trial):
    tag_trial(trial, settings)
    return sum((trial.suggest_float(k, 0.0, 1.0) - 0.3) ** 2 for k in ("a", "b", "c"))

study.optimize(objective, n_trials=n)
print(json.dumps({"invocation": settings.invocation, "seed": settings.sampler_seed}))
"""


def _workers(url: str, name: str, sampler: str, count: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, name, sampler, str(TRIALS)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _points(study) -> list[tuple]:
    return [tuple(t.params[k] for k in ("a", "b", "c")) for t in study.trials if t.state.name == "COMPLETE"]


def _check_shared_then_resumed(url: str, sampler: str) -> None:
    import optuna

    from schedsearch.search.optimize import derive_seed
    from schedsearch.storage import make_storage

    name = f"shared-{sampler}"
    two = _workers(url, name, sampler, 2)  # two workers at once on one study
    assert sorted(w["invocation"] for w in two) == [0, 1]
    study = optuna.load_study(study_name=name, storage=make_storage(url))
    first = _points(study)
    assert len(first) == 2 * TRIALS and len(set(first)) == 2 * TRIALS  # before: 10 distinct of 20
    (resumed,) = _workers(url, name, sampler, 1)  # --resume: a third invocation
    assert resumed["invocation"] == 2
    study = optuna.load_study(study_name=name, storage=make_storage(url))
    after = _points(study)
    assert len(after) == 3 * TRIALS and len(set(after)) == 3 * TRIALS  # nothing replayed
    # the record: the counter, each invocation's seed, and each trial's invocation/seed
    attrs = study.user_attrs
    assert attrs["invocations"] == 3
    for n in range(3):
        rec = attrs[f"invocation:{n}"]
        assert rec["seed"] == derive_seed(7, name, n) and rec["base_seed"] == 7 and rec["sampler"] == sampler
    assert derive_seed(7, name, 0) == 7  # a fresh study keeps --seed as is
    assert len({attrs[f"invocation:{n}"]["seed"] for n in range(3)}) == 3
    for t in study.trials:
        assert t.user_attrs["sampler_seed"] == attrs[f"invocation:{t.user_attrs['invocation']}"]["seed"]
    if sampler == "random":  # reproducible from the record: a sampler seeded as recorded proposes the same points
        for n in range(3):
            seed = attrs[f"invocation:{n}"]["seed"]
            replay = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            replay.optimize(lambda t: sum(t.suggest_float(k, 0.0, 1.0) for k in ("a", "b", "c")), n_trials=TRIALS)
            mine = [p for p, t in zip(after, [t for t in study.trials if t.state.name == "COMPLETE"], strict=True)
                    if t.user_attrs["invocation"] == n]
            assert mine == _points(replay)


@pytest.mark.parametrize("sampler", ["random", pytest.param("tpe", marks=pytest.mark.slow)])
def test_sqlite_workers_and_resume_propose_distinct_points(tmp_path, sampler):
    _check_shared_then_resumed(f"sqlite:///{tmp_path}/studies.db", sampler)


@pytest.mark.slow
def test_postgres_workers_and_resume_propose_distinct_points(postgres):
    _check_shared_then_resumed(postgres.createdb("seeds"), "random")


def test_in_memory_study_gets_invocation_zero():
    from schedsearch.search.optimize import StudySettings, open_study

    s = StudySettings(sampler="random", seed=3)
    study = open_study(s)
    assert s.invocation == 0 and s.sampler_seed == 3 and study.user_attrs["invocation:0"]["seed"] == 3
